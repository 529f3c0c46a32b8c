"""SwiGLU kernel vs its PyTorch reference."""
import pytest
import torch

from wallperf.kernels.swiglu import swiglu, swiglu_ref

pytestmark = pytest.mark.triton

# bf16: the interpreter truncates the final fp32 -> bf16 cast (a GPU rounds to nearest).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("M, F", [(1, 511), (33, 33), (33, 1536)])
def test_matches_reference(M, F, dtype, device):
    gate_up = (3 * torch.randn(M, 2 * F, device=device)).to(dtype)
    out = swiglu(gate_up)
    assert out.shape == (M, F) and out.dtype == dtype
    torch.testing.assert_close(out, swiglu_ref(gate_up), **TOL[dtype])


def test_gate_and_up_halves_are_not_swapped(device):
    gate = torch.full((1, 4), -20.0, device=device)  # silu(-20) ~ 0
    up = torch.full((1, 4), 5.0, device=device)
    assert swiglu(torch.cat((gate, up), dim=1)).abs().max() < 1e-6


def test_reference_is_silu_gate_times_up():
    gate, up = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(swiglu_ref(torch.cat((gate, up), 1)), torch.nn.functional.silu(gate) * up)


def test_rejects_odd_width(device):
    with pytest.raises(ValueError):
        swiglu(torch.randn(2, 7, device=device))
