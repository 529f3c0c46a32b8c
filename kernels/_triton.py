"""Where the kernel files get Triton from: the one place that decides whether to import it.

Each kernel file defines its `@triton.jit` kernel at import time, next to the PyTorch
reference that CPU runs use. A CPU-only run must not import Triton (it may not be
installed, and nothing could launch there), so the kernel files take `triton` and `tl`
from here: the real modules when Triton is wanted, otherwise stand-ins under which
`@triton.jit` leaves the kernel as a plain, never-called function and `tl.constexpr` is
only an annotation. `kernels.dispatch` reads `AVAILABLE` and `MODE` to pick a path.

Triton is loaded when a GPU is visible (ROCm builds of torch report AMD GPUs through
`torch.cuda` too), under `TRITON_INTERPRET=1` (the test suite sets it, so the kernel
tests can launch kernels on the CPU), or when `WALLPERF_KERNELS=triton` forces it.
Loading Triton does not route CPU tensors to it: `kernels.dispatch` does that only
while `MODE` is "triton". The choice is made once, at
import, because the kernels are compiled objects bound at module level: set the
environment before anything imports `kernels.dispatch` or a kernel file.
"""
import os
import types

import torch

MODES = ("auto", "triton", "torch")

MODE = os.environ.get("WALLPERF_KERNELS") or "auto"
if MODE not in MODES:
    raise ValueError(f"WALLPERF_KERNELS={MODE!r}: expected one of {', '.join(MODES)}")

# Under the interpreter every kernel runs as numpy on the CPU; launchers read this to
# work around the interpreter's known gaps (see `upcast_dot`).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _import_triton():
    """(triton, triton.language), or (None, None) when Triton is not wanted or missing."""
    wanted = MODE == "triton" or torch.cuda.is_available() or INTERPRETED
    if MODE == "torch" or not wanted:
        return None, None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        if MODE == "triton":
            raise
        return None, None
    return triton, tl


triton, tl = _import_triton()
AVAILABLE = triton is not None
if not AVAILABLE:
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=None)


def require_triton() -> None:
    """Launchers call this first, so a stand-in kernel is never launched."""
    if not AVAILABLE:
        raise RuntimeError(
            "Triton kernels are not loaded: they load when a GPU is visible, or with "
            "WALLPERF_KERNELS=triton (plus TRITON_INTERPRET=1 on a CPU) set before "
            "`kernels` is imported"
        )


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether `tl.dot` operands of `dtype` must be converted to fp32 first.

    Triton 3.9's interpreter returns garbage from `tl.dot` on bf16 operands (fp32, fp16
    and both fp8 formats are correct), so under the interpreter bf16 tiles are loaded
    as bf16 and multiplied in fp32. Compiled kernels always use the native dot.
    """
    return INTERPRETED and dtype == torch.bfloat16
