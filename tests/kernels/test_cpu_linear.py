"""cpu_linear against F.linear computed in float32 on the same bf16 inputs.

The kernel accumulates in fp32 like the reference, in a different order, and
rounds once to bf16 at the end: the error is bf16's half-ulp (2^-9 relative)
plus fp32 reordering noise, far inside the tolerances below. The extension is
built once per session (and cached on disk across sessions).
"""
import pytest
import torch
import torch.nn.functional as F

import kernels.cpu_linear as cpu_linear_module
from kernels.cpu_linear import MAX_KERNEL_ROWS, cpu_linear, cpu_linear_available, why_unavailable

# Twice bf16's rounding error, relative; atol covers outputs that cancel to ~0.
RTOL = 2**-8
ATOL = 1e-3


@pytest.fixture(scope="session")
def kernel():
    """The compiled op itself, which cpu_linear uses up to MAX_KERNEL_ROWS rows and tests reach at any."""
    if not cpu_linear_available():
        pytest.skip(f"cpu_linear's C++ kernel is unavailable here: {why_unavailable()}")
    return torch.ops.wallperf.linear_bf16


def reference(x, weight):
    return F.linear(x.float(), weight.float())


def bf16_randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


# M = 9 is a full pass of the kernel's 8-row fast path and a pass of one.
SHAPES = [(m, k, n) for m in (1, 3, 8, 9) for k in (576, 1536, 33, 1) for n in (1, 17, 1728)]
# The LM head's shape: many rows, at decode batch 1 only (it is the largest matrix).
SHAPES += [(1, k, 49152) for k in (576, 1536, 33, 1)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernel_matches_fp32_reference(kernel, m, k, n):
    x, weight = bf16_randn(m, k, seed=m * 7 + k), bf16_randn(n, k, seed=n + k)
    out = kernel(x, weight)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    torch.testing.assert_close(out.float(), reference(x, weight), rtol=RTOL, atol=ATOL)


def test_three_dimensional_input_flattens_leading_dims(kernel):
    x, weight = bf16_randn(2, 3, 576, seed=1), bf16_randn(960, 576, seed=2)
    out = cpu_linear(x, weight)
    assert out.shape == (2, 3, 960)
    torch.testing.assert_close(out.float(), reference(x, weight), rtol=RTOL, atol=ATOL)


def test_non_contiguous_input_is_made_contiguous(kernel):
    x = bf16_randn(576, 3, seed=3).t()  # (3, 576), strides (1, 3)
    weight = bf16_randn(17, 576, seed=4)
    assert not x.is_contiguous()
    torch.testing.assert_close(cpu_linear(x, weight).float(), reference(x, weight), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("m", [1, MAX_KERNEL_ROWS, MAX_KERNEL_ROWS + 1])
def test_cpu_linear_matches_fp32_reference_on_both_sides_of_max_kernel_rows(kernel, m):
    x, weight = bf16_randn(m, 576, seed=m), bf16_randn(1728, 576, seed=11)
    torch.testing.assert_close(cpu_linear(x, weight).float(), reference(x, weight), rtol=RTOL, atol=ATOL)


def test_kernel_rejects_what_it_cannot_read(kernel):
    x, weight = bf16_randn(1, 576, seed=12), bf16_randn(576, 17, seed=13)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel(x, weight.t())
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel(x.float(), weight.t().contiguous().float())


def test_non_contiguous_weight_is_rejected():
    weight = bf16_randn(576, 17, seed=5).t()
    with pytest.raises(ValueError, match="contiguous"):
        cpu_linear(bf16_randn(1, 576, seed=6), weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_are_rejected(dtype):
    with pytest.raises(TypeError, match="bfloat16"):
        cpu_linear(torch.randn(1, 8, dtype=dtype), torch.randn(4, 8, dtype=dtype))


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"\(1, 8\)"):
        cpu_linear(bf16_randn(1, 8, seed=7), bf16_randn(4, 9, seed=8))


def test_fallback_is_the_reference(monkeypatch):
    monkeypatch.setattr(cpu_linear_module, "_state", (None, "no AVX512-BF16 in this test"))
    x, weight = bf16_randn(3, 33, seed=9), bf16_randn(17, 33, seed=10)
    assert not cpu_linear_available() and why_unavailable() == "no AVX512-BF16 in this test"
    torch.testing.assert_close(cpu_linear(x, weight), F.linear(x, weight), rtol=0, atol=0)
