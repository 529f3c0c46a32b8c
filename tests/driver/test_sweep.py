"""`wallperf sweep`: its command line, the folder it writes, and (slow) two real
points on a tiny synthetic model, each a `wallperf run` in its own process."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import wallperf.driver.run
from wallperf.cli import main
from wallperf.harness.config import load_hardware_config
from wallperf.driver import sweep as sweep_module
from wallperf.harness.hardware import wall as wall_module
from wallperf.harness.hardware.front import StepCost
from wallperf.harness.hardware.wall import run_wall

CONF = Path(__file__).resolve().parents[2] / "conf"


def _record(qps, scenario="Server", wall=None):
    """A run record as one test's process writes it, its step cost set against `wall`."""
    tps = 50.0 * min(qps, 4)
    cost = StepCost(weight_bytes=2.7e8, kv_bytes_per_position=23040.0, flops_per_token=2.7e8,
                    flops_per_position=5e3, bandwidth_bytes_per_s=wall.hardware.bandwidth_gbps * 1e9,
                    peak_flops_per_s=wall.hardware.peak_tflops["bfloat16"] * 1e12) if wall else None
    return {"scenario": scenario, "mode": "performance", "model": "m", "backend": "native", "dtype": "bfloat16",
            "hardware": "cpu", "valid": qps < 4, "invalid_reasons": [], "submission_valid": False,
            "weight_format": "bfloat16", "log_dir": "x",
            "metrics": {"tokens_per_second": tps, "samples_per_second": tps / 50,
                        "ttft_ms": {"p50": 100 * qps, "p90": 150 * qps, "p99": 200 * qps},
                        "tpot_ms": {"p50": 10 * qps, "p90": 12 * qps, "p99": 15 * qps}},
            "roofline": cost and {"step_cost": cost.to_dict(), "hardware": "cpu", "hardware_source": wall.source,
                                  "hardware_how": wall.how, "peak_bandwidth_gbps": wall.hardware.bandwidth_gbps},
            "engine": {"mean_decode_batch": qps, "mean_decode_context": 100.0},
            "goodput": {"share": 1 / qps, "tokens_per_second": tps / qps, "queries": 10,
                        "ttft_limit_ms": 2000.0, "tpot_limit_ms": 200.0}}


@pytest.fixture
def fake_child(monkeypatch, probes):
    """Each run of the sweep is a real `wallperf run`, in this process, with its LoadGen
    tests (and its own calibration) replaced by a record of the target QPS, set against
    the wall the run resolved; the machine's measurement is the `probes` fake. The calls
    are kept: the run options, the sweep's own, the folder and the wall the test was given."""
    calls = []

    def run_test(spec, interrupts=None):
        calls[-1]["wall"] = spec.opts.wall
        qps = spec.scenario.target_qps if spec.scenario.name != "Offline" else 2.0
        return {"record": _record(qps, spec.scenario.name, spec.opts.wall), "format": None,
                "dataset": {"name": "mmlu"}}

    def child(run_args, extra, out, interrupts=None):
        calls.append({"run_args": list(run_args), "extra": list(extra), "out": out})
        assert main(["run", *run_args, *extra, "--mode", "performance", "--out", str(out), "--no-progress"]) == 0
        return json.loads((out / "results.json").read_text())

    monkeypatch.setattr(wallperf.driver.run, "run_test", run_test)
    monkeypatch.setattr(wallperf.driver.run, "run_in_process", lambda what, fn, args, interrupts: (args[0], None))
    monkeypatch.setattr(sweep_module, "_child", child)
    return calls


def test_sweep_writes_the_table_chart_and_reports(tmp_path, fake_child):
    out = tmp_path / "sw"
    assert main(["sweep", "--qps", "4,1,2", "--out", str(out), "--duration", "3", "--backend", "native"]) == 0
    assert [c["extra"] for c in fake_child] == [["--scenario", "Server", "--target-qps", q] for q in ("1", "2", "4")]
    wall_file = str((out / "sweep" / "wall.json").resolve())
    assert all(c["run_args"] == ["--duration", "3", "--backend", "native", "--wall-file", wall_file]
               for c in fake_child)
    assert [c["out"] for c in fake_child] == [out / "sweep" / f"qps_{q}" for q in ("1", "2", "4")]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["run_args"] == ["--duration", "3", "--backend", "native"]
    assert sweep["complete"] and [p["target_qps"] for p in sweep["points"]] == [1.0, 2.0, 4.0]
    assert [p["goodput_share"] for p in sweep["points"]] == [1.0, 0.5, 0.25]
    assert sweep["limits_ms"] == {"ttft": 2000.0, "tpot": 200.0} and sweep["backend"] == "native"
    results = json.loads((out / "results.json").read_text())
    assert [r["sweep_target_qps"] for r in results["runs"]] == [1.0, 2.0, 4.0] and results["sweep"] == sweep
    assert (out / "pareto.png").stat().st_size > 0
    assert "Pareto" in (out / "report.md").read_text()


