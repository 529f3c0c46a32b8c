"""RoPE kernel vs its PyTorch reference, and the reference vs HF's apply_rotary_pos_emb."""
import pytest
import torch

from wallperf.kernels.rope import rope, rope_ref

pytestmark = pytest.mark.triton

# bf16: the interpreter truncates the final fp32 -> bf16 cast (a GPU rounds to nearest).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _inv_freq(D, theta=100000.0, device="cpu"):
    return 1.0 / theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)


@pytest.mark.parametrize("dtype", list(TOL))
# One program per token under the interpreter's Python loop: 33 tokens, not 511.
@pytest.mark.parametrize("T, H, H_kv, D", [(1, 9, 3, 64), (33, 4, 1, 32), (33, 8, 8, 128)])
def test_matches_reference(T, H, H_kv, D, dtype, device):
    q = torch.randn(T, H, D, device=device).to(dtype)
    k = torch.randn(T, H_kv, D, device=device).to(dtype)
    positions = torch.randint(0, 8192, (T,), device=device)
    inv_freq = _inv_freq(D, device=device)
    q_out, k_out = rope(q, k, positions, inv_freq)
    q_ref, k_ref = rope_ref(q, k, positions, inv_freq)
    torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
    torch.testing.assert_close(k_out, k_ref, **TOL[dtype])


def test_views_of_fused_qkv_are_read_in_place_and_left_intact(device):
    T, H, H_kv, D = 33, 6, 2, 32
    qkv = torch.randn(T, (H + 2 * H_kv) * D, device=device)
    before = qkv.clone()
    q = qkv[:, : H * D].view(T, H, D)  # strided: row stride (H + 2 H_kv) D
    k = qkv[:, H * D: (H + H_kv) * D].view(T, H_kv, D)
    positions = torch.arange(T, device=device, dtype=torch.int32)
    q_out, k_out = rope(q, k, positions, _inv_freq(D, device=device))
    q_ref, k_ref = rope_ref(q, k, positions, _inv_freq(D, device=device))
    torch.testing.assert_close(q_out, q_ref, **TOL[torch.float32])
    torch.testing.assert_close(k_out, k_ref, **TOL[torch.float32])
    assert torch.equal(qkv, before)


def test_position_zero_is_identity(device):
    q = torch.randn(1, 2, 16, device=device)
    k = torch.randn(1, 1, 16, device=device)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    q_out, k_out = rope(q, k, zero, _inv_freq(16, device=device))
    assert torch.equal(q_out, q) and torch.equal(k_out, k)


def test_rejects_bad_inputs(device):
    q = torch.randn(3, 2, 16, device=device)
    k = torch.randn(3, 1, 16, device=device)
    pos = torch.arange(3, device=device)
    with pytest.raises(ValueError):
        rope(q, k, pos, _inv_freq(32, device=device))
    with pytest.raises(TypeError):
        rope(q, k.half(), pos, _inv_freq(16, device=device))
    with pytest.raises(TypeError):
        rope(q, k, pos.float(), _inv_freq(16, device=device))


def test_reference_is_hf_rotate_half():
    """In fp32 the reference equals transformers' rotary embedding up to cos/sin rounding."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    T, H, H_kv, D = 33, 4, 2, 64
    q, k = torch.randn(T, H, D), torch.randn(T, H_kv, D)
    positions = torch.randint(0, 4096, (T,))
    freqs = positions[:, None].float() * _inv_freq(D)  # HF's LlamaRotaryEmbedding, (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin(), unsqueeze_dim=1)
    q_ref, k_ref = rope_ref(q, k, positions, _inv_freq(D))
    torch.testing.assert_close(q_ref, q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_ref, k_hf, atol=1e-5, rtol=1e-5)
