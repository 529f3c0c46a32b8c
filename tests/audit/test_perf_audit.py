"""wallperf.audit.perf_audit on hand-made result records: each flag fires on its input and not on a clean run.

Roofline figures come from harness.hardware.roofline for real shapes (Llama 3.1 8B on an
H100 SXM5), checked first against FACTS.md's memory wall (~209 tok/s at batch
1, bf16), so "impossible" is judged against a published figure, not against
whatever the code computes. Latency limits are MLPerf's llama3_1-8b Server
limits (2000 ms TTFT, 100 ms TPOT, loadgen/mlperf.conf); the INVALID wording is
harness.loadgen.logs's, which is what results.json holds.
"""
import copy

import pytest

from wallperf.audit.perf_audit import Finding, audit_results, roofline_trust
from wallperf.harness.config import load_hardware_config, load_model_config
from wallperf.harness.hardware.roofline import run_roofline

H100_WALL_8B = 209  # FACTS.md: Llama 3.1 8B bf16 on H100 SXM5, batch 1
LIMITS = {"ttft_ms": 2000.0, "tpot_ms": 100.0}


def roofline(tokens_per_second: float, batch: int, scenario: str) -> dict:
    record = run_roofline(load_model_config("llama3.1-8b").shape, load_hardware_config("h100-sxm"), "bfloat16",
                          tokens_per_second, batch=batch, context=0)
    return {**record, "hardware": "h100-sxm", "hardware_source": "conf/hardware/h100-sxm.yaml",
            "peak_bandwidth_gbps": 3350.0}


def performance_run(scenario="Server", tokens_per_second=150.0, batch=1, **overrides) -> dict:
    run = {"scenario": scenario, "mode": "performance", "model": "llama3.1-8b", "backend": "native",
           "dtype": "bfloat16", "hardware": "h100-sxm", "valid": True, "invalid_reasons": [],
           "submission_valid": True, "submission_notes": [],
           "metrics": {"samples_per_second": 1.0, "tokens_per_second": tokens_per_second,
                       "ttft_ms": {"p50": 300.0, "p90": 500.0, "p99": 900.0},
                       "tpot_ms": {"p50": 20.0, "p90": 40.0, "p99": 60.0}, "sample_count": 1000},
           "roofline": roofline(tokens_per_second, batch, scenario)}
    run.update(overrides)
    return run


def accuracy_run(passed=True, scenario="Server") -> dict:
    checks = {"first_token": {"status": "passed"}, "eos": {"status": "passed" if passed else "failed"},
              "sample_length": {"status": "passed"}}
    return {"scenario": scenario, "mode": "accuracy", "valid": None, "invalid_reasons": [], "submission_valid": True,
            "submission_notes": [], "metrics": {"tokens_per_second": None, "mmlu_accuracy": 0.6},
            "mmlu": {"accuracy": 0.6, "correct": 6, "total": 10, "unparsed": 0}, "roofline": None,
            "compliance": {"test06": {"passed": passed, "checks": checks}}}


def results(*runs, duration=600.0, complete=True) -> dict:
    scenarios = [{"name": "Server", "min_duration_s": duration, "target_qps": 1.0, **LIMITS},
                 {"name": "Interactive", "min_duration_s": duration, "target_qps": 1.0, "ttft_ms": 500.0,
                  "tpot_ms": 30.0},
                 {"name": "Offline", "min_duration_s": duration},
                 {"name": "SingleStream", "min_duration_s": duration}]
    return {"wallperf_version": "0.1.0", "complete": complete, "config": {"scenarios": scenarios},
            "runs": list(runs)}


def codes(findings) -> list[str]:
    return [f.code for f in findings]


def test_the_oracle_agrees_with_the_published_memory_wall():
    assert performance_run()["roofline"]["memory_wall_tokens_per_second"] == pytest.approx(H100_WALL_8B, rel=0.01)


