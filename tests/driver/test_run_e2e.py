"""`wallperf run` end to end on the real SmolLM2 model and MMLU, on the CPU.

results.json is checked against LoadGen's own mlperf_log_detail.txt (read here
with plain json, independently of harness.loadgen.logs), and the Server accuracy log
against the mlcommons TEST06 rules, re-stated here from compliance/TEST06.
"""
import json

import numpy as np
import pytest

from wallperf.cli import main

pytestmark = pytest.mark.slow

EOS = 2  # <|im_end|>, SmolLM2's EOS


def detail_values(log_dir) -> dict:
    values = {}
    for line in open(f"{log_dir}/mlperf_log_detail.txt"):
        if line.startswith(":::MLLOG "):
            entry = json.loads(line[len(":::MLLOG "):])
            values[entry["key"]] = entry["value"]
    return values


@pytest.fixture(scope="module")
def server_run(tmp_path_factory, smollm2_gguf_path, mmlu_path):
    out = tmp_path_factory.mktemp("run") / "out"
    rc = main(["run", "--scenario", "Server,Offline", "--duration", "1", "--max-samples", "6",
               "--output-tokens", "8", "--target-qps", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def run_of(results, scenario, mode):
    (run,) = [r for r in results["runs"] if r["scenario"] == scenario and r["mode"] == mode]
    return run


def test_results_contract(server_run):
    out, results = server_run
    assert results["complete"] is True
    assert results["wallperf_version"]
    # The default run checks accuracy in its first scenario only (conf/runs/default.yaml: accuracy_scenarios).
    assert [(r["scenario"], r["mode"]) for r in results["runs"]] == [
        ("Server", "performance"), ("Server", "accuracy"), ("Offline", "performance")]
    for run in results["runs"]:
        for key in ("scenario", "mode", "model", "backend", "dtype", "hardware", "valid", "invalid_reasons",
                    "submission_valid", "log_dir", "metrics", "roofline"):
            assert key in run
        assert run["submission_valid"] is False  # 1 s is far below MLPerf's 600 s
        for key in ("samples_per_second", "tokens_per_second", "ttft_ms", "tpot_ms", "mmlu_accuracy"):
            assert key in run["metrics"]
        # SmolLM2 in bf16 on the CPU decodes through the fused C++ step, and the record says so.
        assert run["engine"]["decode_path"].startswith("fused C++ step"), run["engine"]["decode_path"]
        # What else the machine did meanwhile (Linux: read from /proc).
        host = run["host"]
        assert host["available"] and host["seconds"] > 0 and isinstance(host["disturbed"], bool)
        assert host["steal_s"] >= 0 and host["major_faults"] >= 0 and "worst_steal_share" in host


@pytest.mark.parametrize("scenario,tps_key,sps_key", [
    ("Server", "result_completed_tokens_per_second", "result_completed_samples_per_sec"),
    ("Offline", "result_tokens_per_second", "result_samples_per_second"),
])
def test_performance_figures_equal_loadgen_detail_log(server_run, scenario, tps_key, sps_key):
    _, results = server_run
    run = run_of(results, scenario, "performance")
    values = detail_values(run["log_dir"])
    m = run["metrics"]
    assert m["tokens_per_second"] == pytest.approx(values[tps_key], rel=1e-12)
    assert m["samples_per_second"] == pytest.approx(values[sps_key], rel=1e-12)
    assert run["valid"] == (values["result_validity"] == "VALID")
    if scenario == "Server":
        for p, pct in (("p50", "50.00"), ("p90", "90.00"), ("p99", "99.00")):
            assert m["ttft_ms"][p] == pytest.approx(values[f"result_first_token_{pct}_percentile_latency_ns"] / 1e6)
            assert m["tpot_ms"][p] == pytest.approx(values[f"result_time_per_output_token_{pct}_percentile_ns"] / 1e6)
    else:
        assert m["ttft_ms"] is None and m["tpot_ms"] is None
    assert run["ignore_eos"] is True and run["max_new_tokens"] == 8
    assert 0 < run["roofline"]["mbu"] < 1.5


def test_server_accuracy_log_passes_test06(server_run):
    _, results = server_run
    run = run_of(results, "Server", "accuracy")
    entries = json.load(open(f"{run['log_dir']}/mlperf_log_accuracy.json"))
    assert len(entries) == 6
    for e in entries:
        data = np.frombuffer(bytes.fromhex(e["data"]), dtype="<i4")
        first = np.frombuffer(bytes.fromhex(e["token_data"]), dtype="<i4")
        assert len(data) == e["token_count"] > 1
        assert (data[: len(first)] == first[: len(data)]).all()
        # At most one EOS, and only as the last token.
        assert (data[:-1] != EOS).all()
    assert run["compliance"]["test06"]["passed"] is True
    mmlu = run["mmlu"]
    assert mmlu["total"] == 6 and mmlu["accuracy"] == mmlu["correct"] / 6


def test_bad_out_folder_is_refused(tmp_path):
    (tmp_path / "x").write_text("keep me")
    assert main(["run", "--out", str(tmp_path), "--no-progress"]) == 2
    assert (tmp_path / "x").read_text() == "keep me"
