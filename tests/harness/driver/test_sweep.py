"""`wallperf sweep`: its command line, the folder it writes, and (slow) two real
points on a tiny synthetic model, each a `wallperf run` in its own process."""
import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.driver import sweep as sweep_module

CONF = Path(__file__).resolve().parents[3] / "conf"


def _record(qps, scenario="Server"):
    tps = 50.0 * min(qps, 4)
    return {"scenario": scenario, "mode": "performance", "model": "m", "backend": "native", "dtype": "bfloat16",
            "hardware": "cpu", "valid": qps < 4, "invalid_reasons": [], "submission_valid": False,
            "weight_format": "bfloat16", "log_dir": "x",
            "metrics": {"tokens_per_second": tps, "samples_per_second": tps / 50,
                        "ttft_ms": {"p50": 100 * qps, "p90": 150 * qps, "p99": 200 * qps},
                        "tpot_ms": {"p50": 10 * qps, "p90": 12 * qps, "p99": 15 * qps}},
            "roofline": None, "engine": {"mean_decode_batch": qps, "mean_decode_context": 100.0},
            "goodput": {"share": 1 / qps, "tokens_per_second": tps / qps, "queries": 10,
                        "ttft_limit_ms": 2000.0, "tpot_limit_ms": 200.0}}


@pytest.fixture
def fake_child(monkeypatch):
    """Each point's `wallperf run` replaced by a record of its target QPS; the calls are kept."""
    calls = []

    def child(run_args, extra, out):
        calls.append((list(run_args), list(extra), out))
        scenario = extra[extra.index("--scenario") + 1]
        qps = float(extra[extra.index("--target-qps") + 1]) if "--target-qps" in extra else 2.0
        out.mkdir(parents=True)
        return {"runs": [_record(qps, scenario)], "dataset": {"name": "mmlu"}, "config": {"run": {}}}

    monkeypatch.setattr(sweep_module, "_child", child)
    return calls


def test_sweep_writes_the_table_chart_and_reports(tmp_path, fake_child):
    out = tmp_path / "sw"
    assert main(["sweep", "--qps", "4,1,2", "--out", str(out), "--duration", "3", "--backend", "native"]) == 0
    assert [c[1] for c in fake_child] == [["--scenario", "Server", "--target-qps", q] for q in ("1", "2", "4")]
    assert all(c[0] == ["--duration", "3", "--backend", "native"] for c in fake_child)
    assert [c[2] for c in fake_child] == [out / "sweep" / f"qps_{q}" for q in ("1", "2", "4")]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["complete"] and [p["target_qps"] for p in sweep["points"]] == [1.0, 2.0, 4.0]
    assert [p["goodput_share"] for p in sweep["points"]] == [1.0, 0.5, 0.25]
    assert sweep["limits_ms"] == {"ttft": 2000.0, "tpot": 200.0} and sweep["backend"] == "native"
    results = json.loads((out / "results.json").read_text())
    assert [r["sweep_target_qps"] for r in results["runs"]] == [1.0, 2.0, 4.0] and results["sweep"] == sweep
    assert (out / "pareto.png").stat().st_size > 0
    assert "Pareto" in (out / "report.md").read_text()


def test_auto_spreads_points_around_the_offline_peak(tmp_path, fake_child):
    out = tmp_path / "sw"
    assert main(["sweep", "--qps", "auto", "--out", str(out)]) == 0
    assert fake_child[0][1] == ["--scenario", "Offline"] and fake_child[0][2] == out / "sweep" / "calibration"
    sweep = json.loads((out / "sweep.json").read_text())
    # The fake Offline run did 2 samples/s.
    assert [p["target_qps"] for p in sweep["points"]] == [2.0 * f for f in sweep_module.AUTO_FACTORS]
    assert sweep["calibration"]["samples_per_second"] == 2.0


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
    assert sweep["front"]["rows"][0]["batch"] == 1
