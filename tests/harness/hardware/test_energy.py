"""wallperf.harness.hardware.energy: this machine's answer must be honest (real RAPL figures, or
unavailable with a reason), and the vendor paths turn counters into joules by
their documented units, checked with fake libraries whose counters the test
moves by known amounts (NVML: mJ; amdsmi: ticks x counter_resolution uJ; RAPL:
uJ wrapping at max_energy_range_uj; NVML power: mW, integrated)."""
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from wallperf.harness.hardware.energy import EnergyMeter

NUMBERS = ("duration_s", "energy_j", "average_power_w", "joules_per_token")


def test_this_cpu_is_reported_honestly():
    with EnergyMeter("cpu") as meter:
        time.sleep(0.05)
    r = meter.result(tokens=100)
    if r["available"]:
        assert r["source"] == "rapl" and r["reason"] is None and r["energy_j"] >= 0
    else:
        assert r["reason"] and r["source"] is None and all(r[k] is None for k in NUMBERS)


class FakeNVML(types.ModuleType):
    """pynvml's calls the meter makes, over counters the test sets."""

    class NVMLError(Exception):
        pass

    def __init__(self, energy_mj=None, power_mw=None):
        super().__init__("pynvml")
        self.energy_mj, self.power_mw, self.shut = energy_mj, power_mw, False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if self.energy_mj is None:
            raise self.NVMLError("Not Supported")
        return self.energy_mj[h]

    def nvmlDeviceGetPowerUsage(self, h):
        return self.power_mw[h]


@pytest.fixture
def cuda_env(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")


def test_nvml_energy_counter_deltas(monkeypatch, cuda_env):
    nvml = FakeNVML(energy_mj={0: 5, 1: 7, 2: 1_000_000, 3: 2_000_000})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with EnergyMeter("cuda", devices=[0, 1], interval_s=0.01) as meter:
        for _ in range(5):  # the sampling thread sees the counters climb in steps
            nvml.energy_mj = {**nvml.energy_mj, 2: nvml.energy_mj[2] + 30_000, 3: nvml.energy_mj[3] + 12_000}
            time.sleep(0.02)
    r = meter.result(tokens=50)
    # cuda:0 and cuda:1 are boards 2 and 3: (5 x 30 J) + (5 x 12 J), never boards 0 and 1.
    assert r["available"] and r["source"] == "nvml" and r["devices"] == ["nvml:2", "nvml:3"]
    assert r["method"] == "energy counter"
    assert r["energy_j"] == pytest.approx(210.0)
    assert r["joules_per_token"] == pytest.approx(4.2)
    assert r["average_power_w"] == pytest.approx(210.0 / r["duration_s"])
    assert nvml.shut


def test_nvml_without_counter_integrates_power(monkeypatch, cuda_env):
    nvml = FakeNVML(power_mw={2: 300_000, 3: 100_000})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with EnergyMeter("cuda", interval_s=0.01) as meter:
        time.sleep(0.1)
    r = meter.result(tokens=0)
    assert r["available"] and r["method"].startswith("power sampled")
    assert r["average_power_w"] == pytest.approx(400.0)
    assert r["joules_per_token"] is None


def test_missing_library_is_a_reason(monkeypatch, cuda_env):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with EnergyMeter("cuda") as meter:
        pass
    r = meter.result(tokens=10)
    assert not r["available"] and "nvidia-ml-py" in r["reason"]


def test_amdsmi_ticks_times_resolution(monkeypatch):
    ticks = {"n": 1000}
    amd = types.ModuleType("amdsmi")
    amd.AmdSmiException = type("AmdSmiException", (Exception,), {})
    amd.amdsmi_init = amd.amdsmi_shut_down = lambda: None
    amd.amdsmi_get_processor_handles = lambda: ["gcd0"]
    amd.amdsmi_get_energy_count = lambda h: {"energy_accumulator": ticks["n"], "counter_resolution": 15.3,
                                             "timestamp": 0}
    monkeypatch.setitem(sys.modules, "amdsmi", amd)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    for name in ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    with EnergyMeter("cuda") as meter:
        ticks["n"] += 2_000_000
    r = meter.result(tokens=1)
    assert r["source"] == "amdsmi" and r["energy_j"] == pytest.approx(2_000_000 * 15.3e-6)


def test_rapl_counts_across_a_wrap(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    part = tmp_path / "intel-rapl:0:0"  # a sub-zone (core): inside the package, not added again
    for z, name in ((zone, "package-0"), (part, "core")):
        z.mkdir()
        (z / "name").write_text(name + "\n")
        (z / "max_energy_range_uj").write_text("262143328850\n")
        (z / "energy_uj").write_text("262140000000\n")
    with EnergyMeter("cpu", interval_s=60, powercap=tmp_path) as meter:
        (zone / "energy_uj").write_text("6671150\n")  # wrapped: 3,328,850 uJ to the top, 6,671,150 after
    r = meter.result(tokens=4)
    assert r["devices"] == ["rapl:package-0"]
    assert r["energy_j"] == pytest.approx(10.0)
    assert r["joules_per_token"] == pytest.approx(2.5)


def test_unreadable_rapl_is_a_reason(tmp_path, monkeypatch):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("1\n")
    read_text = Path.read_text

    def root_only(path, *a, **kw):
        # chmod cannot stop root, who may run this: refuse the read the way the kernel would.
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *a, **kw)

    monkeypatch.setattr(Path, "read_text", root_only)
    with EnergyMeter("cpu", powercap=tmp_path) as meter:
        pass
    r = meter.result(1)
    assert not r["available"] and "not readable" in r["reason"]
