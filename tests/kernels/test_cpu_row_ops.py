"""The compiled RMSNorm and SwiGLU row kernels that the eager CPU bf16 path (prefill)
dispatches to, against their PyTorch references (kernels/rmsnorm.py, kernels/swiglu.py)
and, for the math, against float64, on every CPU path this machine executes."""
import pytest
import torch

from cpu_paths import cpu_ops, cpu_path  # noqa: F401 (fixtures)
from wallperf.kernels import dispatch
from wallperf.kernels.rmsnorm import rms_norm_ref
from wallperf.kernels.swiglu import swiglu_ref


@pytest.fixture(scope="module")
def ops(cpu_ops):
    return cpu_ops


def bf16_randn(*shape, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


@pytest.mark.parametrize("m, h", [(1, 576), (7, 33), (300, 1536), (2048, 64)])
def test_rms_norm_rounds_as_the_reference(ops, m, h):
    x, w = bf16_randn(m, h, seed=m, scale=3), bf16_randn(h, seed=h) + 1
    got, want = ops.rms_norm_bf16(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)
    # The sum of squares adds in another order: a bf16 rounding may flip, one ulp.
    assert (got != want).float().mean() < 1e-3
    torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    xf = x.double()
    exact = w.double() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(got.double(), exact, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("m, f", [(1, 1536), (5, 17), (400, 1536)])
def test_swiglu_rounds_as_the_reference(ops, m, f):
    gu = bf16_randn(m, 2 * f, seed=f, scale=4)
    got, want = ops.swiglu_bf16(gu), swiglu_ref(gu)
    assert got.shape == (m, f) and (got != want).float().mean() < 1e-3
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)
    g, u = gu.double().chunk(2, dim=-1)
    torch.testing.assert_close(got.double(), g * torch.sigmoid(g) * u, rtol=2**-7, atol=1e-6)


def test_dispatch_takes_them_for_cpu_bf16_only(ops, monkeypatch):
    x, w = bf16_randn(4, 64, seed=1), bf16_randn(64, seed=2)
    assert dispatch._cpu_bf16_op("rms_norm_bf16", x, w) is not None
    assert dispatch._cpu_bf16_op("rms_norm_bf16", x.float(), w.float()) is None
    # With a residual: the sum comes back as well, as the reference returns it.
    r = bf16_randn(4, 64, seed=3)
    y, s = dispatch.rms_norm(x, w, 1e-6, residual=r)
    y_ref, s_ref = rms_norm_ref(x, w, 1e-6, residual=r)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref, rtol=2**-7, atol=0)
    monkeypatch.setattr("wallperf.kernels._triton.MODE", "torch")
    assert dispatch._cpu_bf16_op("rms_norm_bf16", x, w) is None


def test_bad_inputs_are_refused(ops):
    with pytest.raises(RuntimeError, match="rms_norm_bf16 takes bfloat16"):
        ops.rms_norm_bf16(torch.zeros(2, 8), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="swiglu_bf16 takes bfloat16 gate_up"):
        ops.swiglu_bf16(torch.zeros(2, 7, dtype=torch.bfloat16))
