"""A planned performance test that came out INVALID gets one more try when the
budget has room (wallperf.driver.retry): the settings of the try, restated from
LoadGen's behaviour (a Server test's queries at a lower load take longer; an
Offline test issues more samples at the rate it ran), the budget arithmetic done
by hand, the cases that must not retry, and the run's bookkeeping: the INVALID
attempt and its LoadGen logs are kept, the try's record says what it retried."""
import json
from pathlib import Path

import pytest

from wallperf.driver import run as run_mod
from wallperf.driver.plan import Overheads, Plan
from wallperf.driver.retry import RETRY_LOAD, RETRY_OFFLINE_QPS, SERVER_TAIL, plan_retry, retry_settings
from wallperf.harness.config import load_scenario_config
from wallperf.harness.config.schema import ScenarioConfig
from wallperf.harness.loadgen.results import write_json_atomic

SERVER = ScenarioConfig("Server", min_duration_s=10.0, min_query_count=464, max_batch=16, target_qps=1.5,
                        ttft_ms=2000.0, tpot_ms=100.0)
OFFLINE = ScenarioConfig("Offline", min_duration_s=10.0, min_query_count=1, max_batch=32, offline_expected_qps=4.0)
SINGLE = ScenarioConfig("SingleStream", min_duration_s=10.0, min_query_count=64, expected_latency_ms=900.0)
LATENCY = "performance constraints not met (Server latency limits)"
ROOMY = dict(budget_s=600.0, elapsed_s=100.0, still_to_run_s=60.0, per_test_s=6.0)


def invalid(scenario, *reasons, elapsed_s=40.0):
    return {"scenario": scenario, "mode": "performance", "valid": False, "invalid_reasons": list(reasons),
            "elapsed_s": elapsed_s}


def test_a_server_test_is_retried_at_a_lower_load_for_longer():
    retry, why = plan_retry(SERVER, invalid("Server", LATENCY, elapsed_s=320.0), **ROOMY)
    assert retry is not None
    assert retry.scenario.target_qps == pytest.approx(RETRY_LOAD * 1.5, abs=1e-3) == pytest.approx(1.275, abs=1e-3)
    # Every other setting is the attempt's: the queries early stopping needs, the limits.
    assert (retry.scenario.min_query_count, retry.scenario.ttft_ms, retry.scenario.tpot_ms) == (464, 2000.0, 100.0)
    # 464 queries at 1.275 QPS take 364 s to issue, and the last ones finish after that.
    assert retry.predicted_s == pytest.approx(SERVER_TAIL * 464 / 1.275, rel=1e-3)
    assert retry.changed == {"target_qps": (1.5, 1.275)}
    assert "target_qps 1.5 -> 1.275" in why


def test_an_offline_test_that_ended_too_soon_is_issued_more_samples():
    record = invalid("Offline", "minimum duration not met", elapsed_s=7.0)
    retry, _ = plan_retry(OFFLINE, record, **ROOMY)
    assert retry.scenario.offline_expected_qps == pytest.approx(RETRY_OFFLINE_QPS * 4.0)
    # The attempt ran 7 s, shorter than its 10 s minimum: the try issues 1.5x the samples at that
    # rate, from at least the minimum.
    assert retry.predicted_s == pytest.approx(RETRY_OFFLINE_QPS * 10.0)
    # Any other Offline failure keeps the settings.
    same, _ = plan_retry(OFFLINE, invalid("Offline", "early stopping criterion not met", elapsed_s=30.0), **ROOMY)
    assert same.scenario == OFFLINE and same.changed == {} and same.predicted_s == 30.0


def test_other_scenarios_retry_at_the_same_settings():
    retry, why = plan_retry(SINGLE, invalid("SingleStream", "minimum query/sample count not met", elapsed_s=61.0),
                            **ROOMY)
    assert retry.scenario == SINGLE and retry.changed == {} and retry.predicted_s == 61.0
    assert "the same settings" in why


def test_no_retry_past_the_budget():
    # 600 s budget, 400 s gone, 60 s of tests to come: 140 s left; the try needs 1.1 x 364 + 6 = 406 s.
    retry, why = plan_retry(SERVER, invalid("Server", LATENCY), budget_s=600.0, elapsed_s=400.0,
                            still_to_run_s=60.0, per_test_s=6.0)
    assert retry is None
    assert "needs about 406 s" in why and "leaves 140 s" in why
    # Just enough room: it runs.
    need = SERVER_TAIL * 464 / 1.275 + 6.0
    retry, _ = plan_retry(SERVER, invalid("Server", LATENCY), budget_s=600.0, elapsed_s=600.0 - 60.0 - need,
                          still_to_run_s=60.0, per_test_s=6.0)
    assert retry is not None


@pytest.mark.parametrize("reason", ["the SUT failed: RuntimeError: boom",
                                    "3 of 464 requests failed: HTTP 500: x (x3)",
                                    "LoadGen logged no result: the run did not finish"])
