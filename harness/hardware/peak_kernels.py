"""The compute roof: the peak of the kernel the engine runs, per dtype.

An MFU means "this share of what the engine's own math could do here", so the
peak must be timed on that math, never on a library call the engine does not
make. On a CPU the bf16 math is, in order of preference:

- the compiled cpu_linear (kernels/cpu_linear.py, csrc/) on the instruction-set
  path it runs (`cpu_isa()`: avx2, avx512, avx512bf16, amx, neon, scalar),
  timed at a compute-bound shape: LINEAR_ROWS rows against an n x n weight,
  2 x rows FLOP per weight byte, far past any CPU's ridge point;
- torch.matmul in bf16 where the CPU has bf16 math (AVX512-BF16, AMX-BF16, Arm
  BF16: oneDNN runs it natively);
- otherwise torch.matmul in float32. Without bf16 math the engine's bf16 can go
  no faster than widening to fp32 and FMA, and torch's bf16 matmul there is an
  emulation 160 times slower than fp32 (0.00077 against 0.123 TFLOP/s on an AVX2
  Zen 3): as a roof it made an Offline run's MFU 897%.

float32 is torch.matmul (the engine's float32 runs eager PyTorch); a GPU times
torch.matmul in each dtype (cuBLAS/hipBLASLt are what its engine calls).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

# x86 flags for bf16 math, and Arm's (Features: bf16).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
LINEAR_ROWS = 256

COMPILED = "compiled"
MATMUL_BF16 = "matmul_bf16"
MATMUL_FP32 = "matmul_fp32"


def cpu_flags(cpuinfo: str | None = None) -> frozenset:
    """The CPU's feature flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo's text."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags) -> str | None:
    """The flag that gives this CPU bf16 math, or None."""
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)


def compiled_isa() -> str | None:
    """The instruction-set path of the compiled cpu_linear the engine runs, or None when
    it runs none here (the kernel cannot build or run, or predates `cpu_isa`)."""
    from wallperf.kernels import cpu_linear as module

    cpu_isa = getattr(module, "cpu_isa", None)
    if cpu_isa is None or not module.cpu_linear_available():
        return None
    return cpu_isa()


def bf16_choice(flags, isa: str | None) -> str:
    """Which bf16 math the engine runs on a CPU with `flags` and compiled path `isa`."""
    if isa is not None:
        return COMPILED
    return MATMUL_BF16 if native_bf16(flags) else MATMUL_FP32


def describe(choice: str, flags, isa: str | None) -> str:
    if choice == COMPILED:
        return f"cpu_linear, compiled, {isa} path ({LINEAR_ROWS} rows, compute-bound)"
    if choice == MATMUL_BF16:
        return f"torch.matmul bfloat16 (native bf16 math: {native_bf16(flags)})"
    return ("torch.matmul float32: this CPU has no bf16 math (no " + ", ".join(NATIVE_BF16_FLAGS)
            + ") and no compiled kernel, so bf16 runs no faster than fp32 FMA")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timings(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    import time

    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _matmul(device: torch.device, dtype: torch.dtype, n: int):
    x = torch.randn(n, n, device=device).to(dtype)
    y = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.matmul(x, y, out=out)), 2 * n**3


def _linear(n: int):
    from wallperf.kernels.cpu_linear import cpu_linear

    rows = min(LINEAR_ROWS, n)
    x = torch.randn(rows, n).to(torch.bfloat16)
    w = torch.randn(n, n).to(torch.bfloat16)
    return (lambda: cpu_linear(x, w)), 2 * rows * n * n


# peak()'s `isa` when not given: the path this machine's compiled kernel runs, if any.
THIS_MACHINE = "this machine"


def peak(device: torch.device, dtype: str, n: int, repeats: int, warmup: int,
         flags=None, isa: str | None = THIS_MACHINE) -> tuple[float, str, list[float]]:
    """(median TFLOP/s, the kernel timed, the repeats' seconds) of the engine's `dtype` math;
    on a CPU `flags` and `isa` (None: no compiled kernel) default to this machine's."""
    flops, kernel, times = timed(device, dtype, n, repeats, warmup, flags, isa)
    return flops / statistics.median(times) / 1e12, kernel, times


def best_peak(device: torch.device, dtype: str, n: int, repeats: int, warmup: int) -> float:
    """The best TFLOP/s of `repeats` calls of the engine's `dtype` math on this machine: a
    roof, which a call slowed by other work on the cores would understate (a 2-core VM's
    medians spread 0.074-0.167 TFLOP/s while it was shared)."""
    flops, _, times = timed(device, dtype, n, repeats, warmup)
    return flops / min(times) / 1e12


def bf16_kernel(flags=None, isa: str | None = THIS_MACHINE) -> str:
    """The bf16 kernel whose peak a CPU probe measures in this process (WALLPERF_CPU_ISA counts)."""
    flags = cpu_flags() if flags is None else flags
    isa = compiled_isa() if isa == THIS_MACHINE else isa
    return describe(bf16_choice(flags, isa), flags, isa)


def timed(device: torch.device, dtype: str, n: int, repeats: int, warmup: int,
          flags=None, isa: str | None = THIS_MACHINE) -> tuple[float, str, list[float]]:
    """(FLOPs per call, the kernel timed, the repeats' seconds) of the engine's `dtype` math."""
    if device.type == "cpu" and dtype == "bfloat16":
        flags = cpu_flags() if flags is None else flags
        isa = compiled_isa() if isa == THIS_MACHINE else isa
        choice, kernel = bf16_choice(flags, isa), bf16_kernel(flags, isa)
        if choice == COMPILED:
            fn, flops = _linear(n)
        else:
            fn, flops = _matmul(device, torch.bfloat16 if choice == MATMUL_BF16 else torch.float32, n)
    else:
        fn, flops = _matmul(device, getattr(torch, dtype), n)
        kernel = f"torch.matmul {dtype}"
    return flops, kernel, timings(fn, device, repeats, warmup)
