"""y = x @ W^T in bf16 on the CPU, near the memory wall, on every common CPU.

At batch 1 a linear layer reads every weight once and does two FLOPs with it,
so its speed is the speed of streaming W from DRAM. The compiled kernels in
csrc/ do that for each instruction set; which one runs is chosen here, once
per process, from the CPU's flags in /proc/cpuinfo (the first this CPU
executes):

  avx512bf16  AVX512-BF16 dot products (csrc/isa_avx512bf16.cpp)
  avx512      AVX-512F: bf16 widened to fp32 in registers, fp32 FMAs
  avx2        AVX2 + FMA: the same on 256-bit vectors
  neon        AArch64 Advanced SIMD: the same on 128-bit vectors
  scalar      portable C++, any CPU

The last four are one source (csrc/isa_portable.cpp over csrc/simd.h)
compiled once per instruction set with its -m flags. `WALLPERF_CPU_ISA=<path>`
forces a path (tests, measurements); a path this CPU cannot execute is refused
with an error naming it. (`amx` is reserved for AMX-BF16 prefill tiles, which
are not written yet, and is refused too.) `cpu_isa()` names the path in use.

Each path is compiled on first use with torch.utils.cpp_extension into
$WALLPERF_CACHE/torch_extensions (default ~/.cache/wallperf/torch_extensions),
once per path and torch version, and registers its ops as
torch.ops.wallperf_<path>. Where no compiled path runs (no compiler or ninja,
a failed build) `cpu_linear` falls back to `cpu_linear_ref`, PyTorch's
F.linear, and one warning says why; `why_unavailable()` gives the same reason.
The inputs are checked the same way on every path.

Prefill: on avx512bf16 PyTorch's own bf16 GEMM (oneDNN) takes x beyond
MAX_KERNEL_ROWS rows; on the other paths PyTorch has no fast bf16 GEMM (on
AVX2 it ran 0.8 GFLOP/s), so the op packs W for the call and runs the packed
GEMM of the fused decode step.

Inference only: the op has no autograd formula.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import threading
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

cpu_linear_ref = F.linear

_CSRC = Path(__file__).parent / "csrc"
_PORTABLE = _CSRC / "isa_portable.cpp"
_AVX512BF16 = _CSRC / "isa_avx512bf16.cpp"
# Every C++ source and header the paths are built from (package data).
_SOURCES = tuple(sorted(_CSRC.glob("*.cpp")) + sorted(_CSRC.glob("*.h")))

# Path -> (the /proc/cpuinfo flags it needs, its source, its compiler flags).
# x86 flag names as Linux spells them; "asimd" is AArch64's Advanced SIMD.
ISAS = {
    "scalar": ((), _PORTABLE, []),
    "avx2": (("avx2", "fma"), _PORTABLE, ["-DWALLPERF_ISA_AVX2", "-mavx2", "-mfma"]),
    "avx512": (("avx512f",), _PORTABLE, ["-DWALLPERF_ISA_AVX512", "-mavx512f", "-mavx2", "-mfma"]),
    "avx512bf16": (("avx512f", "avx512bw", "avx512vl", "avx512_bf16"), _AVX512BF16, []),
    "neon": (("asimd",), _PORTABLE, ["-DWALLPERF_ISA_NEON"]),
}
# Reserved in WALLPERF_CPU_ISA's vocabulary, with the reason it is refused.
_NOT_BUILT = {"amx": "AMX-BF16 prefill tiles are not written yet; avx512bf16 runs on AMX CPUs"}
# Preference when nothing is forced: the fastest path the CPU executes.
_PREFERENCE = ("avx512bf16", "avx512", "avx2", "neon", "scalar")
_X86_ONLY = {"avx2", "avx512", "avx512bf16"}

_TORCH_LIB = Path(torch.__file__).parent / "lib"
# -fopenmp for the pragmas, but link torch's own libgomp rather than the
# compiler's: one OpenMP runtime in the process, one thread pool, no
# oversubscription (torch 2.x CPU wheels ship and use libgomp.so.1).
# Hidden symbols: every path's library defines the same inline kernels, each
# compiled for its own instruction set, and none may bind to another's.
# No contraction of a * b + c into an FMA: each path's sums stay in the
# order its source writes, whatever the compiler's choices per call site.
_CFLAGS = ["-O3", "-fopenmp", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-ffp-contract=off"]
_LDFLAGS = [f"-L{_TORCH_LIB}", "-l:libgomp.so.1", f"-Wl,-rpath,{_TORCH_LIB}"]

# Beyond this many rows of x (prefill) the avx512bf16 path hands the GEMM to
# PyTorch, which reuses each loaded weight across many rows. Its kernel reads W
# once per 8 rows; at 16 it tied F.linear with W in cache and led it 1.4x with
# W in DRAM; at 32 it lost in cache and tied in DRAM (2-core Zen 4).
MAX_KERNEL_ROWS = 16

_lock = threading.RLock()  # _resolve builds through isa_ops, which takes it too
# None until the first call resolves it; then (isa or None, ops or None, reason or None).
_state: tuple[str | None, object, str | None] | None = None
_built: dict[str, object] = {}


class CpuIsaError(RuntimeError):
    """WALLPERF_CPU_ISA names a path that is unknown or that this CPU cannot execute."""


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _machine() -> str:
    return os.uname().machine


def isa_problem(isa: str) -> str | None:
    """Why this CPU cannot execute path `isa`, or None when it can."""
    if isa in _NOT_BUILT:
        return _NOT_BUILT[isa]
    if isa not in ISAS:
        return f"unknown path {isa!r} (one of {', '.join([*ISAS, *_NOT_BUILT])})"
    machine = _machine()
    if isa in _X86_ONLY and machine not in ("x86_64", "AMD64"):
        return f"{isa} is an x86-64 path and this CPU is {machine}"
    if isa == "neon" and machine not in ("aarch64", "arm64"):
        return f"neon is an AArch64 path and this CPU is {machine}"
    missing = [f for f in ISAS[isa][0] if f not in _cpu_flags()]
    return f"the CPU lacks {', '.join(missing)} (see /proc/cpuinfo)" if missing else None


def executable_isas() -> list[str]:
    """The compiled paths this CPU executes, fastest first."""
    return [isa for isa in _PREFERENCE if isa_problem(isa) is None]


def _build_directory(isa: str) -> Path:
    cache = Path(os.environ.get("WALLPERF_CACHE", Path.home() / ".cache" / "wallperf"))
    # The extension links against torch's C++ ABI: one build per torch version. And
    # one per content of csrc/: a checkout and an installed wheel of another version
    # share the cache, and torch's own check hashes the .cpp files, not the headers.
    version = torch.__version__.replace("+", "_")
    return cache / "torch_extensions" / f"cpu_{isa}-torch{version}-{_sources_digest()}"


@functools.lru_cache(maxsize=1)
def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(_CSRC.glob("*.[ch]*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def isa_ops(isa: str):
    """torch.ops.wallperf_<isa>, compiling (or reusing) its library; raises
    CpuIsaError where this CPU cannot execute it, and the build's error where
    it does not build."""
    problem = isa_problem(isa)
    if problem is not None:
        raise CpuIsaError(f"the {isa} CPU kernels cannot run here: {problem}")
    with _lock:
        if isa not in _built:
            _build(isa)
            _built[isa] = getattr(torch.ops, f"wallperf_{isa}")
    return _built[isa]


def _build(isa: str) -> None:
    from torch.utils.cpp_extension import load

    _, source, flags = ISAS[isa]
    directory = _build_directory(isa)
    directory.mkdir(parents=True, exist_ok=True)
    # flock, unlike torch's own lock file, is released when its holder dies, so
    # a build killed half-way cannot leave the next process waiting forever.
    with open(directory / "build.flock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        # Holding the flock, nobody else is building: a torch lock file left
        # here is stale and would make load() wait on it forever.
        (directory / "lock").unlink(missing_ok=True)
        load(name=f"wallperf_cpu_{isa}", sources=[str(source)],
             extra_cflags=[*_CFLAGS, *flags, f"-DWALLPERF_OPS_NS=wallperf_{isa}"], extra_ldflags=_LDFLAGS,
             extra_include_paths=[str(_CSRC)], build_directory=str(directory), is_python_module=False,
             verbose=False)


def forced_isa_problem() -> str | None:
    """Why WALLPERF_CPU_ISA's path is refused here (one line, saying what to do), or
    None when it is unset or this CPU executes it; commands check it before work starts."""
    forced = os.environ.get("WALLPERF_CPU_ISA", "").strip()
    problem = isa_problem(forced) if forced else None
    if problem is None:
        return None
    return f"WALLPERF_CPU_ISA={forced} is refused: {problem}; unset it or choose one of {', '.join(executable_isas())}"


def _resolve() -> tuple[str | None, object, str | None]:
    forced = os.environ.get("WALLPERF_CPU_ISA", "").strip()
    if forced:
        problem = forced_isa_problem()
        if problem is not None:
            raise CpuIsaError(problem)
        candidates = [forced]
    else:
        candidates = executable_isas()
    reasons = []
    for isa in candidates:
        try:
            return isa, isa_ops(isa), None
        except Exception as e:  # a missing compiler or ninja, or a compile error: try the next path
            log.debug("building the %s CPU kernels failed", isa, exc_info=True)
            reasons.append(f"{isa}: building the C++ extension failed: {_first_error(e)}")
    return None, None, "; ".join(reasons) or "no compiled path runs on this CPU"


def _first_error(e: Exception) -> str:
    """The line of a build failure that says what went wrong, not the command lines around it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    cause = next((line for line in lines[1:] if "error" in line.lower() or "not found" in line.lower()),
                 lines[0])
    return cause[:300]