def test_min_queries_reaches_every_points_loadgen_settings(tmp_path, fake_child, monkeypatch):
    """--min-queries is an option of both modes; with --qps it is each LoadGen test's min_query_count."""
    counts = []
    run_test = wallperf.driver.run.run_test

    def counting(spec, interrupts=None):
        counts.append(spec.scenario.min_query_count)
        return run_test(spec, interrupts)
    monkeypatch.setattr(wallperf.driver.run, "run_test", counting)
    out = tmp_path / "sw"
    assert main(["sweep", "--qps", "1,2", "--out", str(out), "--duration", "3", "--min-queries", "57"]) == 0
    assert counts == [57, 57]
    assert json.loads((out / "sweep.json").read_text())["run_args"] == ["--duration", "3", "--min-queries", "57"]


def test_auto_spreads_points_around_the_offline_peak(tmp_path, fake_child):
    out = tmp_path / "sw"
    assert main(["sweep", "--qps", "auto", "--out", str(out)]) == 0
    assert fake_child[0]["extra"] == ["--scenario", "Offline"] and fake_child[0]["out"] == out / "sweep" / "calibration"
    sweep = json.loads((out / "sweep.json").read_text())
    # The calibration run had the wall the sweep measured before it, as every point had.
    assert {c["wall"].to_dict()["bandwidth_gbps"] for c in fake_child} == {sweep["wall"]["bandwidth_gbps"]}
    # The fake Offline run did 2 samples/s.
    assert [p["target_qps"] for p in sweep["points"]] == [2.0 * f for f in sweep_module.AUTO_FACTORS]
    assert sweep["calibration"]["samples_per_second"] == 2.0


def test_every_run_has_the_wall_the_sweep_measured_at_its_start(tmp_path, fake_child, probes, monkeypatch):
    """The cache holds a lower measurement of this host (another run's, on a busy machine)
    when each point starts: the points still have the sweep's own, fresh measurement."""
    busy = dataclasses.replace(probes.result(read=12.0), copy_gbps=10.0, triad_gbps=11.0)
    run_point = sweep_module._child

    def after_a_busy_measurement(run_args, extra, out, interrupts):
        wall_module.store_host_measurement(dataclasses.replace(busy, measured_at=probes.clock["now"]))
        return run_point(run_args, extra, out, interrupts)

    monkeypatch.setattr(sweep_module, "_child", after_a_busy_measurement)
    wall_module.store_host_measurement(dataclasses.replace(busy, measured_at=probes.clock["now"]))
    out = tmp_path / "sw"
    assert main(["sweep", "--qps", "1,2", "--out", str(out)]) == 0
    # One measurement, the sweep's, though the cache held one from the last hour; none by the points.
    assert len(probes) == 1
    sweep = json.loads((out / "sweep.json").read_text())
    wall = sweep["wall"]
    assert wall["source"] == "measured" and wall["bandwidth_gbps"] == 47.0 and wall["read_gbps"] == 47.0
    assert wall["measured_at"] and "read-only 47.0 GB/s" in wall["how"] and wall["given_by"] is None
    wall_file = out / "sweep" / "wall.json"
    assert json.loads(wall_file.read_text()) == wall
    for call in fake_child:
        point = json.loads((call["out"] / "results.json").read_text())
        used = point["hardware_wall"]
        # What each point's run was set against is the sweep's wall, and its record says where it came from.
        assert {**used, "given_by": None} == wall == call["wall"].to_dict() | {"given_by": None}
        assert str(wall_file.resolve()) in used["given_by"] and "wallperf sweep" in used["given_by"]
    results = json.loads((out / "results.json").read_text())
    assert [r["roofline"]["step_cost"]["bandwidth_bytes_per_s"] for r in results["runs"]] == [47e9, 47e9]
    # Decode MBU and the front against 47 GB/s: one step reads the weights and each row's KV at context 100.
    step_bytes = {q: 2.7e8 + q * 23040.0 * 100 for q in (1, 2)}
    assert [p["decode_mbu"] for p in sweep["points"]] == [pytest.approx(step_bytes[q] / 47e9 / (q * 0.01))
                                                          for q in (1, 2)]
    assert sweep["front"]["rows"][0]["memory_floor_ms"] == pytest.approx(step_bytes[1] / 47e9 * 1e3)


def test_wall_from_profile_measures_nothing_and_every_run_takes_the_profile(tmp_path, fake_child, probes):
    out = tmp_path / "sw"
    assert main(["sweep", "--qps", "1,2", "--wall-from-profile", "--out", str(out)]) == 0
    assert probes == [] and not (out / "sweep" / "wall.json").exists()
    assert all(c["run_args"] == ["--wall-from-profile"] for c in fake_child)
    sweep = json.loads((out / "sweep.json").read_text())
    profile = load_hardware_config("cpu")
    assert sweep["wall"]["source"] == "profile" and sweep["wall"]["bandwidth_gbps"] == profile.bandwidth_gbps
    for call in fake_child:
        assert json.loads((call["out"] / "results.json").read_text())["hardware_wall"] == sweep["wall"]


