"""RMSNorm, optionally fused with the residual add that precedes it in every Llama layer.

    y = weight * (xf * rsqrt(mean(xf^2) + eps)).to(x.dtype),   xf = x in fp32

The cast order is HF Llama's (`LlamaRMSNorm`): the normalized row is rounded to x's
dtype *before* the weight multiplies it, and the product is rounded again. Matching it
gives our bf16 outputs the same two roundings as transformers', not merely close ones.

With `residual`, the layer's two steps `h = x + residual; y = norm(h)` become one pass:
the kernel returns (y, h), h being the new residual stream, rounded to x's dtype as
the unfused `x + residual` in bf16 would be.
"""
import torch

from wallperf.kernels._triton import require_triton, tl, triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
    """PyTorch reference and CPU path. x (M, N), weight (N,) -> (M, N), or
    ((M, N) normed, (M, N) x + residual) when residual is given."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = (weight * normed.to(x.dtype)).to(x.dtype)
    return y if residual is None else (y, x)


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, res_ptr, y_ptr, res_out_ptr,
    N, eps,
    stride_x, stride_res, stride_y, stride_res_out,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per row: hidden sizes (<= 16384) fit one tile, so the row is read once.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N

    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Round the sum to the activation dtype, as the unfused add would, and normalize
        # that rounded value: it is what the next layer will add onto.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)

    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / N
    normed = (xf * tl.math.rsqrt(mean_sq + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """Triton launcher. x (M, N) with unit stride along N; weight (N,) contiguous;
    residual, if given, like x. Returns y (M, N) in x's dtype, or (y, x + residual)."""
    require_triton()
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm: x (M, N) and weight (N,), got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise TypeError(f"rms_norm: x and weight must be fp32/fp16/bf16, got {x.dtype}, "
                        f"{weight.dtype}")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("rms_norm: x needs unit stride along N and weight must be contiguous")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride(1) != 1):
        raise ValueError(f"rms_norm: residual must match x {tuple(x.shape)} {x.dtype} with "
                         f"unit stride, got {tuple(residual.shape)} {residual.dtype}")

    M, N = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    res_out = torch.empty_like(y) if residual is not None else y
    res_in = residual if residual is not None else x
    if M > 0:
        _rms_norm_kernel[(M,)](
            x, weight, res_in, y, res_out,
            N, eps,
            x.stride(0), res_in.stride(0), y.stride(0), res_out.stride(0),
            HAS_RESIDUAL=residual is not None,
            BLOCK_N=triton.next_power_of_2(N),
        )
    return y if residual is None else (y, res_out)
