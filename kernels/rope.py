"""Rotary position embedding in HF's rotate-half layout, applied to q and k together.

Each head vector of size D is two halves x1 = x[:D/2], x2 = x[D/2:]; with
theta = position * inv_freq (D/2,), HF's `q * cos + rotate_half(q) * sin` is

    out1 = x1 * cos(theta) - x2 * sin(theta)
    out2 = x2 * cos(theta) + x1 * sin(theta)

The caller passes inv_freq already scaled (Llama 3's frequency-dependent scaling is a
transform of inv_freq alone), so one kernel serves plain and scaled RoPE.

Out of place: q and k are usually strided views into a fused qkv projection, and
writing rotated copies leaves that buffer intact for whoever else reads it. The math
is fp32 throughout with one rounding at the end; HF instead rounds cos and sin to the
activation dtype and multiplies there, so in bf16 the two differ by about one rounding.
"""
import torch

from wallperf.kernels._triton import require_triton, tl, triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
             inv_freq: torch.Tensor):
    """PyTorch reference and CPU path. q (T, H, D), k (T, H_kv, D), positions (T,),
    inv_freq (D/2,) -> rotated (q, k), new tensors in the inputs' dtypes."""
    theta = positions.float()[:, None] * inv_freq.float()[None, :]  # (T, D/2)
    cos = theta.cos()[:, None, :]  # (T, 1, D/2): broadcast over heads
    sin = theta.sin()[:, None, :]

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)  # (T, heads, D/2) each
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, t, num_heads, stride_xt, stride_xh, stride_ot, stride_oh,
                  cos, sin, half_offs, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # All heads of one token as a (BLOCK_H, BLOCK_HALF) tile per half; cos and sin
    # (1, BLOCK_HALF) broadcast over the heads.
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = (heads < num_heads) & (half_offs < HALF)
    x_row = x_ptr + t * stride_xt + heads * stride_xh
    x1 = tl.load(x_row + half_offs, mask=mask, other=0.0)
    x2 = tl.load(x_row + HALF + half_offs, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    out_row = out_ptr + t * stride_ot + heads * stride_oh
    tl.store(out_row + half_offs, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(out_row + HALF + half_offs, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, inv_freq_ptr,
    H, H_KV,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_H_KV: tl.constexpr,
):
    # One program per token: cos/sin are computed once and shared by its q and k heads.
    t = tl.program_id(0).to(tl.int64)
    half_offs = tl.arange(0, BLOCK_HALF)[None, :]
    pos = tl.load(pos_ptr + t).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + half_offs, mask=half_offs < HALF, other=0.0)
    theta = pos * inv_freq.to(tl.float32)  # (1, BLOCK_HALF), one fp32 product as HF's
    cos = tl.cos(theta)
    sin = tl.sin(theta)
    _rotate_heads(q_ptr, q_out_ptr, t, H, stride_qt, stride_qh, stride_qot, stride_qoh,
                  cos, sin, half_offs, HALF, BLOCK_H)
    _rotate_heads(k_ptr, k_out_ptr, t, H_KV, stride_kt, stride_kh, stride_kot, stride_koh,
                  cos, sin, half_offs, HALF, BLOCK_H_KV)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
    """Triton launcher. q (T, H, D), k (T, H_kv, D), both with unit stride along D (other
    strides free, e.g. views of a fused qkv); positions (T,) int32/int64; inv_freq (D/2,)
    fp32, contiguous. Returns new contiguous (q, k) in the inputs' dtype."""
    require_triton()
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"rope: q (T, H, D) and k (T, H_kv, D), got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    T, H, D = q.shape
    if D % 2 or inv_freq.shape != (D // 2,) or positions.shape != (T,):
        raise ValueError(f"rope: D even, inv_freq (D/2,) and positions (T,), got D={D}, "
                         f"{tuple(inv_freq.shape)}, {tuple(positions.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or inv_freq.dtype != torch.float32:
        raise TypeError(f"rope: q, k fp32/fp16/bf16 alike and fp32 inv_freq, got {q.dtype}, "
                        f"{k.dtype}, {inv_freq.dtype}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rope: positions must be int32 or int64, got {positions.dtype}")
    if q.stride(2) != 1 or k.stride(2) != 1 or not inv_freq.is_contiguous():
        raise ValueError("rope: q and k need unit stride along D; inv_freq must be contiguous")

    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T > 0:
        _rope_kernel[(T,)](
            q, k, q_out, k_out, positions.contiguous(), inv_freq,
            H, k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            HALF=D // 2,
            BLOCK_HALF=triton.next_power_of_2(D // 2),
            BLOCK_H=triton.next_power_of_2(H),
            BLOCK_H_KV=triton.next_power_of_2(k.shape[1]),
        )
    return q_out, k_out
