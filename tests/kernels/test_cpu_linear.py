"""cpu_linear, and the packed GEMM of the fused decode step, against F.linear
computed in float32 on the same bf16 inputs.

The kernel accumulates in fp32 like the reference, in a different order, and
rounds once to bf16 at the end: the error is bf16's half-ulp (2^-9 relative)
plus fp32 reordering noise, far inside the tolerances below. The extension is
built once per session (and cached on disk across sessions).
"""
import pytest
import torch
import torch.nn.functional as F

import wallperf.kernels.cpu_linear as cpu_linear_module
from wallperf.kernels.cpu_linear import MAX_KERNEL_ROWS, cpu_linear, cpu_linear_available, why_unavailable

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


@pytest.fixture(scope="session")
def packed_kernel(kernel):
    """x (M, K), W (N, K) -> x @ W^T through the packed GEMM of the fused decode step."""
    ops = torch.ops.wallperf
    return lambda x, weight: ops.linear_packed_bf16(x, ops.pack_bf16(weight), weight.size(0))


# Rows: 1, around the 8-row register block (2, 7, 8, 9) and around 32 (31, 32, 33: 33 is cut 7,7,7,6,6), 64.
# K: odd (padded to a pair), 1, SmolLM2's; N: below, at and past the 48-column panel and the 16-lane vector,
# and enough columns that both threads take panels.
PACKED_SHAPES = [(m, k, n) for m in (1, 2, 7, 8, 9, 31, 32, 33, 64) for k, n in
                 ((33, 17), (1, 49), (576, 50), (576, 960), (1536, 579), (67, 1728))]


@pytest.mark.parametrize("m,k,n", PACKED_SHAPES)
def test_packed_kernel_matches_fp32_reference(packed_kernel, m, k, n):
    x, weight = bf16_randn(m, k, seed=m * 5 + k), bf16_randn(n, k, seed=n * 3 + k)
    out = packed_kernel(x, weight)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    torch.testing.assert_close(out.float(), reference(x, weight), rtol=RTOL, atol=ATOL)


def test_packed_kernel_ignores_nan_beyond_k(packed_kernel):
    """An odd K's last pair multiplies zero padding in W by zero padding in x, never by what follows x's row."""
    storage = bf16_randn(3, 34, seed=20)
    storage[:, 33] = float("nan")
    x, weight = storage[:, :33].contiguous(), bf16_randn(20, 33, seed=21)
    torch.testing.assert_close(packed_kernel(x, weight).float(), reference(x, weight), rtol=RTOL, atol=ATOL)


def test_packing_is_a_permutation_with_zero_padding(kernel):
    weight = bf16_randn(17, 33, seed=22)
    packed = torch.ops.wallperf.pack_bf16(weight)
    assert packed.shape == (32, 34)
    values = packed.flatten().float()
    assert (values != 0).sum() == (weight != 0).sum()
    assert torch.equal(values[values != 0].sort().values, weight.flatten().float()[weight.flatten() != 0].sort().values)


def test_packed_kernel_rejects_a_weight_not_packed_for_its_shape(kernel):
    x, weight = bf16_randn(2, 576, seed=23), bf16_randn(960, 576, seed=24)
    with pytest.raises(RuntimeError, match="pack_bf16"):
        torch.ops.wallperf.linear_packed_bf16(x, weight[:950].contiguous(), 950)


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
