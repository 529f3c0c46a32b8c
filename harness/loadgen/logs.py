"""Reading what LoadGen wrote: `mlperf_log_detail.txt` and `mlperf_log_accuracy.json`.

Every figure here is one LoadGen logged; nothing is recomputed from latencies,
so a number we report is the number the MLPerf submission checker would read.
Key names were checked against logs written by mlcommons-loadgen 6.0.17.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wallperf.sut.scenarios import LOADGEN_SCENARIOS

_MLLOG_PREFIX = ":::MLLOG "
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})*")

# Each LoadGen scenario's samples/s and tokens/s keys (the scenario table says which and why).
_SAMPLES_PER_SECOND_KEY = {s.name: s.samples_per_second_key for s in LOADGEN_SCENARIOS.values()}
_TOKENS_PER_SECOND_KEY = {s.name: s.tokens_per_second_key for s in LOADGEN_SCENARIOS.values()}
_PERCENTILES = {"p50": "50.00", "p90": "90.00", "p99": "99.00"}
_LATENCY_KEY = "result_{}_percentile_latency_ns"
_QUERY_LATENCY_KEY = "result_{}_percentile_per_query_latency_ns"
_TTFT_KEY = "result_first_token_{}_percentile_latency_ns"
_TPOT_KEY = "result_time_per_output_token_{}_percentile_ns"

# LoadGen's own validity checks, in the order its summary prints them.
_VALIDITY_CHECKS = (
    ("result_perf_constraints_met", "performance constraints not met (Server latency limits)"),
    ("result_min_duration_met", "minimum duration not met"),
    ("result_min_queries_met", "minimum query/sample count not met"),
    ("early_stopping_met", "early stopping criterion not met"),
)
_EARLY_STOPPING_TEXTS = (
    ("early_stopping_result", "latency"),
    ("early_stopping_ttft_result", "TTFT"),
    ("early_stopping_tpot_result", "TPOT"),
)


class LogParseError(ValueError):
    """A LoadGen log that cannot be read; the message names the file and, where known, the line."""

    def __init__(self, path: Path | str, line: int | None, reason: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class DetailLog:
    """The entries of one `mlperf_log_detail.txt`; a key logged twice keeps its last value."""

    path: Path
    values: dict[str, Any]
    errors: tuple[Any, ...]
    warnings: tuple[Any, ...]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def read_detail_log(path: Path | str) -> DetailLog:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoadGen detail log not found: {path}")
    values: dict[str, Any] = {}
    errors: list[Any] = []
    warnings: list[Any] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LogParseError(path, None, f"not UTF-8 text (byte {exc.start}); is this the detail log?") from None
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        if not line.startswith(_MLLOG_PREFIX):
            raise LogParseError(path, line_no, "not a ':::MLLOG' line; is this the detail log?")
        try:
            entry = json.loads(line[len(_MLLOG_PREFIX):])
        except json.JSONDecodeError as exc:
            raise LogParseError(path, line_no, f"malformed MLLOG JSON ({exc.msg})") from None
        except RecursionError:
            raise LogParseError(path, line_no, "malformed MLLOG JSON (nested too deeply)") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or "value" not in entry:
            raise LogParseError(path, line_no, "MLLOG entry lacks a string 'key' or a 'value'")
        values[entry["key"]] = entry["value"]
        metadata = entry.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise LogParseError(path, line_no, "MLLOG entry's 'metadata' is not an object")
        if metadata.get("is_error"):
            errors.append(entry["value"])
        if metadata.get("is_warning"):
            warnings.append(entry["value"])
    if not values:
        raise LogParseError(path, None, "no MLLOG entries")
    return DetailLog(path=path, values=values, errors=tuple(errors), warnings=tuple(warnings))


@dataclass(frozen=True, slots=True)
class RunMetrics:
    """One performance run as LoadGen judged it; None wherever LoadGen logged nothing.

    Latency dicts map "p50"/"p90"/"p99" to milliseconds; a whole dict is None
    when the scenario or settings made LoadGen log none of those percentiles
    (e.g. TTFT in Offline or without use_token_latencies).
    """

    scenario: str
    mode: str
    valid: bool
    invalid_reasons: tuple[str, ...]
    loadgen_advice: str | None
    samples_per_second: float | None
    tokens_per_second: float | None
    latency_ms: dict[str, float | None] | None
    query_latency_ms: dict[str, float | None] | None
    ttft_ms: dict[str, float | None] | None
    tpot_ms: dict[str, float | None] | None
    query_count: int | None
    samples_per_query: int | None

    @property
    def sample_count(self) -> int | None:
        # Exact, not an estimate: LoadGen issues every query of a run with the same size.
        if self.query_count is None or self.samples_per_query is None:
            return None
        return self.query_count * self.samples_per_query


def scenario_metrics(log: DetailLog) -> RunMetrics:
    scenario = log.get("effective_scenario")
    mode = log.get("effective_test_mode")
    if not isinstance(scenario, str) or not isinstance(mode, str):
        raise LogParseError(log.path, None, "no effective_scenario/effective_test_mode: not a LoadGen detail log")
    if mode == "AccuracyOnly":
        raise ValueError(f"{log.path}: an AccuracyOnly run has no performance results")
    return RunMetrics(
        scenario=scenario,
        mode=mode,
        valid=log.get("result_validity") == "VALID",
        invalid_reasons=_invalid_reasons(log),
        loadgen_advice=(log.get("result_invalid_reason") or "").strip() or None,
        samples_per_second=_number(log, _SAMPLES_PER_SECOND_KEY.get(scenario)),
        tokens_per_second=_number(log, _TOKENS_PER_SECOND_KEY.get(scenario)),
        latency_ms=_percentiles_ms(log, _LATENCY_KEY),
        query_latency_ms=_percentiles_ms(log, _QUERY_LATENCY_KEY),
        ttft_ms=_percentiles_ms(log, _TTFT_KEY),
        tpot_ms=_percentiles_ms(log, _TPOT_KEY),
        query_count=log.get("result_query_count"),
        samples_per_query=log.get("generated_samples_per_query"),
    )


def _invalid_reasons(log: DetailLog) -> tuple[str, ...]:
    if "result_validity" not in log.values:
        return ("LoadGen logged no result: the run did not finish",)
    reasons = []
    for key, words in _VALIDITY_CHECKS:
        if log.get(key) is not False:
            continue
        if key == "early_stopping_met":
            details = [f"{label}: {_one_line(log.get(k))}" for k, label in _EARLY_STOPPING_TEXTS if log.get(k)]
            if details:
                words = f"{words} ({'; '.join(details)})"
        reasons.append(words)
    if log.get("result_validity") != "VALID" and not reasons:
        reasons.append(f"LoadGen reported {log.get('result_validity')!r} without naming a failed check")
    return tuple(reasons)


def _one_line(text) -> str:
    # LoadGen turns its multi-line recommendations into " * a.  * b." on one line.
    return " ".join(str(text).replace("*", " ").split())


def _number(log: DetailLog, key: str | None) -> float | None:
    value = log.get(key) if key else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LogParseError(log.path, None, f"{key} is {value!r}, not a number")
    return float(value)


def _percentiles_ms(log: DetailLog, key_format: str) -> dict[str, float | None] | None:
    found = {name: _number(log, key_format.format(pct)) for name, pct in _PERCENTILES.items()}
    if all(v is None for v in found.values()):
        return None
    return {name: None if ns is None else ns / 1e6 for name, ns in found.items()}


@dataclass(frozen=True, slots=True)
class AccuracyEntry:
    """One response in `mlperf_log_accuracy.json`; `data`/`token_data` are LoadGen's hex of the raw bytes.

    `token_data` is what the SUT reported with FirstTokenComplete; LoadGen logs it
    only in the streaming scenarios (not Offline) with use_token_latencies on.
    """

    seq_id: int
    qsl_idx: int
    data: str
    token_count: int | None
    token_data: str | None

    def tokens(self, dtype: str = "int32") -> np.ndarray:
        return decode_tokens(self.data, dtype)

    def first_tokens(self, dtype: str = "int32") -> np.ndarray | None:
        return None if self.token_data is None else decode_tokens(self.token_data, dtype)


def decode_tokens(hex_data: str, dtype: str = "int32") -> np.ndarray:
    """Token ids from LoadGen's hex dump; the SUT wrote them in the machine's (little-endian) order."""
    little_endian = np.dtype(dtype).newbyteorder("<")
    raw = bytes.fromhex(hex_data)
    if len(raw) % little_endian.itemsize:
        raise ValueError(f"{len(raw)} bytes are not a whole number of {dtype} tokens")
    return np.frombuffer(raw, dtype=little_endian)


def read_accuracy_log(path: Path | str) -> list[AccuracyEntry]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoadGen accuracy log not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LogParseError(path, exc.lineno, f"malformed JSON ({exc.msg}); did the run finish?") from None
    if not isinstance(raw, list):
        raise LogParseError(path, None, "expected a JSON list of responses")
    return [_accuracy_entry(path, i, item) for i, item in enumerate(raw)]


def _accuracy_entry(path: Path, position: int, item: Any) -> AccuracyEntry:
    where = f"entry {position}"
    if not isinstance(item, dict) or not {"seq_id", "qsl_idx", "data"} <= item.keys():
        raise LogParseError(path, None, f"{where} lacks seq_id, qsl_idx or data")
    for key in ("data", "token_data"):
        value = item.get(key)
        if value is not None and not (isinstance(value, str) and _HEX.fullmatch(value)):
            raise LogParseError(path, None, f"{where}: {key} is not a hex string of whole bytes")
    token_count = item.get("token_count")
    return AccuracyEntry(
        seq_id=int(item["seq_id"]),
        qsl_idx=int(item["qsl_idx"]),
        data=item["data"],
        token_count=None if token_count is None else int(token_count),
        token_data=item.get("token_data"),
    )