def test_a_run_set_against_another_wall_is_refused(tmp_path, probes):
    wall = run_wall(load_hardware_config("cpu"))
    other = {**wall.to_dict(), "bandwidth_gbps": 12.0}
    assert sweep_module._same_wall({"hardware_wall": {**wall.to_dict(), "given_by": "f"}}, wall, tmp_path)
    with pytest.raises(RuntimeError, match="another wall than the sweep's"):
        sweep_module._same_wall({"hardware_wall": other}, wall, tmp_path)


@pytest.mark.parametrize("argv, words", [
    (["--qps", "1,x"], "expected 'auto' or a comma list"),
    (["--qps", "0,1"], "must be a finite number > 0"),
    (["--qps", "1", "--mode", "accuracy"], "--mode"),
    (["--qps", "1", "--target-qps", "3"], "--target-qps"),
    (["--qps", "1", "--backend", "nosuch"], "invalid choice"),
    (["--qps", "1", "--no-such-flag"], "unrecognized arguments"),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys, fake_child, argv, words):
    out = tmp_path / "sw"
    try:
        rc = main(["sweep", *argv, "--out", str(out)])
    except SystemExit as e:
        rc = e.code
    assert rc == 2 and words in capsys.readouterr().err
    assert not out.exists() and not fake_child


def test_a_data_set_for_performance_only_is_swept(tmp_path, fake_child):
    """ShareGPT has no reference answers, so a run in the default modes refuses it; the
    sweep's points run in performance mode only, and so the sweep takes it."""
    out = tmp_path / "sw"
    assert main(["sweep", "--qps", "1", "--out", str(out), "--dataset", "sharegpt"]) == 0
    assert fake_child[0]["run_args"][:2] == ["--dataset", "sharegpt"]


def test_unknown_options_still_fail_other_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["roofline", "--model", "smollm2-135m", "--hardware", "cpu", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.slow
def test_two_real_points_each_in_its_own_process(tmp_path, monkeypatch, smollm2_gguf_path, mmlu_path,
                                                 tiny_synthetic_yaml):
    root = tmp_path / "conf"
    shutil.copytree(CONF, root)
    (root / "models" / "tiny-synthetic.yaml").write_text(tiny_synthetic_yaml)
    monkeypatch.setenv("WALLPERF_CONF", str(root))
    out = tmp_path / "sw"
    assert main(["sweep", "--qps", "1,4", "--out", str(out), "--model", "tiny-synthetic", "--duration", "1",
                 "--max-samples", "4", "--output-tokens", "4"]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["target_qps"] for p in sweep["points"]] == [1.0, 4.0]
    for p in sweep["points"]:
        detail = out / "sweep" / f"qps_{p['target_qps']:g}" / "cpu-native" / "tiny-synthetic" / "Server" / \
            "performance" / "run_1" / "mlperf_log_detail.txt"
        # Each point is a fresh process: LoadGen applied mlperf.conf-free settings once, without complaint.
        assert "Multiple conf files" not in detail.read_text()
        assert p["tokens_per_second"] > 0 and p["queries"] >= 1 and p["decode_mfu"] is not None
        # The point's process was given the wall the sweep measured.
        used = json.loads((out / "sweep" / f"qps_{p['target_qps']:g}" / "results.json").read_text())["hardware_wall"]
        assert "wallperf sweep" in used["given_by"] and {**used, "given_by": None} == sweep["wall"]
    assert sweep["front"]["rows"][0]["batch"] == 1


def test_an_interrupted_sweep_renders_the_points_it_finished(tmp_path, fake_child, monkeypatch):
    """Ctrl-C while the second point runs: exit 130, and sweep.json, results.json, the
    Pareto chart and the reports hold the first point, `complete: false`."""
    import os
    import signal

    fake_child_fn = sweep_module._child

    def interrupted_at_the_second_point(run_args, extra, out, interrupts):
        if len(fake_child) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            interrupts.check()
        return fake_child_fn(run_args, extra, out, interrupts)

    monkeypatch.setattr(sweep_module, "_child", interrupted_at_the_second_point)
    out = tmp_path / "sw"
    # Python's own handler, or SIG_IGN where the suite was started in the background by a shell.
    before = signal.getsignal(signal.SIGINT)
    assert main(["sweep", "--qps", "1,2,3", "--out", str(out)]) == 130
    assert len(fake_child) == 1
    sweep = json.loads((out / "sweep.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert sweep["complete"] is False and results["complete"] is False
    assert [p["target_qps"] for p in sweep["points"]] == [1.0] and len(results["runs"]) == 1
    assert (out / "pareto.png").stat().st_size > 0 and (out / "report.md").is_file()
    # The handlers the sweep installed are gone with it.
    assert signal.getsignal(signal.SIGINT) is before
