"""Energy of a benchmark run: joules, average power and joules per output token,
where the hardware reports them, and an honest "unavailable" with the reason
where it does not.

Sources, by the device the engine runs on:
- NVIDIA GPUs: NVML through `pynvml` (PyPI `nvidia-ml-py`). The board's energy
  counter (nvmlDeviceGetTotalEnergyConsumption, mJ since the driver loaded,
  Volta and newer); older boards' power draw (nvmlDeviceGetPowerUsage, mW) is
  sampled and integrated instead.
- AMD GPUs (torch on ROCm): `amdsmi`. The energy accumulator
  (amdsmi_get_energy_count: ticks of `counter_resolution` uJ); where that is not
  supported (e.g. in a VM guest), the socket power from amdsmi_get_power_info.
- CPU: Linux powercap RAPL, /sys/class/powercap/intel-rapl:N/energy_uj (the
  package zones; AMD CPUs appear under the same name). A package is the whole
  socket, every process on it included. Since Linux 5.10 the file is usually
  readable by root only.

GPU figures are the boards' alone: not the host CPU, DRAM, fans or power supply.
A thread reads the counters every `interval_s` and adds up the deltas, so a
counter that wraps (RAPL's, within minutes at high power) is counted across the
wrap, and power-only sources are integrated with the trapezoid rule.

Device indices are torch's (cuda:0, cuda:1, ...), mapped to the management
library's through CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES. NVML and amdsmi
number boards in PCI order; so does CUDA when CUDA_DEVICE_ORDER=PCI_BUS_ID (its
default orders by speed, which is the same order on a box of identical GPUs).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from wallperf.harness.hardware.ticker import Ticker

POWERCAP = Path("/sys/class/powercap")


@dataclass(frozen=True)
class EnergySource:
    """One library's view of the measured devices."""

    name: str
    labels: tuple
    # "energy": read() gives each device's cumulative joules; "power": its watts now.
    method: str
    read: Callable[[], list]
    close: Callable[[], None]
    # Per device, the joules at which its counter wraps to zero (None: it does not).
    wrap_j: Optional[tuple] = None

    def __post_init__(self):
        if self.method not in ("energy", "power"):
            raise ValueError(f"method must be 'energy' or 'power', got {self.method!r}")


