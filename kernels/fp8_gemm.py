"""fp8 e4m3 weight GEMMs: y = x @ (w * w_scale).T, with w stored in one byte per weight.

Two flavours, both accumulating in fp32:

- w8a16: x stays in its dtype (bf16/fp16/fp32); each fp8 weight tile is widened to x's
  dtype (exact: e4m3 fits in bf16 and fp16) and the per-output-channel scale multiplies
  the finished accumulator once. Decode is bound by reading weights, so halving their
  bytes is the whole gain; the math is unchanged.
- w8a8: x is quantized per token on the fly (scale (M, 1) = amax(|row|) / fp8 max) and
  the dot runs on fp8 operands, the fp8 tensor-core path, times both scales at the end.

The fp8 format is the hardware's: torch.float8_e4m3fn (OCP, max 448) on NVIDIA and
torch.float8_e4m3fnuz (max 240, exponent bias 8) on AMD MI300X. The caller picks it
from the hardware profile; everything here takes either and reads its limits from
torch.finfo. Both have 3 mantissa bits, so they quantize equally well; they are not
bit-compatible, so a checkpoint must be quantized for the format it will run in.
"""
import torch

from wallperf.kernels._triton import require_triton, tl, triton, upcast_dot

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# An all-zero row or tensor would get scale 0 and quantize to 0/0; any tiny floor keeps
# it at exact zeros instead.
_MIN_AMAX = 1e-12


def fp8_max(fp8_dtype: torch.dtype) -> float:
    """Largest finite value of the format: 448 for e4m3fn, 240 for e4m3fnuz."""
    if fp8_dtype not in FP8_DTYPES:
        raise TypeError(f"expected one of {FP8_DTYPES}, got {fp8_dtype}")
    return float(torch.finfo(fp8_dtype).max)


def quantize_fp8(t: torch.Tensor, fp8_dtype: torch.dtype, per_channel: bool = True):
    """Symmetric amax scaling into fp8. t (rows, cols) -> (q like t in fp8_dtype, scale),
    scale fp32 (rows,) per row (per output channel for a weight, per token for an
    activation), or a 0-dim tensor when per_channel is False. t ~= q.float() * scale."""
    fmax = fp8_max(fp8_dtype)
    tf = t.float()
    if per_channel:
        if t.dim() != 2:
            raise ValueError(f"quantize_fp8: per-channel needs (rows, cols), got {tuple(t.shape)}")
        scale = tf.abs().amax(dim=1).clamp(min=_MIN_AMAX) / fmax  # (rows,)
        q = (tf / scale[:, None]).clamp(-fmax, fmax).to(fp8_dtype)
    else:
        scale = tf.abs().amax().clamp(min=_MIN_AMAX) / fmax  # ()
        q = (tf / scale).clamp(-fmax, fmax).to(fp8_dtype)
    return q, scale


def fp8_gemm_w8a16_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """PyTorch reference and CPU path. x (M, K), w (N, K) fp8, w_scale (N,) or scalar
    -> (M, N) in x's dtype."""
    acc = x.float() @ w.float().T  # (M, N)
    return (acc * w_scale.float().reshape(-1)).to(x.dtype)


