"""The one place that chooses between a Triton kernel and its PyTorch reference.

The engine calls these, never a kernel file directly. Each picks Triton when Triton is
loaded and the tensors live on a GPU (`is_cuda` is true for ROCm devices too), or when
`WALLPERF_KERNELS=triton` forces it (the kernel tests, on CPU tensors under
`TRITON_INTERPRET=1`); otherwise the reference, which is the CPU path.
`WALLPERF_KERNELS=torch` forces the references everywhere, e.g. to bisect a GPU
mismatch. Importing this module imports Triton only when a GPU is visible or Triton is
forced: `kernels._triton` decides that once for every kernel file.
"""
import torch

from wallperf.kernels import _triton
from wallperf.kernels import fp8_gemm as _fp8_gemm, moe as _moe, paged_attention as _paged_attention
from wallperf.kernels import rmsnorm as _rmsnorm, rope as _rope, swiglu as _swiglu


def uses_triton(t: torch.Tensor) -> bool:
    """Whether ops on tensors like `t` run Triton kernels (callers choosing a data path)."""
    return _triton.AVAILABLE and (t.is_cuda or _triton.MODE == "triton")


def linear(x, weight):
    """x (..., K) @ weight (N, K)^T. On the CPU in bf16, the compiled GEMV kernel
    (kernels.cpu_linear, which falls back to F.linear where it cannot build or run);
    elsewhere F.linear, i.e. cuBLAS/hipBLASLt on a GPU."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16:
        from wallperf.kernels.cpu_linear import cpu_linear

        return cpu_linear(x, weight)
    return torch.nn.functional.linear(x, weight)


def _cpu_bf16_op(name: str, *tensors):
    """The compiled CPU op `name` (kernels/csrc/decode_bf16.cpp) where it applies: bf16
    tensors on the CPU, the extension built, and the references not forced
    (WALLPERF_KERNELS=torch); else None."""
    if _triton.MODE == "torch" or any(t.dtype != torch.bfloat16 or not t.is_cpu for t in tensors):
        return None
    from wallperf.kernels.cpu_linear import _extension

    ops = _extension()[0]
    return None if ops is None else getattr(ops, name)


def rms_norm(x, weight, eps: float, residual=None):
    """x (M, N), weight (N,) -> y (M, N), or (y, x + residual) when residual is given.
    On the CPU in bf16, the compiled row kernel (the same rounding as the reference)."""
    if uses_triton(x):
        return _rmsnorm.rms_norm(x, weight, eps, residual)
    op = _cpu_bf16_op("rms_norm_bf16", x, weight) if x.dim() == 2 else None
    if op is None:
        return _rmsnorm.rms_norm_ref(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
        return op(x, weight, eps), x
    return op(x, weight, eps)


def rope(q, k, positions, inv_freq):
    """q (T, H, D), k (T, H_kv, D), positions (T,), inv_freq (D/2,) -> new rotated (q, k)."""
    fn = _rope.rope if uses_triton(q) else _rope.rope_ref
    return fn(q, k, positions, inv_freq)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    """q (B, H, D) against paged caches (num_blocks, block_size, H_kv, D) -> (B, H, D)."""
    fn = (_paged_attention.paged_decode_attention if uses_triton(q)
          else _paged_attention.paged_decode_attention_ref)
    return fn(q, k_cache, v_cache, block_tables, seq_lens, scale)


def fp8_linear(x, w, w_scale, quantize_activations: bool = False):
    """x (M, K) @ fp8 w (N, K) with fp32 w_scale (N,) or scalar -> (M, N) in x's dtype:
    w8a16, or w8a8 with per-token dynamic quantization of x when quantize_activations."""
    if quantize_activations:
        fn = _fp8_gemm.fp8_gemm_w8a8 if uses_triton(x) else _fp8_gemm.fp8_gemm_w8a8_ref
    else:
        fn = _fp8_gemm.fp8_gemm_w8a16 if uses_triton(x) else _fp8_gemm.fp8_gemm_w8a16_ref
    return fn(x, w, w_scale)


def swiglu(gate_up):
    """gate_up (M, 2F) -> silu(gate) * up (M, F). On the CPU in bf16, the compiled
    row kernel (fp32 math, one rounding to bf16, as the reference)."""
    if uses_triton(gate_up):
        return _swiglu.swiglu(gate_up)
    op = _cpu_bf16_op("swiglu_bf16", gate_up) if gate_up.dim() == 2 else None
    return _swiglu.swiglu_ref(gate_up) if op is None else op(gate_up)


def fused_moe(x, w13, w2, topk_weights, topk_ids):
    """x (T, hidden) through the top-k experts of w13 (E, 2F, hidden), w2 (E, hidden, F)
    -> (T, hidden), weighted by topk_weights (T, k)."""
    fn = _moe.fused_moe if uses_triton(x) else _moe.fused_moe_ref
    return fn(x, w13, w2, topk_weights, topk_ids)