def test_a_clean_results_file_has_no_findings():
    clean = results(performance_run("Server"), performance_run("Offline", tokens_per_second=1000.0, batch=8),
                    performance_run("SingleStream", tokens_per_second=180.0), accuracy_run())
    assert audit_results(clean) == []


def test_above_the_memory_wall_at_batch_1_is_impossible_with_the_figures():
    findings = audit_results(results(performance_run("SingleStream", tokens_per_second=250.0)))
    wall = [f for f in findings if f.code == "above_memory_wall"]
    assert len(wall) == 1 and wall[0].severity == "error" and wall[0].run == "SingleStream performance"
    assert "250 tokens/s" in wall[0].message and "the memory wall, 208.6 tokens/s" in wall[0].message
    # The same record breaks MBU too: achieved bandwidth is tokens/s x bytes per token.
    assert "mbu_above_one" in codes(findings)


def test_the_wall_is_judged_at_the_batch_the_run_held():
    above_batch_1_wall = performance_run("Offline", tokens_per_second=1000.0, batch=8)
    assert above_batch_1_wall["roofline"]["memory_wall_tokens_per_second"] < 1000
    assert audit_results(results(above_batch_1_wall)) == []
    above_batch_8_bound = performance_run("Offline", tokens_per_second=2000.0, batch=8)
    [finding] = [f for f in audit_results(results(above_batch_8_bound)) if f.code == "above_memory_wall"]
    assert "memory-bound limit at batch 8" in finding.message


def test_mbu_above_one_is_flagged_on_its_own():
    run = performance_run("Offline")
    run["roofline"]["mbu"] = 1.3
    findings = audit_results(results(run))
    assert codes(findings) == ["mbu_above_one"]
    assert "MBU 1.30" in findings[0].message and "3350" in findings[0].message


def test_above_the_compute_roof_is_impossible():
    run = performance_run("Offline", tokens_per_second=1000.0, batch=8)
    run["roofline"]["compute_bound_tokens_per_second"] = 900.0
    assert "above_compute_roof" in codes(audit_results(results(run)))


def test_tokens_per_second_without_a_scenario():
    run = performance_run()
    del run["scenario"]
    [finding] = audit_results(results(run))
    assert (finding.code, finding.severity, finding.run) == ("no_scenario", "error", "run #1 (no scenario) performance")
    accuracy_without_scenario = accuracy_run()
    accuracy_without_scenario["scenario"] = None
    assert "no_scenario" not in codes(audit_results(results(accuracy_without_scenario)))


@pytest.mark.parametrize("metric,p99", [("ttft_ms", 2400.0), ("tpot_ms", 130.0)])
def test_server_p99_above_its_limit(metric, p99):
    run = performance_run("Server")
    run["metrics"][metric]["p99"] = p99
    [finding] = audit_results(results(run))
    assert finding.code == "latency_limits_missed" and f"p99 {metric[:4].upper()} {p99:g} ms" in finding.message


def test_loadgen_constraints_failure_is_a_missed_limit_and_an_invalid_run():
    run = performance_run("Server", valid=False,
                          invalid_reasons=["performance constraints not met (Server latency limits)"])
    assert sorted(codes(audit_results(results(run)))) == ["latency_limits_missed", "loadgen_invalid"]


def test_interactive_uses_its_tighter_limits_and_offline_has_none():
    interactive = performance_run("Interactive")  # TTFT p99 900 ms > 500 ms, TPOT p99 60 ms > 30 ms
    [finding] = audit_results(results(interactive))
    assert "TTFT" in finding.message and "TPOT" in finding.message
    slow_offline = performance_run("Offline", tokens_per_second=1000.0, batch=8)
    slow_offline["metrics"]["ttft_ms"]["p99"] = 1e6
    assert audit_results(results(slow_offline)) == []


def test_short_runs_are_not_submission_results():
    run = performance_run("Offline", tokens_per_second=1000.0, batch=8, submission_valid=False,
                          submission_notes=["min_duration 30 s is below MLPerf's 600 s"])
    [finding] = audit_results(results(run, duration=30.0))
    assert (finding.code, finding.severity) == ("too_short", "warning") and "30 s" in finding.message


