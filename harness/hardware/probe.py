"""`wallperf probe`: measure this machine's memory bandwidth and GEMM peak.

A CPU's memory wall is its measured bandwidth, not a datasheet figure, so the
probe measures what the roofline needs. `wallperf run` measures the same at
its start (harness.hardware.wall), reusing a measurement of this host from the
last hour. `wallperf probe --measured-wall` writes the figures as a hardware
profile (the schema of conf/hardware) under $WALLPERF_CACHE/hardware/, which
then replaces the named profile's figures for runs on this machine (a GPU's
vendor figure included).

- Bandwidth: read-only streaming kernels, as decode reads its weights and
  writes next to nothing: the sum of one array, and on a CPU the compiled bf16
  GEMV the engine decodes with (kernels/cpu_linear.py) at batch 1 over a
  matrix of that size; the better of the two. For reference, STREAM's copy
  (a = b) and triad (a = b + s*c), on arrays far larger than the last-level
  cache, best of N as STREAM reports it, bytes counted as STREAM does (1, 2
  and 3 arrays moved; write-allocate traffic not counted). torch runs them on
  all its threads (numpy's copy is one thread). The wall is the read figure (or
  copy/triad, should a busy machine make one of them come out higher).
- Compute: the peak of the kernel the engine runs, per dtype, after warm-up,
  median of N (harness.hardware.peak_kernels chooses and times it). float32 is
  torch.matmul; bf16 on a CPU is the compiled cpu_linear at a compute-bound
  shape where it runs, torch.matmul in bf16 where the CPU has bf16 math, and
  otherwise torch.matmul in float32: with neither, the engine's bf16 math can
  go no faster than fp32 FMA, and torch's bf16 matmul there (no native path:
  0.00077 TFLOP/s on an AVX2 Zen 3) is no roof at all (an MFU of 897% came of
  it). The record names each peak's kernel. fp8 is left null: measuring it
  needs scaled-matmul kernels per vendor, and the CPU has no fp8 math.
- Quiet: figures measured while other work shares the cores are low (12.6 GB/s
  against 22.3 idle on one VM). The probe first waits, up to a bound, for the
  machine to be quiet (harness.hardware.quiet), then checks its own repeats'
  spread; the record says whether it was quiet and why not.

Timing on a GPU synchronizes before the clock starts and before it stops.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from wallperf.harness.hardware.peak_kernels import peak, timings
from wallperf.harness.hardware.quiet import Quiet, spread, wait_for_quiet
from wallperf.harness.loadgen.results import write_text_atomic

MIB = 1 << 20
TRIAD_SCALAR = 3.0


@dataclass(frozen=True)
class ProbeSettings:
    array_mib: int
    bandwidth_repeats: int
    gemm_n: int
    gemm_repeats: int
    gemm_warmup: int = 2


# Arrays must dwarf the caches (32 MiB L3 here; 256 MiB Infinity Cache on MI300X)
# or the probe measures cache bandwidth; --quick keeps just above a CPU's L3.
CPU_SETTINGS = ProbeSettings(array_mib=256, bandwidth_repeats=10, gemm_n=2048, gemm_repeats=5)
CPU_QUICK_SETTINGS = ProbeSettings(array_mib=64, bandwidth_repeats=3, gemm_n=256, gemm_repeats=3, gemm_warmup=1)
GPU_SETTINGS = ProbeSettings(array_mib=1024, bandwidth_repeats=20, gemm_n=8192, gemm_repeats=20, gemm_warmup=3)
GPU_QUICK_SETTINGS = ProbeSettings(array_mib=1024, bandwidth_repeats=3, gemm_n=2048, gemm_repeats=3, gemm_warmup=1)

# How long `wallperf probe` waits for other work to end before measuring anyway (and saying so).
QUIET_WAIT_S = 60.0

CPU_DTYPES = ("float32", "bfloat16")
# float16 matmul on CPU is slow and not what the engine runs there.
GPU_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ProbeResult:
    name: str
    description: str
    vendor: str
    memory_gb: float
    read_gbps: float
    copy_gbps: float
    triad_gbps: float
    peak_tflops: dict
    threads: int | None  # CPU threads torch ran on; None on a GPU
    settings: ProbeSettings
    # Whether other work shared the machine (before, and in the repeats' spread): it
    # lowers every figure (on a CPU, OpenMP threads then wait on each other).
    quiet: Quiet
    # When it was measured (seconds since the epoch).
    measured_at: float = 0.0
    # dtype -> the kernel whose peak peak_tflops[dtype] is (harness.hardware.peak_kernels).
    peak_kernels: dict | None = None

    @property
    def load_average(self) -> float:
        return self.quiet.load_1min

    @property
    def bandwidth_gbps(self) -> float:
        """The wall: the highest bandwidth the machine was seen to stream. Decode streams
        weights in, like the read-only pass, but copy or triad can come out higher (a busy
        read pass, or a read kernel that streams less well than STREAM's on this machine:
        48.3 GB/s read against 58.7 GB/s triad on one idle 2-core VM), and a wall below what
        the machine can move would let an MBU overstate."""
        return max(self.read_gbps, self.copy_gbps, self.triad_gbps)

    @property
    def method(self) -> str:
        """How the figures were measured, in one line."""
        s = self.settings
        threads = f", {self.threads} threads" if self.threads else ""
        kernels = "; ".join(f"{dt}: {k}" for dt, k in (self.peak_kernels or {}).items()) or "torch.matmul"
        return (f"wallperf probe, torch {torch.__version__}{threads}: read-only {self.read_gbps:.1f} GB/s, "
                f"STREAM copy {self.copy_gbps:.1f} GB/s and triad {self.triad_gbps:.1f} GB/s over "
                f"{s.array_mib} MiB arrays (best of {s.bandwidth_repeats}); peaks n={s.gemm_n}, "
                f"median of {s.gemm_repeats} ({kernels}); load average {self.load_average:.1f} before; "
                f"{self.quiet.summary()}")

    def profile(self, name: str | None = None) -> dict:
        """The measured figures as a conf/hardware mapping (HardwareConfig's keys), named `name`."""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.measured_at))
        return {
            "name": name or self.name,
            "description": self.description,
            "vendor": self.vendor,
            "memory_gb": round(self.memory_gb, 1),
            "bandwidth_gbps": round(self.bandwidth_gbps, 1),
            "peak_tflops": {**{k: float(f"{v:.4g}") for k, v in self.peak_tflops.items()}, "fp8": None},
            "fp8_format": None,
            "sources": [f"{self.method}; measured {when}"],
        }


def read_bandwidth(device: torch.device, array_mib: int, repeats: int, spreads: dict | None = None) -> float:
    """GB/s of the faster read-only pass over `array_mib` MiB, best of `repeats` each:
    torch.sum of a float32 array, and on a CPU with the compiled kernel a bf16 GEMV.
    Each pass's repeat spread goes into `spreads`."""
    spreads = {} if spreads is None else spreads
    a = torch.full((array_mib * MIB // 4,), 1.0, device=device)
    times = timings(lambda: torch.sum(a), device, repeats)
    spreads["read (sum)"] = spread(times)
    best = a.numel() * 4 / min(times) / 1e9
    del a
    from wallperf.kernels.cpu_linear import cpu_linear, cpu_linear_available

    if device.type == "cpu" and cpu_linear_available():
        cols = 4096
        w = torch.full((array_mib * MIB // 2 // cols, cols), 0.5, dtype=torch.bfloat16)
        x = torch.ones(1, cols, dtype=torch.bfloat16)
        times = timings(lambda: cpu_linear(x, w), device, repeats)
        spreads["read (GEMV)"] = spread(times)
        best = max(best, w.numel() * 2 / min(times) / 1e9)
    return best


def stream_bandwidth(device: torch.device, array_mib: int, repeats: int,
                     spreads: dict | None = None) -> tuple[float, float]:
    """(copy, triad) GB/s, best of `repeats`, on float32 arrays of `array_mib` MiB each;
    their repeat spreads go into `spreads`."""
    n = array_mib * MIB // 4
    # Filled, not torch.empty: untouched pages would be faulted in on the first timed pass.
    a = torch.full((n,), 1.0, device=device)
    b = torch.full((n,), 2.0, device=device)
    c = torch.full((n,), 0.5, device=device)
    nbytes = n * 4
    copy = timings(lambda: a.copy_(b), device, repeats)
    triad = timings(lambda: torch.add(b, c, alpha=TRIAD_SCALAR, out=a), device, repeats)
    if spreads is not None:
        spreads.update({"copy": spread(copy), "triad": spread(triad)})
    return 2 * nbytes / min(copy) / 1e9, 3 * nbytes / min(triad) / 1e9


def gemm_tflops(device: torch.device, dtype: str, n: int, repeats: int, warmup: int) -> float:
    """Median TFLOP/s of the engine's `dtype` math at size n (harness.hardware.peak_kernels):
    on a CPU without bf16 math, bf16's is fp32 FMA's, never torch's emulated bf16 matmul."""
    return peak(device, dtype, n, repeats, warmup)[0]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "host CPU"


def _physical_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def probe(device: str = "auto", quick: bool = False, settings: ProbeSettings | None = None,
          quiet_wait_s: float = 0.0, on_wait=None) -> ProbeResult:
    """Measure `device` ("cpu", "cuda", or "auto": the GPU when torch sees one), with
    `settings`, or the full (or `quick`) ones of the device, after waiting up to
    `quiet_wait_s` for other work to leave the CPUs (`on_wait(busy_cores)` is told when
    it waits); the result says how quiet it was (harness.hardware.quiet)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    quiet = wait_for_quiet(quiet_wait_s, on_wait=on_wait)
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        settings = settings or (GPU_QUICK_SETTINGS if quick else GPU_SETTINGS)
        name, description, dtypes = "local-gpu", f"{props.name} (measured)", GPU_DTYPES
        vendor = "amd" if torch.version.hip else "nvidia"
        memory_gb = props.total_memory / 1e9
    else:
        settings = settings or (CPU_QUICK_SETTINGS if quick else CPU_SETTINGS)
        name, dtypes, vendor = "cpu", CPU_DTYPES, "cpu"
        description = f"{_cpu_name()}, {os.cpu_count()} CPUs (measured)"
        memory_gb = _physical_memory_gb()
    measured_at = time.time()
    spreads = {}
    read = read_bandwidth(dev, settings.array_mib, settings.bandwidth_repeats, spreads)
    copy, triad = stream_bandwidth(dev, settings.array_mib, settings.bandwidth_repeats, spreads)
    peaks, kernels = {}, {}
    for dt in dtypes:
        peaks[dt], kernels[dt], times = peak(dev, dt, settings.gemm_n, settings.gemm_repeats, settings.gemm_warmup)
        spreads[f"{dt} peak"] = spread(times)
    return ProbeResult(name=name, description=description, vendor=vendor, memory_gb=memory_gb,
                       read_gbps=read, copy_gbps=copy, triad_gbps=triad, peak_tflops=peaks,
                       threads=torch.get_num_threads() if dev.type == "cpu" else None, settings=settings,
                       quiet=quiet.with_spreads(spreads), measured_at=measured_at, peak_kernels=kernels)


def measured_profile_path(name: str) -> Path:
    """Where `wallperf probe` keeps the measured profile `name` (cpu or local-gpu)."""
    from wallperf.harness.artifacts import cache_dir

    return cache_dir() / "hardware" / f"{name}.yaml"


def write_profile(result: ProbeResult, path: Path | None = None, name: str | None = None) -> Path:
    """Write the profile, named `name` (default: the result's), atomically (temp file
    beside it, then rename): a reader, or a probe interrupted half-way, never leaves a
    half-written profile behind."""
    path = path or measured_profile_path(name or result.name)
    text = ("# Written by `wallperf probe --measured-wall`; run it again to refresh. Edits are overwritten.\n"
            + yaml.safe_dump(result.profile(name), sort_keys=False, width=120))
    write_text_atomic(path, text)
    return path
