"""Result records: one per (scenario, mode), built from LoadGen's own logs.

results.json is a public contract that scripts read. Every figure in it is
parsed from mlperf_log_detail.txt or scored from mlperf_log_accuracy.json;
a figure LoadGen did not log is null, never estimated.
"""
from __future__ import annotations

import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

from harness.logs import read_accuracy_log, read_detail_log, scenario_metrics
from harness.qsl import parse_answer_letter

# MLPerf's minimum duration for a submission run.
SUBMISSION_MIN_DURATION_S = 600


def wallperf_version() -> str:
    try:
        return metadata.version("wallperf")
    except metadata.PackageNotFoundError:
        return "unknown"


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temp file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def score_mmlu(accuracy_log: Path, questions, tokenizer) -> dict:
    """Accuracy of the answer letters in an accuracy log, with the parsed answers."""
    entries = read_accuracy_log(accuracy_log)
    correct = unparsed = 0
    for entry in entries:
        letter = parse_answer_letter(tokenizer.decode(entry.tokens().tolist()))
        unparsed += letter is None
        correct += letter == questions[entry.qsl_idx].answer
    total = len(entries)
    return {"accuracy": correct / total if total else None, "correct": correct, "total": total,
            "unparsed": unparsed}


def submission_notes(scenario_cfg, user_conf: Path | None, valid: bool | None) -> list[str]:
    """Why a run cannot stand as an MLPerf submission result (empty when it can)."""
    notes = []
    if user_conf is None:
        notes.append("settings are wallperf's own, not mlperf.conf + user.conf (--user-conf)")
    if scenario_cfg.min_duration_s < SUBMISSION_MIN_DURATION_S:
        notes.append(f"min_duration {scenario_cfg.min_duration_s:g} s is below MLPerf's "
                     f"{SUBMISSION_MIN_DURATION_S} s")
    if valid is False:
        notes.append("LoadGen judged the run INVALID")
    return notes


def performance_record(log_dir: Path) -> dict:
    m = scenario_metrics(read_detail_log(log_dir / "mlperf_log_detail.txt"))
    return {
        "valid": m.valid,
        "invalid_reasons": list(m.invalid_reasons),
        "metrics": {
            "samples_per_second": m.samples_per_second,
            "tokens_per_second": m.tokens_per_second,
            "ttft_ms": m.ttft_ms,
            "tpot_ms": m.tpot_ms,
            "latency_ms": m.latency_ms,
            "sample_count": m.sample_count,
            "mmlu_accuracy": None,
        },
    }


def accuracy_record(log_dir: Path, questions, tokenizer) -> dict:
    detail = read_detail_log(log_dir / "mlperf_log_detail.txt")
    mmlu = score_mmlu(log_dir / "mlperf_log_accuracy.json", questions, tokenizer)
    return {
        # LoadGen does not judge accuracy runs; errors it logged still count.
        "valid": None if not detail.errors else False,
        "invalid_reasons": [f"LoadGen error: {e}" for e in detail.errors],
        "metrics": {
            "samples_per_second": None, "tokens_per_second": None, "ttft_ms": None, "tpot_ms": None,
            "latency_ms": None, "sample_count": mmlu["total"], "mmlu_accuracy": mmlu["accuracy"],
        },
        "mmlu": mmlu,
    }