def _extension():
    """(the ops of the path in use or None, why there is none or None)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _resolve()
                if _state[2] is not None:
                    log.warning("cpu_linear falls back to PyTorch's F.linear: %s", _state[2])
    return _state[1], _state[2]


def cpu_isa() -> str:
    """The path the CPU kernels take in this process (avx512bf16, avx512, avx2,
    neon, scalar), or "torch" where none runs and PyTorch's ops stand in."""
    _extension()
    return _state[0] or "torch"


def cpu_linear_available() -> bool:
    """Whether a compiled kernel runs here (builds it on first call)."""
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
    (prefill) it is PyTorch's F.linear on the avx512bf16 path and the packed
    GEMM on the others.
    """
    _check_inputs(x, weight)
    ops = _extension()[0]
    rows = x if x.dim() == 2 else x.flatten(0, -2)  # (M, K)
    if ops is None or (rows.size(0) > MAX_KERNEL_ROWS and _state[0] == "avx512bf16"):
        return cpu_linear_ref(x, weight)
    if rows.size(0) > MAX_KERNEL_ROWS:
        y = ops.linear_packed_bf16(rows.contiguous(), _packed(ops, weight), weight.size(0))
    else:
        y = ops.linear_bf16(rows.contiguous(), weight)  # (M, N)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.size(0))


# weight -> (its version counter, its ops, its packing), for prefill off the
# avx512bf16 path: packing a weight costs 8-25% of one 300-row GEMM with it
# (AVX2), and prefill multiplies the same weights again and again. The cost is
# a second copy of every weight prefill touches, as the fused decode step keeps.
_packs: dict[int, tuple[int, object, torch.Tensor]] = {}


def _packed(ops, weight: torch.Tensor) -> torch.Tensor:
    key = id(weight)
    hit = _packs.get(key)
    if hit is not None and hit[0] == weight._version and hit[1] is ops:
        return hit[2]
    packed = ops.pack_bf16(weight)
    if hit is None:
        # Dropped with the weight, so a new tensor at the same address never reads a stale pack.
        weakref.finalize(weight, _packs.pop, key, None)
    _packs[key] = (weight._version, ops, packed)
    return packed