def fp8_gemm_w8a8_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """PyTorch reference and CPU path: x quantized per token into w's format, then
    fp8 x fp8 with fp32 accumulation. Shapes as fp8_gemm_w8a16_ref."""
    xq, x_scale = quantize_fp8(x, w.dtype, per_channel=True)
    acc = xq.float() @ w.float().T  # (M, N); products of fp8 values are exact in fp32
    return (acc * x_scale[:, None] * w_scale.float().reshape(-1)).to(x.dtype)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr,
    K, stride_x, stride_q,
    FP8_MAX: tl.constexpr,
    MIN_AMAX: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per token; two passes over the row (amax, then scale and cast) so
    # that rows of any length (K = 28672 for Llama 70B's down projection) fit.
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.maximum(tl.max(amax, axis=0), MIN_AMAX) / FP8_MAX
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0)
        q = tl.clamp(x.to(tl.float32) / scale, -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, w_ptr, w_scale_ptr, a_scale_ptr, out_ptr,
    M, N, K,
    stride_am, stride_wn, stride_w_scale, stride_om,
    HAS_A_SCALE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); a (M, K) and w (N, K) are K-contiguous.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am  # (BLOCK_M, 1)
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn  # (1, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_rows + k[None, :], mask=(offs_m[:, None] < M) & (k[None, :] < K),
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_cols + k[:, None], mask=(k[:, None] < K) & (offs_n[None, :] < N),
                    other=0.0)  # (BLOCK_K, BLOCK_N), w transposed by addressing
        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
        else:
            # w8a16 widens the weight to x's dtype; in w8a8 `a` is already in w's fp8
            # format and this is a no-op, leaving an fp8 x fp8 dot.
            acc = tl.dot(a, w.to(a.dtype), acc)

    w_scale = tl.load(w_scale_ptr + offs_n * stride_w_scale, mask=offs_n < N, other=0.0)
    acc = acc * w_scale[None, :]
    if HAS_A_SCALE:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
        acc = acc * a_scale[:, None]
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _check(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, name: str) -> torch.Tensor:
    """Validates the operands; returns w_scale as an (N,) view (stride 0 if per-tensor)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{name}: x (M, K) and w (N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype not in _X_DTYPES or w.dtype not in FP8_DTYPES or w_scale.dtype != torch.float32:
        raise TypeError(f"{name}: x fp32/fp16/bf16, w fp8 e4m3 (fn or fnuz), w_scale fp32; got "
                        f"{x.dtype}, {w.dtype}, {w_scale.dtype}")
    if x.stride(1) != 1 or not w.is_contiguous():
        raise ValueError(f"{name}: x needs unit stride along K and w must be contiguous")
    N = w.shape[0]
    if w_scale.numel() == 1:
        return w_scale.reshape(1).expand(N)
    if w_scale.shape != (N,):
        raise ValueError(f"{name}: w_scale must be (N,)=({N},) or a scalar, got {tuple(w_scale.shape)}")
    return w_scale


def _launch_gemm(a, w, w_scale, a_scale, out_dtype, upcast):
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    # Decode has M of 1 to a few dozen: the smallest M tile tl.dot takes wastes least.
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    block_n, block_k = 64, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp8_gemm_kernel[grid](
        a, w, w_scale, a_scale if a_scale is not None else w_scale, out,
        M, N, K,
        a.stride(0), w.stride(0), w_scale.stride(0), out.stride(0),
        HAS_A_SCALE=a_scale is not None,
        UPCAST_DOT=upcast,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


def quantize_fp8_rows(x: torch.Tensor, fp8_dtype: torch.dtype):
    """Triton launcher: dynamic per-token quantization. x (M, K) fp32/fp16/bf16 with unit
    stride along K -> (q (M, K) fp8_dtype, scale (M, 1) fp32), as quantize_fp8 computes."""
    require_triton()
    fmax = fp8_max(fp8_dtype)
    if x.dim() != 2 or x.dtype not in _X_DTYPES or x.stride(1) != 1:
        raise ValueError(f"quantize_fp8_rows: x (M, K) fp32/fp16/bf16 with unit stride along "
                         f"K, got {tuple(x.shape)} {x.dtype} strides {x.stride()}")
    M, K = x.shape
    q = torch.empty((M, K), dtype=fp8_dtype, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M > 0:
        _quantize_rows_kernel[(M,)](
            x, q, scale, K, x.stride(0), q.stride(0),
            FP8_MAX=fmax, MIN_AMAX=_MIN_AMAX,
            BLOCK_K=min(1024, triton.next_power_of_2(max(K, 1))),
        )
    return q, scale


def fp8_gemm_w8a16(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Triton launcher. x (M, K) fp32/fp16/bf16, w (N, K) fp8 e4m3fn or e4m3fnuz
    contiguous, w_scale fp32 (N,) or scalar -> (M, N) in x's dtype."""
    require_triton()
    w_scale = _check(x, w, w_scale, "fp8_gemm_w8a16")
    return _launch_gemm(x, w, w_scale, None, x.dtype, upcast_dot(x.dtype))


def fp8_gemm_w8a8(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Triton launcher. As fp8_gemm_w8a16, but x is first quantized per token into w's
    fp8 format and the dot runs on fp8 operands."""
    require_triton()
    w_scale = _check(x, w, w_scale, "fp8_gemm_w8a8")
    xq, x_scale = quantize_fp8_rows(x, w.dtype)
    return _launch_gemm(xq, w, w_scale, x_scale, x.dtype, upcast_dot(xq.dtype))
