"""RMSNorm kernel vs its PyTorch reference, and the reference vs HF's LlamaRMSNorm."""
import pytest
import torch

from wallperf.kernels.rmsnorm import rms_norm, rms_norm_ref

pytestmark = pytest.mark.triton

# bf16: the interpreter truncates fp32 -> bf16 casts where a GPU rounds to nearest, so
# each of the two roundings may be one bf16 ulp (2^-7 relative) off the reference's.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
# (rows, hidden): every program of the interpreter's grid runs in Python, so the
# many-row case keeps its rows at 33 and puts the 511 in the hidden size.
SHAPES = [(1, 511), (33, 33), (33, 511)]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("M, N", SHAPES)
def test_matches_reference(M, N, dtype, device):
    x = torch.randn(M, N, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(N, device=device)).to(dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **TOL[dtype])


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("M, N", SHAPES)
def test_fused_residual_add(M, N, dtype, device):
    x = torch.randn(M, N, device=device).to(dtype)
    residual = torch.randn(M, N, device=device).to(dtype)
    w = torch.randn(N, device=device).to(dtype)
    y, new_residual = rms_norm(x, w, 1e-5, residual)
    y_ref, new_residual_ref = rms_norm_ref(x, w, 1e-5, residual)
    torch.testing.assert_close(new_residual, new_residual_ref, **TOL[dtype])
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert y.dtype == new_residual.dtype == dtype


def test_fp32_weight_on_bf16_activations_gives_bf16(device):
    x = torch.randn(33, 64, device=device, dtype=torch.bfloat16)
    w = torch.randn(64, device=device)
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, rms_norm_ref(x, w, 1e-6), **TOL[torch.bfloat16])


def test_strided_rows(device):
    # A column slice of a wider buffer: row stride 96, unit stride along N.
    buf = torch.randn(33, 96, device=device)
    x = buf[:, 16:80]
    w = torch.randn(64, device=device)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **TOL[torch.float32])


def test_rejects_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError):
        rms_norm(x, torch.randn(7, device=device), 1e-6)
    with pytest.raises(ValueError):
        rms_norm(x.T, torch.randn(4, device=device), 1e-6)  # columns not contiguous
    with pytest.raises(TypeError):
        rms_norm(x.double(), torch.randn(8, device=device), 1e-6)
    with pytest.raises(ValueError):
        rms_norm(x, torch.randn(8, device=device), 1e-6, residual=x.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_hf_llama_rmsnorm(dtype):
    """The reference reproduces transformers' cast order exactly, bf16 included."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(33, 64).to(dtype)
    with torch.no_grad():
        expected = norm(x)
    torch.testing.assert_close(rms_norm_ref(x, norm.weight.data, 1e-6), expected, atol=0, rtol=0)
