"""Which figures a run is set against: measured on a CPU (and reused for an hour on the
same host), a GPU's vendor figures, a `probe --measured-wall` profile, or the profile as
written with --wall-from-profile; and the wall file `wallperf sweep` gives each of its runs.
The probe is replaced by a counter of calls (the `probes` fixture)."""
import dataclasses
import json

import pytest
import yaml

from wallperf.harness.config import ConfigError, load_hardware_config
from wallperf.harness.hardware import wall as wall_module
from wallperf.harness.hardware.probe import measured_profile_path, write_profile
from wallperf.harness.hardware.wall import MAX_AGE_S, read_wall, run_wall, write_wall


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
    path = write_profile(dataclasses.replace(probes.result(read=3000.0), vendor="nvidia"), name="h100-sxm")
    assert path == measured_profile_path("h100-sxm")
    measured = run_wall(h100)
    assert measured.source == "measured profile" and measured.hardware.bandwidth_gbps == 3000.0
    # fp8 math is the hardware's, which the probe does not measure: the vendor's stays.
    assert measured.hardware.peak_tflops["fp8"] == 1978.9 and measured.hardware.fp8_format == "e4m3fn"
    assert yaml.safe_load(path.read_text())["name"] == "h100-sxm"


def test_the_wall_is_never_below_copy_or_triad(probes, monkeypatch):
    monkeypatch.setattr(wall_module, "probe", lambda device, quick=False, settings=None, **quiet_wait: dataclasses.replace(
        probes.result(read=30.0, at=probes.clock["now"]), triad_gbps=38.0))
    assert run_wall(load_hardware_config("cpu")).hardware.bandwidth_gbps == 38.0


def test_hardware_profile_never_measures(probes):
    from wallperf.harness.hardware.profiles import hardware_profile

    cpu = load_hardware_config("cpu")
    assert hardware_profile(cpu) == (cpu, "profile") and probes == []
    run_wall(cpu)
    assert hardware_profile(cpu)[0].bandwidth_gbps == 47.0 and len(probes) == 1


def test_fresh_measures_even_with_a_measurement_from_the_last_hour(probes):
    cpu = load_hardware_config("cpu")
    low = dataclasses.replace(probes.result(read=12.0, at=probes.clock["now"]), copy_gbps=10.0, triad_gbps=11.0)
    wall_module.store_host_measurement(low)
    assert run_wall(cpu).hardware.bandwidth_gbps == 12.0 and probes == []
    fresh = run_wall(cpu, fresh=True)
    assert len(probes) == 1 and fresh.hardware.bandwidth_gbps == 47.0 and fresh.read_gbps == 47.0


def test_a_wall_file_gives_back_the_same_wall_and_says_so(probes, tmp_path):
    cpu = load_hardware_config("cpu")
    probes.clock["now"] = 1_786_000_123.0  # whole seconds: the file keeps the time to the second
    measured = run_wall(cpu)
    path = tmp_path / "wall.json"
    write_wall(path, measured)
    given = read_wall(path, cpu)
    assert given.hardware == measured.hardware
    assert given.measured_at == measured.measured_at and str(path) in given.given_by
    assert {**given.to_dict(), "given_by": None} == measured.to_dict()


def _wall_file(tmp_path, **changes):
    record = {"hardware": "cpu", "source": "measured", "how": "read-only 47.0 GB/s", "measured_at":
              "2026-11-30T13:40:00+0000", "bandwidth_gbps": 47.0, "read_gbps": 47.0, "copy_gbps": 35.0,
              "triad_gbps": 38.0, "peak_tflops": {"bfloat16": 0.8, "float32": 0.3, "fp8": None}, "given_by": None}
    path = tmp_path / "wall.json"
    path.write_text(json.dumps({k: v for k, v in {**record, **changes}.items() if v != "DROP"}))
    return path


