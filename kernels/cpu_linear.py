"""y = x @ W^T in bf16 on the CPU, at decode batch sizes, near the memory wall.

At batch 1 a linear layer reads every weight once and does two FLOPs with it,
so its speed is the speed of streaming W from DRAM. Over SmolLM2-135M's layers
on this project's 2-core Zen 4 (harness/bench/gemv.py), PyTorch's eager
F.linear reaches 22-41% of the STREAM copy bandwidth measured in the same run,
the C++ kernel in csrc/linear_bf16.cpp (AVX512-BF16 dot products, OpenMP over
rows of W) 69-87%. It is compiled on first use with
torch.utils.cpp_extension into $WALLPERF_CACHE/torch_extensions (default
~/.cache/wallperf/torch_extensions), once per torch version.

Where it cannot run (no AVX512-BF16, no compiler or ninja, a failed build)
`cpu_linear` falls back to `cpu_linear_ref`, PyTorch's F.linear, and one
warning says why; `why_unavailable()` gives the same reason. The inputs are
checked the same way on both paths, so a call that works on one machine works
on every machine.

Inference only: the op has no autograd formula.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

cpu_linear_ref = F.linear

_CSRC = Path(__file__).parent / "csrc"
# One extension holds every CPU op: the GEMV, and the fused decode step built on it.
_SOURCES = (_CSRC / "linear_bf16.cpp", _CSRC / "decode_bf16.cpp")
_LIBRARY = "wallperf"
# The kernel's instructions; without them the op would fault.
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
_TORCH_LIB = Path(torch.__file__).parent / "lib"
# -fopenmp for the pragmas, but link torch's own libgomp rather than the
# compiler's: one OpenMP runtime in the process, one thread pool, no
# oversubscription (torch 2.x CPU wheels ship and use libgomp.so.1).
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = [f"-L{_TORCH_LIB}", "-l:libgomp.so.1", f"-Wl,-rpath,{_TORCH_LIB}"]

# Beyond this many rows of x (prefill) PyTorch's GEMM, which reuses each loaded
# weight across many rows, is used. The kernel reads W once per 8 rows; at 16
# it tied F.linear with W in cache and led it 1.4x with W in DRAM; at 32 it
# lost in cache and tied in DRAM (2-core Zen 4).
MAX_KERNEL_ROWS = 16

_lock = threading.Lock()
# None until the first call resolves it; then (op or None, reason or None).
_state: tuple[object, str | None] | None = None


def _build_directory() -> Path:
    cache = Path(os.environ.get("WALLPERF_CACHE", Path.home() / ".cache" / "wallperf"))
    # The extension links against torch's C++ ABI: one build per torch version.
    version = torch.__version__.replace("+", "_")
    return cache / "torch_extensions" / f"linear_bf16-torch{version}"


def _cpu_problem() -> str | None:
    """Why this CPU cannot run the kernel, or None when it can."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as e:
        return f"cannot read /proc/cpuinfo to look for AVX512-BF16: {e}"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    missing = [f for f in _REQUIRED_CPU_FLAGS if f not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def _build():
    """Compile (or reuse) the extension and return its op."""
    from torch.utils.cpp_extension import load

    directory = _build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    # flock, unlike torch's own lock file, is released when its holder dies, so
    # a build killed half-way cannot leave the next process waiting forever.
    with open(directory / "build.flock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        # Holding the flock, nobody else is building: a torch lock file left
        # here is stale and would make load() wait on it forever.
        (directory / "lock").unlink(missing_ok=True)
        load(name="wallperf_linear_bf16", sources=[str(p) for p in _SOURCES], extra_cflags=_CFLAGS,
             extra_ldflags=_LDFLAGS, build_directory=str(directory), is_python_module=False,
             verbose=False)
    return getattr(torch.ops, _LIBRARY).linear_bf16


def _resolve() -> tuple[object, str | None]:
    problem = _cpu_problem()
    if problem is not None:
        return None, problem
    try:
        return _build(), None
    except Exception as e:  # a missing compiler or ninja, or a compile error: all mean fall back
        log.debug("building cpu_linear's extension failed", exc_info=True)
        return None, f"building the C++ extension failed: {_first_error(e)}"


def _first_error(e: Exception) -> str:
    """The line of a build failure that says what went wrong, not the command lines around it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    cause = next((line for line in lines[1:] if "error" in line.lower() or "not found" in line.lower()),
                 lines[0])
    return cause[:300]


def _extension():
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _resolve()
                if _state[1] is not None:
                    log.warning("cpu_linear falls back to PyTorch's F.linear: %s", _state[1])
    return _state


def cpu_linear_available() -> bool:
    """Whether the compiled kernel runs here (builds it on first call)."""
    return _extension()[0] is not None


def why_unavailable() -> str | None:
    """Why `cpu_linear` falls back to F.linear here, or None when it does not."""
    return _extension()[1]


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    # Cheap checks only (is_cpu, not device.type): at batch 1 a call lasts tens
    # of microseconds and Python overhead here is paid 121 times a token.
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        raise TypeError(f"cpu_linear takes bfloat16 x and weight, got {x.dtype} and {weight.dtype}")
    if not (x.is_cpu and weight.is_cpu):
        raise ValueError(f"cpu_linear runs on the CPU, got x on {x.device}, weight on {weight.device}")
    if x.dim() not in (2, 3) or weight.dim() != 2 or x.size(-1) != weight.size(1):
        raise ValueError(f"cpu_linear takes x (M, K) or (B, S, K) and weight (N, K), "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError("cpu_linear needs a contiguous (row-major) weight; call .contiguous() once "
                         "when loading it")


def cpu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for bf16 x (M, K) or (B, S, K) and bf16 weight (N, K) on the CPU.

    Accumulates in fp32 and returns bf16 (..., N). x is made contiguous (it is
    small); a non-contiguous weight is an error, since copying it on every
    call would cost more than the kernel saves. Beyond MAX_KERNEL_ROWS rows
    (prefill) it is PyTorch's F.linear.
    """
    _check_inputs(x, weight)
    op = _extension()[0]
    rows = x if x.dim() == 2 else x.flatten(0, -2)  # (M, K)
    if op is None or rows.size(0) > MAX_KERNEL_ROWS:
        return cpu_linear_ref(x, weight)
    y = op(rows.contiguous(), weight)  # (M, N)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.size(0))
