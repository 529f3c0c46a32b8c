"""The memory wall a run is set against, and where its figures come from.

A CPU's bandwidth varies from machine to machine and from hour to hour (these
2-core VMs have streamed 30 to 53 GB/s), and a wall below what the run
achieves makes every MBU wrong. So for a CPU profile `wallperf run` measures
the machine at its start (harness.hardware.probe: a read-only streaming pass
as decode reads weights, copy and triad for reference, GEMM peaks), in a few
seconds, or reuses a measurement of the same host from the last hour kept in
$WALLPERF_CACHE/hardware/, if the machine was quiet while it was taken
(harness.hardware.quiet: a wall measured beside other work is low, and an hour
of runs would be set against it). Before measuring, it waits up to
RUN_QUIET_WAIT_S for other work to end; measured anyway, the record says it
was not quiet. A GPU keeps its profile's vendor figures. Either
way a profile written by `wallperf probe --measured-wall` wins, and
`--wall-from-profile` takes the profile's figures as written, unmeasured.

`wallperf sweep` measures once, afresh (`fresh`: never the last hour's
measurement, which a busy hour leaves low), and gives every point's run that
one wall as a file (write_wall, read_wall), so all points and the sweep's front
share one yardstick.

Every run records the figures, how and when they were measured, their source
("measured", "measured profile" or "profile") and, for a wall given in a file,
which (`given_by`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from wallperf.harness.config import ConfigError, HardwareConfig, build, read_yaml
from wallperf.harness.hardware.peak_kernels import bf16_kernel
from wallperf.harness.hardware.probe import ProbeResult, ProbeSettings, measured_profile_path, probe
from wallperf.harness.loadgen.results import write_json_atomic

# How long a measurement of this host stands in for a new one.
MAX_AGE_S = 3600.0
# A few seconds on a 2-core CPU: arrays 8x its last-level cache, GEMMs big enough to reach the peak.
RUN_SETTINGS = ProbeSettings(array_mib=256, bandwidth_repeats=5, gemm_n=1536, gemm_repeats=3, gemm_warmup=1)
RUN_QUIET_WAIT_S = 20.0
SOURCES = ("measured", "measured profile", "profile")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


@dataclass(frozen=True)
class Wall:
    """The hardware figures a run is set against, with their provenance."""

    hardware: HardwareConfig
    source: str  # "measured", "measured profile" or "profile"
    how: str
    measured_at: float | None = None
    read_gbps: float | None = None
    copy_gbps: float | None = None
    triad_gbps: float | None = None
    # Where the run was given these figures instead of resolving them itself (read_wall).
    given_by: str | None = None
    # How quiet the machine was while measured (harness.hardware.quiet's to_dict); None when not measured here.
    quiet: dict | None = None
    # dtype -> the kernel whose peak peak_tflops[dtype] is (harness.hardware.peak_kernels); None when not measured.
    peak_kernels: dict | None = None

    def to_dict(self) -> dict:
        """results.json's `hardware_wall`, and a wall file's content (write_wall)."""
        when = None if self.measured_at is None else time.strftime(TIME_FORMAT, time.localtime(self.measured_at))
        return {"hardware": self.hardware.name, "source": self.source, "how": self.how, "measured_at": when,
                "bandwidth_gbps": self.hardware.bandwidth_gbps, "read_gbps": self.read_gbps,
                "copy_gbps": self.copy_gbps, "triad_gbps": self.triad_gbps,
                "peak_tflops": dict(self.hardware.peak_tflops), "peak_kernels": self.peak_kernels,
                "given_by": self.given_by, "quiet": self.quiet}


def host_id() -> str:
    """This machine: its host name and, where there is one, its machine id."""
    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = ""
    return hashlib.sha256(f"{socket.gethostname()}:{machine}".encode()).hexdigest()[:16]


def host_measurement_path() -> Path:
    from wallperf.harness.artifacts import cache_dir

    return cache_dir() / "hardware" / f"host-{host_id()}.json"


def store_host_measurement(result: ProbeResult) -> Path:
    """Keep a CPU measurement for runs on this host in the next hour."""
    path = host_measurement_path()
    record = {"host": host_id(), "threads": result.threads, "measured_at": result.measured_at, "how": result.method,
              "read_gbps": result.read_gbps, "copy_gbps": result.copy_gbps, "triad_gbps": result.triad_gbps,
              "peak_tflops": result.peak_tflops, "peak_kernels": result.peak_kernels,
              "quiet": result.quiet.to_dict()}
    write_json_atomic(path, record)
    return path


def recent_host_measurement(max_age_s: float = MAX_AGE_S) -> dict | None:
    """This host's stored measurement, if it is under `max_age_s` old, was taken on as
    many torch threads as this process runs (a measurement on one thread halves a 2-core
    machine's figures), on a quiet machine, and of the bf16 kernel this process runs (a run
    with WALLPERF_CPU_ISA=scalar stored the scalar kernel's 0.025 TFLOP/s, against the avx2
    path's 0.17 that the next plain run would have been held to)."""
    path = host_measurement_path()
    try:
        record = json.loads(path.read_text())
        fresh = (record["host"] == host_id() and record["threads"] == torch.get_num_threads()
                 and 0 <= time.time() - float(record["measured_at"]) < max_age_s
                 and record["quiet"]["quiet"] is True)
        fresh = fresh and (record.get("peak_kernels") or {}).get("bfloat16") == bf16_kernel()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if fresh else None


def _measure_host() -> dict:
    def waiting(busy):
        print(f"wallperf: other work keeps {busy:.1f} cores busy; waiting up to {RUN_QUIET_WAIT_S:.0f} s for "
              f"it to end before measuring the wall", file=sys.stderr, flush=True)

    print("wallperf: measuring this machine's memory bandwidth and compute peak (a few seconds; reused "
          "for an hour if the machine was quiet)", file=sys.stderr, flush=True)
    result = probe("cpu", settings=RUN_SETTINGS, quiet_wait_s=RUN_QUIET_WAIT_S, on_wait=waiting)
    if not result.quiet.quiet:
        print(f"wallperf: warning: the machine was not quiet while its wall was measured "
              f"({'; '.join(result.quiet.reasons)}): the wall is likely low and every MBU high",
              file=sys.stderr, flush=True)
    path = store_host_measurement(result)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_wall(configured: HardwareConfig, from_profile: bool = False, measure: bool = True,
             fresh: bool = False) -> Wall:
    """The figures a run on `configured` is set against (see the module docstring);
    with `measure` False, a CPU without a measurement from the last hour keeps the profile's;
    with `fresh`, a CPU is measured now even if it was in the last hour."""
    name = f"conf/hardware/{configured.name}.yaml"
    if from_profile:
        return Wall(configured, "profile", f"{name} as written (--wall-from-profile), not measured: "
                    + "; ".join(map(str, configured.sources)))
    written = measured_profile_path(configured.name)
    if written.is_file():
        measured = build(HardwareConfig, read_yaml(written), written)
        # The probe measures no fp8 math: whether the hardware has it stays the profile's say.
        peaks = {**configured.peak_tflops, **{k: v for k, v in measured.peak_tflops.items() if v is not None}}
        hardware = dataclasses.replace(configured, bandwidth_gbps=measured.bandwidth_gbps, peak_tflops=peaks,
                                       sources=measured.sources)
        return Wall(hardware, "measured profile", f"{written} (wallperf probe --measured-wall): "
                    + "; ".join(map(str, measured.sources)), measured_at=written.stat().st_mtime)
    if configured.vendor != "cpu":
        return Wall(configured, "profile", f"{name}: vendor figures, not measured (wallperf probe "
                    "--measured-wall replaces them)")
    record = (None if fresh else recent_host_measurement()) or (_measure_host() if measure else None)
    if not record:
        why = "could not be stored or read back" if measure else "not measured here in the last hour"
        return Wall(configured, "profile", f"{name}: this machine's bandwidth {why}")
    peaks = {**configured.peak_tflops, **{k: float(v) for k, v in record["peak_tflops"].items()}}
    bandwidth = max(float(record[k]) for k in ("read_gbps", "copy_gbps", "triad_gbps"))
    hardware = dataclasses.replace(configured, bandwidth_gbps=round(bandwidth, 2),
                                   peak_tflops=peaks, sources=[record["how"]])
    return Wall(hardware, "measured", record["how"], measured_at=float(record["measured_at"]),
                read_gbps=record["read_gbps"], copy_gbps=record["copy_gbps"], triad_gbps=record["triad_gbps"],
                quiet=record.get("quiet"), peak_kernels=record.get("peak_kernels"))


def write_wall(path: Path, wall: Wall) -> None:
    """`wall` as a file a run can be given (`wallperf run --wall-file`, read_wall)."""
    write_json_atomic(path, wall.to_dict())


def read_wall(path: Path, configured: HardwareConfig) -> Wall:
    """The wall write_wall put in `path`, for a run on `configured`, checked as any input is:
    its hardware must be the run's, its figures finite and positive."""
    def bad(key, message):
        return ConfigError(path, key, f"{message}; a wall file is written by `wallperf sweep` for its points")

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise bad(None, f"cannot read it: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(None, f"not a JSON wall ({e})") from None
    if not isinstance(data, dict):
        raise bad(None, "expected a JSON object")
    if data.get("hardware") != configured.name:
        raise bad("hardware", f"{data.get('hardware')!r} is not this run's hardware profile {configured.name!r}")
    if data.get("source") not in SOURCES:
        raise bad("source", f"{data.get('source')!r}; allowed: {', '.join(SOURCES)}")
    if not isinstance(data.get("how"), str) or not data["how"].strip():
        raise bad("how", "missing: say how the figures were measured")
    for key in ("bandwidth_gbps", "read_gbps", "copy_gbps", "triad_gbps"):
        value = data.get(key)
        if (value is not None or key == "bandwidth_gbps") and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
            raise bad(key, f"{value!r} is not a finite number of GB/s > 0")
    try:
        measured_at = None if data.get("measured_at") is None else datetime.strptime(
            data["measured_at"], TIME_FORMAT).timestamp()
    except (TypeError, ValueError):
        raise bad("measured_at", f"{data['measured_at']!r} is not a time like 2026-11-30T13:40:00+0000") from None
    hardware = build(HardwareConfig, {**dataclasses.asdict(configured), "bandwidth_gbps": data["bandwidth_gbps"],
                                      "peak_tflops": data.get("peak_tflops"), "sources": [data["how"]]}, path)
    return Wall(hardware, data["source"], data["how"], measured_at=measured_at, read_gbps=data.get("read_gbps"),
                copy_gbps=data.get("copy_gbps"), triad_gbps=data.get("triad_gbps"),
                quiet=data["quiet"] if isinstance(data.get("quiet"), dict) else None,
                peak_kernels=data["peak_kernels"] if isinstance(data.get("peak_kernels"), dict) else None,
                given_by=f"{path} (the wall `wallperf sweep` took once, at its start, for all its runs)")