def test_a_fault_is_not_retried(reason):
    retry, why = plan_retry(SERVER, invalid("Server", reason, LATENCY), **ROOMY)
    assert retry is None and "repeat the fault" in why and reason in why


def test_no_retry_for_a_valid_test_a_submission_or_a_test_the_plan_gave_up_on():
    assert plan_retry(SERVER, {**invalid("Server"), "valid": True}, **ROOMY)[0] is None
    retry, why = plan_retry(SERVER, invalid("Server", LATENCY), submission=True, **ROOMY)
    assert retry is None and "--submission" in why
    gave_up = ("Server: one request alone takes 2400 ms to its first token, over the p99 TTFT limit of 2000 ms",)
    retry, why = plan_retry(SERVER, invalid("Server", LATENCY), cannot_be_valid=gave_up, **ROOMY)
    assert retry is None and "cannot be VALID" in why
    # Another scenario's problem does not stop this one's retry.
    assert plan_retry(OFFLINE, invalid("Offline", "minimum duration not met"), cannot_be_valid=gave_up,
                      **ROOMY)[0] is not None


def test_the_default_run_configs_settings_survive_a_retry():
    # The shipped scenario configs: a retry changes only the load, and keeps them valid configs.
    for name in ("Server", "Offline"):
        sc = load_scenario_config(name)
        reason = LATENCY if name == "Server" else "minimum duration not met"
        tried, seconds = retry_settings(sc, invalid(name, reason, elapsed_s=sc.min_duration_s / 2))
        assert tried.name == name and seconds > 0
        assert (tried.target_qps or 0) <= (sc.target_qps or 0) and \
            (tried.offline_expected_qps or 0) >= (sc.offline_expected_qps or 0)


def test_the_run_keeps_the_invalid_attempt_and_its_logs(tmp_path):
    """run._retry's bookkeeping, with the test process replaced by a function that writes a
    LoadGen log folder and a record as wallperf.driver.one_test does."""
    out = tmp_path / "out"
    run_1 = out / "sys" / "model" / "Server" / "performance" / "run_1"
    results = {"runs": [], "complete": False}
    results_path = out / "results.json"
    calls = []

    def test(sc, mode, log_dir=None, compliance=None, baseline=False):
        run_1.mkdir(parents=True, exist_ok=True)
        (run_1 / "mlperf_log_summary.txt").write_text(f"target_qps {sc.target_qps}\n")
        valid = len(calls) > 0
        record = {"scenario": sc.name, "mode": mode, "valid": valid, "elapsed_s": 330.0, "log_dir": str(run_1),
                  "invalid_reasons": [] if valid else [LATENCY]}
        calls.append(sc)
        results["runs"].append(record)
        write_json_atomic(results_path, results)
        return record

    plan = Plan((SERVER,), {"Server performance": 320.0, "Server accuracy": 20.0}, Overheads(per_test_s=5.0),
                1200.0, False, (), (SERVER,))
    first = test(SERVER, "performance")
    opts = run_mod.RunOptions(out)
    started = run_mod.time.time() - 100.0
    used, record = run_mod._retry(SERVER, first, plan, {"Server performance"}, started, opts, results,
                                  results_path, test)
    assert used.target_qps == pytest.approx(1.275) and calls[1] is used
    assert record["valid"] and record is results["runs"][-1] and len(results["runs"]) == 1
    # The attempt: out of `runs`, in `retried`, its logs moved beside the try's and still readable.
    aside = run_1.parent / "invalid_1"
    assert results["retried"] == [first] and first["log_dir"] == str(aside)
    assert (aside / "mlperf_log_summary.txt").read_text() == "target_qps 1.5\n"
    assert (run_1 / "mlperf_log_summary.txt").read_text() == "target_qps 1.275\n"
    assert record["retry_of"] == {"invalid_reasons": [LATENCY], "log_dir": str(aside),
                                  "changed": {"target_qps": {"before": 1.5, "after": 1.275}},
                                  "predicted_s": round(SERVER_TAIL * 464 / 1.275, 1)}
    on_disk = json.loads(results_path.read_text())
    assert on_disk["retried"][0]["log_dir"] == str(aside) and on_disk["runs"][0]["retry_of"]["log_dir"] == str(aside)


def test_the_run_says_why_it_does_not_retry(tmp_path, capsys):
    results = {"runs": []}
    record = invalid("Server", LATENCY)
    record["log_dir"] = str(tmp_path / "run_1")
    results["runs"].append(record)
    plan = Plan((SERVER,), {"Server performance": 320.0}, Overheads(per_test_s=5.0), 600.0, False, (), (SERVER,))
    opts = run_mod.RunOptions(tmp_path)

    def test(*a, **k):
        raise AssertionError("no second try fits: none may run")

    used, kept = run_mod._retry(SERVER, record, plan, {"Server performance"}, run_mod.time.time() - 500.0, opts,
                                results, tmp_path / "results.json", test)
    assert used is SERVER and kept is record and results["runs"] == [record] and "retried" not in results
    assert "Server performance: INVALID; not retried: a second try needs about" in capsys.readouterr().err
