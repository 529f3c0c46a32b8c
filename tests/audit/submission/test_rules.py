"""wallperf.audit.submission.rules: each checker rule wallperf enforces, on detail logs
written here with the effective_* values LoadGen logs (key names as in
mlcommons-loadgen 6.0.17's logs; the checker's own verdicts on real logs are in
test_submission_checker.py)."""
import json

import pytest

from wallperf.audit.submission.rules import submission_notes

V61_SEEDS = {"qsl_rng_seed": 2085463073848966840, "sample_index_rng_seed": 2747215439041700203,
             "schedule_rng_seed": 16159082839903944936}


def detail_log(path, **overrides):
    values = {f"effective_{k}": v for k, v in V61_SEEDS.items()}
    values.update(effective_performance_sample_count=5000, effective_min_duration_ms=600000,
                  effective_min_query_count=5000, effective_sample_concatenate_permutation=True,
                  requested_use_token_latencies=True, effective_scenario="Offline", result_validity="VALID")
    values.update(overrides)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "mlperf_log_detail.txt", "w") as f:
        for key, value in values.items():
            f.write(":::MLLOG " + json.dumps({"key": key, "value": value, "metadata": {}}) + "\n")
    return path


def record(tmp_path, mode="performance", **changes):
    r = {"scenario": "Offline", "mode": mode, "model": "smollm2-135m", "benchmark": "llama3_1-8b-edge",
         "settings": "official", "synthetic_weights": False, "ignore_eos": False, "max_new_tokens": 128,
         "valid": True if mode == "performance" else None, "log_dir": str(tmp_path),
         "metrics": {"sample_count": 5000}}
    r.update(changes)
    return r


def test_a_conforming_test_has_no_note(tmp_path):
    detail_log(tmp_path)
    assert submission_notes(record(tmp_path), "v6.1") == []
    assert submission_notes(record(tmp_path, mode="accuracy"), "v6.1") == []


@pytest.mark.parametrize("log,changes,words", [
    ({}, {"settings": "wallperf"}, "settings are wallperf's own"),
    ({}, {"synthetic_weights": True}, "synthetic (random) weights"),
    ({}, {"ignore_eos": True}, "ignore EOS"),
    ({}, {"max_new_tokens": 64}, "stop after 64 tokens"),
    ({}, {"benchmark": None}, "stands for no MLPerf benchmark"),
    ({}, {"valid": False}, "INVALID"),
    ({"effective_qsl_rng_seed": 0}, {}, "effective_qsl_rng_seed is 0"),
    ({"effective_performance_sample_count": 3}, {}, "performance_sample_count is 3"),
    ({"effective_min_duration_ms": 1000}, {}, "min_duration 1000 ms"),
    ({"effective_min_query_count": 0}, {}, "min_query_count 0"),
    ({"effective_sample_concatenate_permutation": False}, {}, "equal-issue"),
    ({"requested_use_token_latencies": False}, {}, "use_token_latencies is off"),
])
def test_each_rule_names_what_fails(tmp_path, log, changes, words):
    detail_log(tmp_path, **log)
    notes = submission_notes(record(tmp_path, **changes), "v6.1")
    assert len(notes) == 1 and words in notes[0], notes


def test_loadgen_errors_and_short_accuracy_runs(tmp_path):
    detail_log(tmp_path)
    with open(tmp_path / "mlperf_log_detail.txt", "a") as f:
        f.write(":::MLLOG " + json.dumps({"key": "error_invalid_config", "value": "Multiple conf files are used.",
                                          "metadata": {"is_error": True}}) + "\n")
    notes = submission_notes(record(tmp_path, mode="accuracy", metrics={"sample_count": 3}), "v6.1")
    assert any("Multiple conf files" in n for n in notes)
    assert any("covered 3 samples" in n for n in notes)


def test_v6_0_wants_its_own_seeds(tmp_path):
    detail_log(tmp_path)
    notes = submission_notes(record(tmp_path), "v6.0")
    assert len(notes) == 3 and all("not checker v6.0's" in n for n in notes)
