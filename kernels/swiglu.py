"""SwiGLU activation on a fused gate/up projection: silu(gate) * up.

Llama and Mixtral compute gate and up as one GEMM against stacked weights, giving a
(M, 2F) tensor whose first F columns are the gate and last F the up projection. This
reads that tensor once and writes (M, F), instead of slicing, activating and multiplying
in three passes over memory. The math is fp32 with one rounding at the end (HF rounds
silu(gate) to the activation dtype before the multiply, one rounding more).
"""
import torch

from wallperf.kernels._triton import require_triton, tl, triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """PyTorch reference and CPU path. gate_up (M, 2F) -> (M, F) in gate_up's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)  # (M, F) each
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


@triton.jit
def _swiglu_kernel(
    gate_up_ptr, out_ptr,
    F,
    stride_in, stride_out,
    BLOCK_F: tl.constexpr,
):
    # Grid (M, cdiv(F, BLOCK_F)): a column tile of one row, so wide FFNs (F = 14336)
    # spread over many programs even at decode's M = 1.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + F + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton launcher. gate_up (M, 2F) fp32/fp16/bf16 with unit stride along columns
    -> (M, F) contiguous, same dtype."""
    require_triton()
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"swiglu: gate_up must be (M, 2F), got {tuple(gate_up.shape)}")
    if gate_up.dtype not in _DTYPES:
        raise TypeError(f"swiglu: gate_up must be fp32/fp16/bf16, got {gate_up.dtype}")
    if gate_up.stride(1) != 1:
        raise ValueError("swiglu: gate_up needs unit stride along its columns")

    M, F = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((M, F), dtype=gate_up.dtype, device=gate_up.device)
    block_f = min(1024, triton.next_power_of_2(F))
    if M > 0 and F > 0:
        _swiglu_kernel[(M, triton.cdiv(F, block_f))](
            gate_up, out, F, gate_up.stride(0), out.stride(0), BLOCK_F=block_f,
        )
    return out
