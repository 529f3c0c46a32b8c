"""Would the MLPerf submission checker accept this test? Every rule wallperf can
judge itself, from the effective_* settings LoadGen logged (mlperf_log_detail.txt)
and the run's record, for one checker version. Each failed rule is one sentence
in `submission_notes`; a test is submission-valid when there is none.

Left to the checker itself (`wallperf submission --check`): the tree's structure,
the system description's fields, accuracy targets (closed division), and the
files' sizes and hashes.
"""
from __future__ import annotations

from pathlib import Path

from wallperf.harness.config.benchmarks import (BENCHMARKS, CHECKER_VERSIONS, MIN_QUERIES, SEEDS,
                                       SUBMISSION_MIN_DURATION_MS)
from wallperf.harness.loadgen.logs import read_detail_log
from wallperf.sut.scenarios import OFFLINE, SCENARIOS


def submission_notes(record: dict, checker_version: str = "v6.1") -> list[str]:
    """Why this test's result cannot stand in a submission for `checker_version`."""
    if checker_version not in CHECKER_VERSIONS:
        raise ValueError(f"unknown checker version {checker_version!r}; allowed: {', '.join(CHECKER_VERSIONS)}")
    notes = []
    bench = BENCHMARKS.get(record.get("benchmark") or "")
    if bench is None:
        notes.append(f"model {record.get('model')} stands for no MLPerf benchmark (set 'benchmark' in its YAML)")
    elif checker_version not in bench.required_scenarios:
        notes.append(f"benchmark {bench.name} is not in checker {checker_version}'s list")
    if record.get("settings") != "official":
        notes.append("settings are wallperf's own, not mlperf.conf + user.conf (--user-conf or --submission)")
    if record.get("synthetic_weights"):
        notes.append("synthetic (random) weights")
    if record.get("ignore_eos"):
        notes.append("outputs ignore EOS (a fixed output length); the reference SUTs stop at EOS")
    elif bench is not None and record.get("max_new_tokens") != bench.max_new_tokens:
        notes.append(f"outputs stop after {record.get('max_new_tokens')} tokens; {bench.name}'s reference stops "
                     f"at {bench.max_new_tokens}")
    log = Path(record["log_dir"]) / "mlperf_log_detail.txt"
    if not log.is_file():
        return notes + [f"no LoadGen detail log at {log}"]
    detail = read_detail_log(log)
    for error in detail.errors:
        notes.append(f"LoadGen logged an error: {error}")
    notes += _settings_notes(detail, record, bench, checker_version)
    return notes


def _settings_notes(detail, record: dict, bench, checker_version: str) -> list[str]:
    notes = []
    eff = detail.get
    is_compliance = record.get("compliance_test") is not None
    for key, seed in SEEDS[checker_version].items():
        if eff(f"effective_{key}") != seed:
            notes.append(f"effective_{key} is {eff(f'effective_{key}')}, not checker {checker_version}'s {seed}")
    if bench is not None and eff("effective_performance_sample_count") != bench.dataset_size:
        notes.append(f"performance_sample_count is {eff('effective_performance_sample_count')}; {bench.name} "
                     f"needs {bench.dataset_size}")
    # LoadGen logs only the requested value of this one.
    if not eff("requested_use_token_latencies"):
        notes.append("use_token_latencies is off; LLM benchmarks measure token latencies")
    if record["mode"] == "performance" and not is_compliance:
        if not eff("effective_sample_concatenate_permutation"):
            notes.append("equal-issue mode (sample_concatenate_permutation) is off")
        duration = eff("effective_min_duration_ms")
        if duration is None or duration < SUBMISSION_MIN_DURATION_MS:
            notes.append(f"min_duration {duration} ms is below MLPerf's {SUBMISSION_MIN_DURATION_MS} ms")
        # The checker counts queries only where no early stopping judges the run (Offline).
        need = MIN_QUERIES.get(record["scenario"], 1)
        if SCENARIOS.get(record["scenario"]) is OFFLINE and (eff("effective_min_query_count") or 0) < need:
            notes.append(f"min_query_count {eff('effective_min_query_count')} is below the checker's {need} "
                         f"for {record['scenario']}")
        if record.get("valid") is not True:
            notes.append("LoadGen judged the run INVALID")
    if record["mode"] == "accuracy" and bench is not None and record["metrics"]["sample_count"] != bench.dataset_size:
        notes.append(f"the accuracy run covered {record['metrics']['sample_count']} samples; {bench.name}'s data "
                     f"set has {bench.dataset_size}")
    if is_compliance and not record.get("audit_config_read"):
        notes.append(f"LoadGen did not read {record['compliance_test']}'s audit.config")
    if is_compliance and not (record.get("compliance") or {}).get("test06", {}).get("passed"):
        notes.append(f"{record['compliance_test']} failed")
    return notes