def open_source(device: str, devices=None, powercap: Path = POWERCAP) -> tuple[Optional[EnergySource], str]:
    """(source, "") for the hardware behind `device`, or (None, why not).
    `devices`: torch device indices to measure (None: every visible one)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return _open_amdsmi(devices) if torch.version.hip else _open_nvml(devices)
    if kind == "cpu":
        return _open_rapl(Path(powercap))
    return None, f"no energy source for device type {kind!r}"


class EnergyMeter:
    """Measures the energy spent inside a `with` block:

        with EnergyMeter("cuda", devices=range(2)) as meter:
            ...
        record["energy"] = meter.result(output_tokens)
    """

    def __init__(self, device: str = "cpu", devices=None, interval_s: float = 0.1, powercap: Path = POWERCAP):
        self.device, self.devices, self.interval_s, self.powercap = device, devices, interval_s, powercap
        self._source: Optional[EnergySource] = None
        self._reason = "the meter was not entered"
        self._ticker = Ticker(self._tick, interval_s, "wallperf-energy")
        self._joules = 0.0
        self._start = self._last_t = None
        self._last = None

    def __enter__(self) -> "EnergyMeter":
        self._source, self._reason = open_source(self.device, self.devices, self.powercap)
        if self._source is not None:
            try:
                self._last, self._last_t = self._source.read(), time.monotonic()
            except Exception as e:  # noqa: BLE001 - a vendor library's error must not fail the run
                self._fail(e)
                return self
            self._start = self._last_t
            self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._ticker.stop()
        if self._source is not None:
            self._source.close()

    def _tick(self) -> None:
        src = self._source
        if src is None:
            return
        try:
            now, t = src.read(), time.monotonic()
        except Exception as e:  # noqa: BLE001 - a vendor library's error must not fail the run
            self._fail(e)
            return
        if src.method == "energy":
            for i, (before, after) in enumerate(zip(self._last, now)):
                delta = after - before
                if delta < 0 and src.wrap_j is not None:
                    delta += src.wrap_j[i]
                self._joules += delta
        else:
            self._joules += (sum(self._last) + sum(now)) / 2 * (t - self._last_t)
        self._last, self._last_t = now, t

    def _fail(self, error: Exception) -> None:
        name = self._source.name
        self._source.close()
        self._source = None
        self._reason = f"{name} failed while measuring: {type(error).__name__}: {error}"

    def result(self, tokens: int) -> dict:
        """The record for results.json; `tokens`: output tokens produced inside the block."""
        src = self._source
        if src is None:
            return {"available": False, "source": None, "method": None, "devices": None, "duration_s": None,
                    "energy_j": None, "average_power_w": None, "tokens": tokens, "joules_per_token": None,
                    "reason": self._reason}
        duration = self._last_t - self._start
        method = ("energy counter" if src.method == "energy"
                  else f"power sampled every {self.interval_s:g} s, integrated")
        return {"available": True, "source": src.name, "method": method, "devices": list(src.labels),
                "duration_s": duration, "energy_j": self._joules,
                "average_power_w": self._joules / duration if duration > 0 else None,
                "tokens": tokens, "joules_per_token": self._joules / tokens if tokens else None, "reason": None}


def _visible(names: tuple) -> Optional[list]:
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            return [v.strip() for v in value.split(",") if v.strip()]
    return None


def _physical(devices, visible: Optional[list], count: int) -> list[str]:
    """The management library's ids (an index, or a UUID) of torch's `devices`."""
    logical = list(range(len(visible) if visible is not None else count)) if devices is None else list(devices)
    if visible is None:
        return [str(i) for i in logical]
    if any(i >= len(visible) for i in logical):
        raise ValueError(f"devices {logical} but only {len(visible)} visible: {','.join(visible)}")
    return [visible[i] for i in logical]


def _open_nvml(devices) -> tuple[Optional[EnergySource], str]:
    try:
        import pynvml
    except ImportError:
        return None, "pynvml is not importable (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return None, f"NVML did not initialize: {e}"
    try:
        ids = _physical(devices, _visible(("CUDA_VISIBLE_DEVICES",)), pynvml.nvmlDeviceGetCount())
        handles = [pynvml.nvmlDeviceGetHandleByIndex(int(i)) if i.isdigit() else pynvml.nvmlDeviceGetHandleByUUID(i)
                   for i in ids]
        labels = tuple(f"nvml:{i}" for i in ids)
        try:
            for h in handles:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        except pynvml.NVMLError:
            # Boards before Volta have no energy counter: integrate their power draw.
            return EnergySource("nvml", labels, "power",
                                lambda: [pynvml.nvmlDeviceGetPowerUsage(h) * 1e-3 for h in handles],
                                pynvml.nvmlShutdown), ""
        return EnergySource("nvml", labels, "energy",
                            lambda: [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) * 1e-3 for h in handles],
                            pynvml.nvmlShutdown), ""
    except (pynvml.NVMLError, ValueError) as e:
        pynvml.nvmlShutdown()
        return None, f"NVML: {e}"


def _open_amdsmi(devices) -> tuple[Optional[EnergySource], str]:
    try:
        import amdsmi
    except ImportError:
        return None, "amdsmi is not importable (it ships with ROCm: /opt/rocm/share/amd_smi)"
    try:
        amdsmi.amdsmi_init()
    except amdsmi.AmdSmiException as e:
        return None, f"amdsmi did not initialize: {e}"
    try:
        all_handles = amdsmi.amdsmi_get_processor_handles()
        ids = _physical(devices, _visible(("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")),
                        len(all_handles))
        if not all(i.isdigit() for i in ids):
            raise ValueError(f"visible devices given by UUID ({','.join(ids)}): set them by index to measure")
        handles = [all_handles[int(i)] for i in ids]
        labels = tuple(f"amdsmi:{i}" for i in ids)
        try:
            for h in handles:
                amdsmi.amdsmi_get_energy_count(h)
        except amdsmi.AmdSmiException:
            return EnergySource("amdsmi", labels, "power",
                                lambda: [_amd_watts(amdsmi.amdsmi_get_power_info(h)) for h in handles],
                                amdsmi.amdsmi_shut_down), ""
        return EnergySource("amdsmi", labels, "energy",
                            lambda: [_amd_joules(amdsmi.amdsmi_get_energy_count(h)) for h in handles],
                            amdsmi.amdsmi_shut_down), ""
    except (amdsmi.AmdSmiException, ValueError, IndexError) as e:
        amdsmi.amdsmi_shut_down()
        return None, f"amdsmi: {e}"


def _amd_joules(count: dict) -> float:
    # ROCm 6.x renamed the accumulator from "power" to "energy_accumulator".
    ticks = count["energy_accumulator"] if "energy_accumulator" in count else count["power"]
    return ticks * count["counter_resolution"] * 1e-6


def _amd_watts(info: dict) -> float:
    # MI300-class parts report "N/A" for the average and a current socket power instead.
    for key in ("socket_power", "current_socket_power", "average_socket_power"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    raise ValueError(f"amdsmi reports no socket power: {info}")


def _open_rapl(root: Path) -> tuple[Optional[EnergySource], str]:
    if not root.is_dir():
        return None, (f"{root} does not exist: this kernel exposes no RAPL counters "
                      "(e.g. a VM, or a container without powercap)")
    # Package zones are intel-rapl:N; intel-rapl:N:M are their parts (core, dram, ...).
    zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
    if not zones:
        return None, f"no RAPL package zones (intel-rapl:N) under {root}"
    counters = [z / "energy_uj" for z in zones]

    def read() -> list:
        return [int(c.read_text()) * 1e-6 for c in counters]

    try:
        read()
        wrap = tuple(int((z / "max_energy_range_uj").read_text()) * 1e-6 for z in zones)
    except PermissionError:
        return None, (f"{counters[0]} is not readable by this user (root only since Linux 5.10, "
                      "CVE-2020-8694)")
    except OSError as e:
        return None, f"RAPL counters unreadable: {e}"
    labels = tuple(f"rapl:{(z / 'name').read_text().strip() if (z / 'name').is_file() else z.name}" for z in zones)
    return EnergySource("rapl", labels, "energy", read, lambda: None, wrap), ""

