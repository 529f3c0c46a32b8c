"""`wallperf probe --quick` on this machine: figures exist and the profile it
writes is one the config loader accepts. No timing is asserted beyond being
positive: figures belong to the probe's own output, not to pytest."""
import argparse

import pytest
import torch

from wallperf.harness.hardware import probe as probe_module
from wallperf.harness.hardware import quiet as quiet_module
from wallperf.harness.config import ConfigError, HardwareConfig, build, load_model_config, read_yaml
from wallperf.harness.hardware.probe import measured_profile_path, probe, write_profile
from wallperf.harness.hardware.probe_cmd import add_probe_parser, cmd_probe
from wallperf.harness.hardware.roofline import memory_wall
from wallperf.harness.loadgen.results import OutputError


@pytest.fixture(scope="module")
def cpu_result():
    return probe("cpu", quick=True)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WALLPERF_CACHE", str(tmp_path))
    return tmp_path


def test_quick_probe_gives_positive_figures(cpu_result):
    assert cpu_result.name == "cpu" and cpu_result.vendor == "cpu"
    assert cpu_result.read_gbps > 0 and cpu_result.copy_gbps > 0 and cpu_result.triad_gbps > 0
    # The wall is the read-only figure (decode streams weights in and writes next to nothing), unless a
    # busy machine made copy or triad come out higher.
    assert cpu_result.bandwidth_gbps == max(cpu_result.read_gbps, cpu_result.copy_gbps, cpu_result.triad_gbps)
    assert set(cpu_result.peak_tflops) == {"float32", "bfloat16"}
    assert all(v > 0 for v in cpu_result.peak_tflops.values())
    # Each peak names its kernel, and the record says how quiet the machine was.
    assert set(cpu_result.peak_kernels) == {"float32", "bfloat16"}
    assert cpu_result.peak_kernels["float32"] == "torch.matmul float32"
    record = cpu_result.quiet.to_dict()
    assert isinstance(record["quiet"], bool) and record["load_1min"] >= 0 and record["spread"] >= 0
    assert set(record["spreads"]) >= {"read (sum)", "copy", "triad", "float32 peak", "bfloat16 peak"}
    assert cpu_result.memory_gb > 0 and cpu_result.threads >= 1


def test_profile_path_follows_wallperf_cache(cache):
    assert measured_profile_path("cpu") == cache / "hardware" / "cpu.yaml"
    assert measured_profile_path("local-gpu") == cache / "hardware" / "local-gpu.yaml"


def test_written_profile_is_a_valid_hardware_config(cpu_result, cache):
    path = write_profile(cpu_result)
    assert path == cache / "hardware" / "cpu.yaml"
    hardware = build(HardwareConfig, read_yaml(path), path)
    assert hardware.name == "cpu" and hardware.fp8_format is None
    assert hardware.peak_tflops["fp8"] is None and hardware.peak_tflops["bfloat16"] > 0
    assert hardware.bandwidth_gbps == pytest.approx(cpu_result.bandwidth_gbps, abs=0.05)
    assert memory_wall(load_model_config("smollm2-135m").shape, hardware, "bfloat16") > 0


def test_write_is_atomic(cpu_result, cache, monkeypatch):
    path = cache / "hardware" / "cpu.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("previous profile\n")

    def interrupted(src, dst):
        raise OSError("interrupted before the rename")

    monkeypatch.setattr(probe_module.os, "replace", interrupted)
    with pytest.raises(OutputError, match=f"cannot write {path}"):
        write_profile(cpu_result)
    assert path.read_text() == "previous profile\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["cpu.yaml"]


def test_cmd_probe_prints_writes_and_warns_when_busy(cache, capsys, monkeypatch):
    monkeypatch.setattr(quiet_module.os, "getloadavg", lambda: (3.5, 1.0, 0.5))
    monkeypatch.setattr(quiet_module, "busy_cores", lambda: 1.5)  # other work holds 1.5 cores
    parser = argparse.ArgumentParser(prog="wallperf")
    add_probe_parser(parser.add_subparsers())
    assert cmd_probe(parser.parse_args(["probe", "--quick", "--device", "cpu", "--quiet-wait", "0"])) == 0
    assert not (cache / "hardware" / "cpu.yaml").exists()  # a profile only with --measured-wall
    capsys.readouterr()
    assert cmd_probe(parser.parse_args(["probe", "--quick", "--device", "cpu", "--measured-wall",
                                        "--quiet-wait", "0"])) == 0
    out = capsys.readouterr()
    assert "read" in out.out and "copy" in out.out and "triad" in out.out and "bfloat16" in out.out
    assert "NOT QUIET: other work kept 1.5 of" in out.out
    assert str(cache / "hardware" / "cpu.yaml") in out.err
    assert "was not quiet (other work kept 1.5 of" in out.err
    hardware = build(HardwareConfig, read_yaml(cache / "hardware" / "cpu.yaml"))
    assert "load average 3.5" in hardware.sources[0] and "NOT QUIET" in hardware.sources[0]


def test_bad_quiet_wait_is_a_config_error(cache):
    parser = argparse.ArgumentParser(prog="wallperf")
    add_probe_parser(parser.add_subparsers())
    for bad in ("-1", "inf", "nan"):
        with pytest.raises(ConfigError) as e:
            cmd_probe(parser.parse_args(["probe", "--quick", "--quiet-wait", bad]))
        assert e.value.key == "--quiet-wait"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_config_error(cache):
    parser = argparse.ArgumentParser(prog="wallperf")
    add_probe_parser(parser.add_subparsers())
    with pytest.raises(ConfigError) as e:
        cmd_probe(parser.parse_args(["probe", "--device", "cuda"]))
    assert e.value.key == "--device" and "cpu" in str(e.value)


def test_hardware_needs_measured_wall_and_a_known_profile(cache):
    parser = argparse.ArgumentParser(prog="wallperf")
    add_probe_parser(parser.add_subparsers())
    with pytest.raises(ConfigError) as e:
        cmd_probe(parser.parse_args(["probe", "--hardware", "h100-sxm"]))
    assert e.value.key == "--hardware" and "--measured-wall" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cmd_probe(parser.parse_args(["probe", "--measured-wall", "--hardware", "no-such-gpu"]))
    assert e.value.key == "--hardware" and "h100-sxm" in str(e.value)