@pytest.mark.parametrize("changes, key, words", [
    ({"hardware": "h100-sxm"}, "hardware", "not this run's hardware profile 'cpu'"),
    ({"source": "guessed"}, "source", "allowed: measured"),
    ({"how": "DROP"}, "how", "missing"),
    ({"bandwidth_gbps": -1}, "bandwidth_gbps", "finite number of GB/s > 0"),
    ({"bandwidth_gbps": "fast"}, "bandwidth_gbps", "finite number"),
    ({"bandwidth_gbps": "DROP"}, "bandwidth_gbps", "finite number"),
    ({"triad_gbps": True}, "triad_gbps", "finite number"),
    ({"measured_at": "yesterday"}, "measured_at", "not a time"),
    ({"peak_tflops": {"bfloat16": -0.8}}, "peak_tflops", "positive number"),
    ({"peak_tflops": {"int4": 1.0}}, "peak_tflops", "unknown dtype"),
    ({"peak_tflops": "DROP"}, "peak_tflops", "expected dict"),
])
def test_a_malformed_wall_file_names_the_key(tmp_path, changes, key, words):
    with pytest.raises(ConfigError, match=words) as e:
        read_wall(_wall_file(tmp_path, **changes), load_hardware_config("cpu"))
    assert e.value.file == str(tmp_path / "wall.json") and key in str(e.value)


@pytest.mark.parametrize("text, words", [("{not json", "not a JSON wall"), ("[1, 2]", "expected a JSON object"),
                                         (None, "cannot read it")])
def test_a_wall_file_that_is_not_one(tmp_path, text, words):
    path = tmp_path / "wall.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        read_wall(path, load_hardware_config("cpu"))


def test_a_measurement_on_a_busy_machine_is_recorded_so_and_never_reused(probes, monkeypatch, capsys):
    from wallperf.harness.hardware.quiet import Quiet

    busy = Quiet(cores=2, load_1min=6.5, busy_cores=1.9, waited_s=20.0)
    monkeypatch.setattr(wall_module, "probe", lambda device, quick=False, settings=None, **quiet_wait: (
        probes.append(settings), dataclasses.replace(probes.result(read=12.6, at=probes.clock["now"]),
                                                     quiet=busy))[1])
    first = run_wall(load_hardware_config("cpu"))
    assert first.quiet["quiet"] is False and first.quiet["load_1min"] == 6.5 and first.quiet["busy_cores"] == 1.9
    assert first.to_dict()["quiet"]["quiet_reasons"] == [
        "other work kept 1.9 of 2 cores busy when it started (after waiting 20 s)"]
    assert "NOT QUIET" in first.how
    assert "the machine was not quiet while its wall was measured" in capsys.readouterr().err
    run_wall(load_hardware_config("cpu"))  # a minute later: measured again, not the busy figure reused
    assert len(probes) == 2


def test_a_quiet_measurement_is_recorded_quiet_with_its_kernels(probes, monkeypatch, tmp_path):
    kernels = {"float32": "torch.matmul float32", "bfloat16": "cpu_linear, compiled, avx2 path (256 rows, compute-bound)"}
    monkeypatch.setattr(wall_module, "probe", lambda device, quick=False, settings=None, **quiet_wait: (
        probes.append(settings), dataclasses.replace(probes.result(at=probes.clock["now"]), peak_kernels=kernels))[1])
    cpu = load_hardware_config("cpu")
    w = run_wall(cpu)
    assert w.quiet["quiet"] is True and w.to_dict()["peak_kernels"] == kernels
    record = json.loads(wall_module.host_measurement_path().read_text())
    assert record["quiet"]["quiet"] is True and record["quiet"]["load_1min"] == 0.1
    assert run_wall(cpu).peak_kernels == kernels and len(probes) == 1  # reused, kernels and all
    write_wall(tmp_path / "wall.json", w)
    assert read_wall(tmp_path / "wall.json", cpu).peak_kernels == kernels


def test_a_stored_wall_of_another_bf16_kernel_is_measured_again(probes):
    """A run forced to the scalar path stores the scalar kernel's peak; a plain run within the
    hour runs the avx2 path and must not be held to it (every MFU would read 7x high)."""
    cpu = load_hardware_config("cpu")
    probes.kernel = "cpu_linear, compiled, scalar path (256 rows, compute-bound)"
    assert run_wall(cpu).peak_kernels["bfloat16"] == probes.kernel
    assert run_wall(cpu) and len(probes) == 1  # the same kernel: reused
    probes.kernel = "cpu_linear, compiled, avx2 path (256 rows, compute-bound)"
    assert run_wall(cpu).peak_kernels["bfloat16"] == probes.kernel and len(probes) == 2