def test_submission_notes_are_reported_when_the_duration_is_fine():
    note = "settings are wallperf's own, not mlperf.conf + user.conf (--user-conf)"
    run = performance_run("Offline", tokens_per_second=1000.0, batch=8, submission_valid=False,
                          submission_notes=[note])
    [finding] = audit_results(results(run))
    assert finding.code == "not_for_submission" and note in finding.message


def test_invalid_runs_carry_loadgen_reasons():
    run = performance_run("Offline", tokens_per_second=1000.0, batch=8, valid=False,
                          invalid_reasons=["minimum duration not met"])
    [finding] = audit_results(results(run))
    assert finding.code == "loadgen_invalid" and "minimum duration not met" in finding.message


def test_test06_failure_and_absence():
    failed = audit_results(results(accuracy_run(passed=False)))
    assert codes(failed) == ["test06_failed"] and "eos" in failed[0].message
    missing = accuracy_run()
    del missing["compliance"]
    assert codes(audit_results(results(missing))) == ["test06_missing"]


def test_interrupted_results_and_runs_without_a_wall():
    run = performance_run("Offline", tokens_per_second=1000.0, batch=8, roofline=None)
    findings = audit_results(results(run, complete=False))
    assert [(f.severity, f.code) for f in findings] == [("warning", "incomplete"), ("info", "no_roofline")]


def test_errors_come_first_and_the_input_is_not_changed():
    data = results(performance_run("Server", valid=False, invalid_reasons=["x"], submission_valid=False,
                                   submission_notes=["n"]), duration=10.0)
    before = copy.deepcopy(data)
    findings = audit_results(data)
    assert [f.severity for f in findings] == ["error", "warning"]
    assert data == before


def test_finding_rejects_an_unknown_severity():
    with pytest.raises(ValueError, match="severity"):
        Finding("fatal", "Server performance", "x", "y")


def test_decode_mbu_above_one_names_bandwidth_source_and_bytes():
    run = performance_run("SingleStream", tokens_per_second=150.0)
    run["roofline"].update(decode_mbu=1.33, decode_achieved_bandwidth_gbps=4455.0)
    findings = audit_results(results(run))
    assert codes(findings) == ["decode_mbu_above_one"] and findings[0].severity == "error"
    message = findings[0].message
    assert "decode MBU (at TPOT p50) 1.33" in message and "4455 GB/s" in message
    assert "3350 GB/s" in message and "conf/hardware/h100-sxm.yaml" in message
    assert f"{run['roofline']['bytes_per_step']:.4g} bytes per step" in message


def test_mfu_above_one_is_an_error_and_the_roofline_untrusted():
    run = performance_run("Offline", tokens_per_second=1000.0, batch=8)
    assert roofline_trust(run["roofline"]) == {"trusted": True, "untrusted_reasons": []}
    run["roofline"]["mfu"] = 1.2
    assert codes(audit_results(results(run))) == ["mfu_above_one"]
    trust = roofline_trust(run["roofline"])
    assert trust["trusted"] is False and "MFU 1.20" in trust["untrusted_reasons"][0]


def test_a_second_try_is_flagged_with_its_attempt():
    retry = {"invalid_reasons": ["performance constraints not met (Server latency limits)"],
             "log_dir": "out/sys/m/Server/performance/invalid_1",
             "changed": {"target_qps": {"before": 1.5, "after": 1.275}}, "predicted_s": 400.0}
    found = [f for f in audit_results(results(performance_run(retry_of=retry))) if f.code == "retried"]
    assert len(found) == 1 and found[0].severity == "warning"
    assert "target_qps 1.5 -> 1.275" in found[0].message and "latency limits" in found[0].message
    assert "performance/invalid_1" in found[0].message
    assert "retried" not in codes(audit_results(results(performance_run())))
