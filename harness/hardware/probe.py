"""`wallperf probe`: measure this machine's memory bandwidth and GEMM peak.

A CPU's memory wall is its measured bandwidth, not a datasheet figure, so the
probe measures what the roofline needs and writes it as a hardware profile
(the schema of conf/hardware) under $WALLPERF_CACHE/hardware/: cpu.yaml, or
local-gpu.yaml when torch sees a GPU.

- Bandwidth: STREAM's copy (a = b) and triad (a = b + s*c) kernels on arrays
  far larger than the last-level cache, best of N as STREAM reports it, bytes
  counted as STREAM does (2 and 3 arrays moved; write-allocate traffic not
  counted). torch runs them on all its threads (numpy's copy is one thread).
  The profile's bandwidth is the better of the two.
- Compute: torch.matmul on square matrices per dtype, after warm-up, median
  of N, at 2*n^3 FLOPs per product. fp8 is left null: measuring it needs
  scaled-matmul kernels per vendor, and the CPU has no fp8 math.

Timing on a GPU synchronizes before the clock starts and before it stops.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

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

# A load average this high means other work kept a CPU busy while probing.
BUSY_LOAD_AVERAGE = 1.0

CPU_DTYPES = ("float32", "bfloat16")
# float16 matmul on CPU is slow and not what the engine runs there.
GPU_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ProbeResult:
    name: str
    description: str
    vendor: str
    memory_gb: float
    copy_gbps: float
    triad_gbps: float
    peak_tflops: dict
    threads: int | None  # CPU threads torch ran on; None on a GPU
    settings: ProbeSettings
    # The 1-minute load average before measuring: other work on the machine
    # lowers every figure (on a CPU, OpenMP threads then wait on each other).
    load_average: float

    @property
    def bandwidth_gbps(self) -> float:
        return max(self.copy_gbps, self.triad_gbps)

    def profile(self) -> dict:
        """The measured figures as a conf/hardware mapping (HardwareConfig's keys)."""
        s = self.settings
        threads = f", {self.threads} threads" if self.threads else ""
        method = (f"wallperf probe {time.strftime('%Y-%m-%d')}, torch {torch.__version__}{threads}: "
                  f"STREAM copy {self.copy_gbps:.1f} GB/s and triad {self.triad_gbps:.1f} GB/s over "
                  f"{s.array_mib} MiB arrays (best of "
                  f"{s.bandwidth_repeats}); torch.matmul n={s.gemm_n}, median of {s.gemm_repeats}; "
                  f"load average {self.load_average:.1f} before")
        return {
            "name": self.name,
            "description": self.description,
            "vendor": self.vendor,
            "memory_gb": round(self.memory_gb, 1),
            "bandwidth_gbps": round(self.bandwidth_gbps, 1),
            "peak_tflops": {**{k: float(f"{v:.4g}") for k, v in self.peak_tflops.items()}, "fp8": None},
            "fp8_format": None,
            "sources": [method],
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timings(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
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


def stream_bandwidth(device: torch.device, array_mib: int, repeats: int) -> tuple[float, float]:
    """(copy, triad) GB/s, best of `repeats`, on float32 arrays of `array_mib` MiB each."""
    n = array_mib * MIB // 4
    # Filled, not torch.empty: untouched pages would be faulted in on the first timed pass.
    a = torch.full((n,), 1.0, device=device)
    b = torch.full((n,), 2.0, device=device)
    c = torch.full((n,), 0.5, device=device)
    nbytes = n * 4
    copy = min(_timings(lambda: a.copy_(b), device, repeats))
    triad = min(_timings(lambda: torch.add(b, c, alpha=TRIAD_SCALAR, out=a), device, repeats))
    return 2 * nbytes / copy / 1e9, 3 * nbytes / triad / 1e9


def gemm_tflops(device: torch.device, dtype: str, n: int, repeats: int, warmup: int) -> float:
    """Median TFLOP/s of an n x n x n matmul in `dtype`."""
    x = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    y = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    out = torch.empty(n, n, device=device, dtype=x.dtype)
    seconds = statistics.median(_timings(lambda: torch.matmul(x, y, out=out), device, repeats, warmup))
    return 2 * n**3 / seconds / 1e12


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


def probe(device: str = "auto", quick: bool = False) -> ProbeResult:
    """Measure `device` ("cpu", "cuda", or "auto": the GPU when torch sees one)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    load_average = os.getloadavg()[0]
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        settings = GPU_QUICK_SETTINGS if quick else GPU_SETTINGS
        name, description, dtypes = "local-gpu", f"{props.name} (measured)", GPU_DTYPES
        vendor = "amd" if torch.version.hip else "nvidia"
        memory_gb = props.total_memory / 1e9
    else:
        settings = CPU_QUICK_SETTINGS if quick else CPU_SETTINGS
        name, dtypes, vendor = "cpu", CPU_DTYPES, "cpu"
        description = f"{_cpu_name()}, {os.cpu_count()} CPUs (measured)"
        memory_gb = _physical_memory_gb()
    copy, triad = stream_bandwidth(dev, settings.array_mib, settings.bandwidth_repeats)
    peaks = {dt: gemm_tflops(dev, dt, settings.gemm_n, settings.gemm_repeats, settings.gemm_warmup)
             for dt in dtypes}
    return ProbeResult(name=name, description=description, vendor=vendor, memory_gb=memory_gb,
                       copy_gbps=copy, triad_gbps=triad, peak_tflops=peaks,
                       threads=torch.get_num_threads() if dev.type == "cpu" else None, settings=settings, load_average=load_average)


def measured_profile_path(name: str) -> Path:
    """Where `wallperf probe` keeps the measured profile `name` (cpu or local-gpu)."""
    from harness.artifacts import cache_dir

    return cache_dir() / "hardware" / f"{name}.yaml"


def write_profile(result: ProbeResult, path: Path | None = None) -> Path:
    """Write the profile atomically (temp file beside it, then rename): a reader, or a
    probe interrupted half-way, never leaves a half-written profile behind."""
    path = path or measured_profile_path(result.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# Written by `wallperf probe`; run it again to refresh. Edits are overwritten.\n"
            + yaml.safe_dump(result.profile(), sort_keys=False, width=120))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def format_result(result: ProbeResult) -> str:
    s = result.settings
    gemm = "  ".join(f"{dt} {tf:.3g} TFLOP/s" for dt, tf in result.peak_tflops.items())
    return "\n".join((
        f"{result.name}: {result.description}, {result.memory_gb:.1f} GB"
        + (f", {result.threads} threads" if result.threads else ""),
        f"  bandwidth  copy {result.copy_gbps:.1f} GB/s  triad {result.triad_gbps:.1f} GB/s  "
        f"({s.array_mib} MiB arrays, best of {s.bandwidth_repeats})",
        f"  GEMM       {gemm}  (n={s.gemm_n}, median of {s.gemm_repeats})",
    ))


def add_probe_parser(subparsers):
    p = subparsers.add_parser(
        "probe", help="measure this machine's bandwidth and GEMM peak into a hardware profile",
        description="Measure STREAM copy/triad bandwidth and torch.matmul peak per dtype, and write "
                    "them as the hardware profile cpu (or local-gpu) under $WALLPERF_CACHE/hardware/.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="what to measure (default: the GPU when torch sees one, else the CPU)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke test, "
                   "not figures to rely on")
    return p


def cmd_probe(args) -> int:
    from harness.config import ConfigError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("command line", "--device", "torch sees no GPU here; allowed: auto, cpu")
    result = probe(args.device, args.quick)
    path = write_profile(result)
    print(format_result(result))
    if result.load_average >= BUSY_LOAD_AVERAGE:
        print(f"wallperf: warning: the load average was {result.load_average:.1f} before probing: other "
              f"work shared the machine and the figures are likely low; probe again when it is idle",
              file=sys.stderr)
    print(f"wallperf: wrote {path}", file=sys.stderr)
    return 0
