"""Which figures a run is set against: measured on a CPU (and reused for an hour on the
same host), a GPU's vendor figures, a `probe --measured-wall` profile, or the profile as
written with --wall-from-profile. The probe is replaced by a counter of calls."""
import dataclasses

import pytest
import yaml

from harness.config import load_hardware_config
from harness.hardware import wall as wall_module
from harness.hardware.probe import CPU_QUICK_SETTINGS, ProbeResult, measured_profile_path, write_profile
from harness.hardware.wall import MAX_AGE_S, run_wall


def _result(read=47.0, at=1_000_000.0) -> ProbeResult:
    return ProbeResult(name="cpu", description="test CPU", vendor="cpu", memory_gb=24.0, read_gbps=read,
                       copy_gbps=35.0, triad_gbps=38.0, peak_tflops={"float32": 0.3, "bfloat16": 0.8},
                       threads=2, settings=CPU_QUICK_SETTINGS, load_average=0.1, measured_at=at)


class _Calls(list):
    """A list of calls with the fake clock beside it."""


@pytest.fixture
def probes(tmp_path, monkeypatch):
    """The calls of a fake probe (each returns 47 GB/s read, measured 'now')."""
    monkeypatch.setenv("WALLPERF_CACHE", str(tmp_path))
    clock = {"now": 1_000_000.0}
    calls = _Calls()

    def fake_probe(device, quick=False, settings=None):
        calls.append(settings)
        return _result(at=clock["now"])

    monkeypatch.setattr(wall_module, "probe", fake_probe)
    monkeypatch.setattr(wall_module.time, "time", lambda: clock["now"])
    calls.clock = clock
    return calls


def test_cpu_is_measured_then_reused_for_an_hour(probes):
    cpu = load_hardware_config("cpu")
    first = run_wall(cpu)
    assert len(probes) == 1 and probes[0] == wall_module.RUN_SETTINGS
    assert first.source == "measured" and first.hardware.bandwidth_gbps == 47.0
    assert first.hardware.peak_tflops == {"bfloat16": 0.8, "float32": 0.3, "fp8": None}
    record = first.to_dict()
    assert record["read_gbps"] == 47.0 and record["copy_gbps"] == 35.0 and record["triad_gbps"] == 38.0
    assert "read-only 47.0 GB/s" in record["how"] and record["measured_at"]
    probes.clock["now"] += MAX_AGE_S - 1
    assert run_wall(cpu).hardware.bandwidth_gbps == 47.0 and len(probes) == 1
    probes.clock["now"] += 2
    run_wall(cpu)
    assert len(probes) == 2


def test_another_host_or_thread_count_measures_again(probes, monkeypatch):
    cpu = load_hardware_config("cpu")
    run_wall(cpu)
    monkeypatch.setattr(wall_module, "host_id", lambda: "another-host")
    run_wall(cpu)
    assert len(probes) == 2
    monkeypatch.setattr(wall_module.torch, "get_num_threads", lambda: 1)  # the fake measured on 2
    run_wall(cpu)
    assert len(probes) == 3


def test_wall_from_profile_does_not_measure(probes):
    cpu = dataclasses.replace(load_hardware_config("cpu"), bandwidth_gbps=10.0)
    w = run_wall(cpu, from_profile=True)
    assert probes == [] and w.source == "profile" and w.hardware.bandwidth_gbps == 10.0
    assert "--wall-from-profile" in w.how


def test_gpu_keeps_vendor_figures_unless_probe_wrote_a_measured_wall(probes):
    h100 = load_hardware_config("h100-sxm")
    w = run_wall(h100)
    assert probes == [] and w.source == "profile" and w.hardware == h100 and "vendor" in w.how
    path = write_profile(dataclasses.replace(_result(read=3000.0), vendor="nvidia"), name="h100-sxm")
    assert path == measured_profile_path("h100-sxm")
    measured = run_wall(h100)
    assert measured.source == "measured profile" and measured.hardware.bandwidth_gbps == 3000.0
    # fp8 math is the hardware's, which the probe does not measure: the vendor's stays.
    assert measured.hardware.peak_tflops["fp8"] == 1978.9 and measured.hardware.fp8_format == "e4m3fn"
    assert yaml.safe_load(path.read_text())["name"] == "h100-sxm"


def test_the_wall_is_never_below_copy_or_triad(probes, monkeypatch):
    monkeypatch.setattr(wall_module, "probe", lambda device, quick=False, settings=None: dataclasses.replace(
        _result(read=30.0, at=probes.clock["now"]), triad_gbps=38.0))
    assert run_wall(load_hardware_config("cpu")).hardware.bandwidth_gbps == 38.0


def test_hardware_profile_never_measures(probes):
    from harness.hardware.profiles import hardware_profile

    cpu = load_hardware_config("cpu")
    assert hardware_profile(cpu) == (cpu, "profile") and probes == []
    run_wall(cpu)
    assert hardware_profile(cpu)[0].bandwidth_gbps == 47.0 and len(probes) == 1
