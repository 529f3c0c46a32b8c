"""The memory wall a run is set against, and where its figures come from.

A CPU's bandwidth varies from machine to machine and from hour to hour (these
2-core VMs have streamed 30 to 53 GB/s), and a wall below what the run
achieves makes every MBU wrong. So for a CPU profile `wallperf run` measures
the machine at its start (harness.hardware.probe: a read-only streaming pass
as decode reads weights, copy and triad for reference, GEMM peaks), in a few
seconds, or reuses a measurement of the same host from the last hour kept in
$WALLPERF_CACHE/hardware/. A GPU keeps its profile's vendor figures. Either
way a profile written by `wallperf probe --measured-wall` wins, and
`--wall-from-profile` (run YAML `wall: profile`) takes the profile's figures
as written, unmeasured.

Every run records the figures, how and when they were measured, and their
source: "measured", "measured profile" or "profile".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.config import HardwareConfig, build, read_yaml
from harness.hardware.probe import ProbeResult, ProbeSettings, measured_profile_path, probe, write_text_atomic

# How long a measurement of this host stands in for a new one.
MAX_AGE_S = 3600.0
# A few seconds on a 2-core CPU: arrays 8x its last-level cache, GEMMs big enough to reach the peak.
RUN_SETTINGS = ProbeSettings(array_mib=256, bandwidth_repeats=5, gemm_n=1536, gemm_repeats=3, gemm_warmup=1)


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

    def to_dict(self) -> dict:
        """results.json's `hardware_wall`."""
        when = (None if self.measured_at is None
                else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.measured_at)))
        return {"hardware": self.hardware.name, "source": self.source, "how": self.how, "measured_at": when,
                "bandwidth_gbps": self.hardware.bandwidth_gbps, "read_gbps": self.read_gbps,
                "copy_gbps": self.copy_gbps, "triad_gbps": self.triad_gbps,
                "peak_tflops": dict(self.hardware.peak_tflops)}


def host_id() -> str:
    """This machine: its host name and, where there is one, its machine id."""
    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = ""
    return hashlib.sha256(f"{socket.gethostname()}:{machine}".encode()).hexdigest()[:16]


def host_measurement_path() -> Path:
    from harness.artifacts import cache_dir

    return cache_dir() / "hardware" / f"host-{host_id()}.json"


def store_host_measurement(result: ProbeResult) -> Path:
    """Keep a CPU measurement for runs on this host in the next hour."""
    path = host_measurement_path()
    record = {"host": host_id(), "threads": result.threads, "measured_at": result.measured_at, "how": result.method,
              "read_gbps": result.read_gbps, "copy_gbps": result.copy_gbps, "triad_gbps": result.triad_gbps,
              "peak_tflops": result.peak_tflops, "load_average": result.load_average}
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def recent_host_measurement(max_age_s: float = MAX_AGE_S) -> dict | None:
    """This host's stored measurement, if it is under `max_age_s` old and was taken on as
    many torch threads as this process runs (a measurement on one thread halves a 2-core
    machine's figures)."""
    path = host_measurement_path()
    try:
        record = json.loads(path.read_text())
        fresh = (record["host"] == host_id() and record["threads"] == torch.get_num_threads()
                 and 0 <= time.time() - float(record["measured_at"]) < max_age_s)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if fresh else None


def _measure_host() -> dict:
    print("wallperf: measuring this machine's memory bandwidth and GEMM peak (a few seconds; reused "
          "for an hour)", file=sys.stderr, flush=True)
    result = probe("cpu", settings=RUN_SETTINGS)
    store_host_measurement(result)
    return recent_host_measurement() or {}


def run_wall(configured: HardwareConfig, from_profile: bool = False, measure: bool = True) -> Wall:
    """The figures a run on `configured` is set against (see the module docstring);
    with `measure` False, a CPU without a measurement from the last hour keeps the profile's."""
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
    record = recent_host_measurement() or (_measure_host() if measure else None)
    if not record:
        why = "could not be stored or read back" if measure else "not measured here in the last hour"
        return Wall(configured, "profile", f"{name}: this machine's bandwidth {why}")
    peaks = {**configured.peak_tflops, **{k: float(v) for k, v in record["peak_tflops"].items()}}
    bandwidth = max(float(record[k]) for k in ("read_gbps", "copy_gbps", "triad_gbps"))
    hardware = dataclasses.replace(configured, bandwidth_gbps=round(bandwidth, 2),
                                   peak_tflops=peaks, sources=[record["how"]])
    return Wall(hardware, "measured", record["how"], measured_at=float(record["measured_at"]),
                read_gbps=record["read_gbps"], copy_gbps=record["copy_gbps"], triad_gbps=record["triad_gbps"])
