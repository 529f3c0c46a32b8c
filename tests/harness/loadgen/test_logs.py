"""wallperf.harness.loadgen.logs against logs the real LoadGen wrote.

The oracle is LoadGen's own human-readable `mlperf_log_summary.txt`, read here
with small regexes: it is printed by a different code path (results.cc
LogSummary) from the detail log the parser reads (LogDetail).
"""
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wallperf.harness.loadgen.logs import (
    LogParseError,
    decode_tokens,
    read_accuracy_log,
    read_detail_log,
    scenario_metrics,
)

NULL_SUT = Path(__file__).with_name("loadgen_null_sut.py")
# The null SUT's answer to qsl sample i starts with token 100 + i (see its answer_tokens).
FIRST_TOKEN_BASE = 100
# Summary line label -> the words harness.loadgen.logs uses for that failed check.
SUMMARY_CHECKS = {
    "Performance constraints satisfied": "performance constraints",
    "Min duration satisfied": "minimum duration",
    "Min queries satisfied": "minimum query",
    "Early stopping satisfied": "early stopping",
}


def run_loadgen(outdir: Path, *args: str) -> Path:
    proc = subprocess.run(
        [sys.executable, str(NULL_SUT), "--outdir", str(outdir), *args],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return outdir


def summary_text(run: Path) -> str:
    return (run / "mlperf_log_summary.txt").read_text()


def summary_value(summary: str, label: str) -> str:
    match = re.search(rf"^{re.escape(label)}\s*:\s*(\S+)", summary, re.MULTILINE)
    assert match, f"{label!r} not in summary"
    return match.group(1)


def summary_percentiles_ns(summary: str, what: str) -> dict[str, int]:
    """`what` is e.g. "latency", "first token latency", "time to output token"."""
    return {name: int(summary_value(summary, f"{pct} percentile {what} (ns)"))
            for name, pct in (("p50", "50.00"), ("p90", "90.00"), ("p99", "99.00"))}


def assert_ms_equal_ns(metric_ms: dict, reference_ns: dict) -> None:
    assert metric_ms.keys() == reference_ns.keys()
    for name, ns in reference_ns.items():
        assert metric_ms[name] == pytest.approx(ns / 1e6, rel=1e-12), name


def metrics_of(run: Path):
    return scenario_metrics(read_detail_log(run / "mlperf_log_detail.txt"))


def assert_validity_matches_summary(metrics, summary: str) -> None:
    assert metrics.valid == (summary_value(summary, "Result is") == "VALID")
    failed_in_summary = {
        words for label, words in SUMMARY_CHECKS.items()
        if re.search(rf"^\s*{label}\s*:\s*NO", summary, re.MULTILINE)
    }
    failed_in_metrics = {words for words in SUMMARY_CHECKS.values()
                         if any(reason.startswith(words) for reason in metrics.invalid_reasons)}
    assert failed_in_metrics == failed_in_summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("loadgen")
    token = "--token-latencies"
    return {
        # 33 samples at 12 ms each outlast the 300 ms minimum duration.
        "offline": run_loadgen(base / "offline", "--scenario", "Offline", token, "--qps", "100", "--delay-ms", "12"),
        # No delay and no token latencies: finishes long before the minimum duration.
        "offline_short": run_loadgen(base / "offline_short", "--scenario", "Offline", "--delay-ms", "0"),
        "server": run_loadgen(base / "server", "--scenario", "Server", token),
        "server_ttft_1ns": run_loadgen(base / "server_ttft_1ns", "--scenario", "Server", token, "--ttft-ns", "1"),
        "single": run_loadgen(base / "single", "--scenario", "SingleStream", token),
        "multi": run_loadgen(base / "multi", "--scenario", "MultiStream", token),
        "errors": run_loadgen(base / "errors", "--scenario", "SingleStream", token, "--fault", "no_first_token"),
        "accuracy": run_loadgen(base / "accuracy", "--scenario", "Server", token, "--mode", "AccuracyOnly"),
    }


def test_offline_matches_summary(runs):
    m, summary = metrics_of(runs["offline"]), summary_text(runs["offline"])
    assert (m.scenario, m.mode) == ("Offline", "PerformanceOnly")
    assert m.valid and m.invalid_reasons == () and m.loadgen_advice is None
    assert_validity_matches_summary(m, summary)
    assert m.samples_per_second == pytest.approx(float(summary_value(summary, "Samples per second")), rel=1e-4)
    assert m.tokens_per_second == pytest.approx(float(summary_value(summary, "Tokens per second")), rel=1e-4)
    assert_ms_equal_ns(m.latency_ms, summary_percentiles_ns(summary, "latency"))
    assert m.ttft_ms is None and m.tpot_ms is None and m.query_latency_ms is None
    assert m.query_count == 1
    assert m.sample_count == int(summary_value(summary, "samples_per_query"))


def test_offline_too_short_is_invalid_and_absent_values_are_none(runs):
    m, summary = metrics_of(runs["offline_short"]), summary_text(runs["offline_short"])
    assert not m.valid
    assert_validity_matches_summary(m, summary)
    assert any(r.startswith("minimum duration") for r in m.invalid_reasons)
    assert m.loadgen_advice and m.loadgen_advice in " ".join(summary.split())
    assert m.tokens_per_second is None
    assert m.ttft_ms is None and m.tpot_ms is None


def test_server_token_metrics_match_summary(runs):
    m, summary = metrics_of(runs["server"]), summary_text(runs["server"])
    assert m.scenario == "Server" and m.valid
    assert_validity_matches_summary(m, summary)
    assert m.samples_per_second == pytest.approx(
        float(summary_value(summary, "Completed samples per second")), rel=1e-4)
    assert m.tokens_per_second == pytest.approx(
        float(summary_value(summary, "Completed tokens per second")), rel=1e-4)
    assert_ms_equal_ns(m.latency_ms, summary_percentiles_ns(summary, "latency"))
    assert_ms_equal_ns(m.ttft_ms, summary_percentiles_ns(summary, "first token latency"))
    assert_ms_equal_ns(m.tpot_ms, summary_percentiles_ns(summary, "time to output token"))
    assert m.samples_per_query == 1 and m.sample_count == m.query_count


def test_server_impossible_ttft_is_invalid_with_reasons(runs):
    m, summary = metrics_of(runs["server_ttft_1ns"]), summary_text(runs["server_ttft_1ns"])
    assert not m.valid
    assert_validity_matches_summary(m, summary)
    assert any(r.startswith("performance constraints") for r in m.invalid_reasons)
    early = [r for r in m.invalid_reasons if r.startswith("early stopping")]
    assert early and "TTFT: Run unsuccessful" in early[0]
    assert "TTFT" in m.loadgen_advice
    # The figures are still reported for an invalid run.
    assert m.tokens_per_second == pytest.approx(
        float(summary_value(summary, "Completed tokens per second")), rel=1e-4)


def test_single_stream_matches_summary(runs):
    m, summary = metrics_of(runs["single"]), summary_text(runs["single"])
    assert m.scenario == "SingleStream"
    assert_validity_matches_summary(m, summary)
    assert m.samples_per_second == pytest.approx(float(summary_value(summary, "QPS w/ loadgen overhead")), rel=1e-4)
    assert m.tokens_per_second == pytest.approx(float(summary_value(summary, "TPS w/ loadgen overhead")), rel=1e-4)
    assert_ms_equal_ns(m.latency_ms, summary_percentiles_ns(summary, "latency"))
    assert_ms_equal_ns(m.ttft_ms, summary_percentiles_ns(summary, "first token latency"))
    assert_ms_equal_ns(m.tpot_ms, summary_percentiles_ns(summary, "time to output token"))


def test_multi_stream_reports_per_query_latency_and_no_samples_per_second(runs):
    m, summary = metrics_of(runs["multi"]), summary_text(runs["multi"])
    assert m.scenario == "MultiStream"
    assert_validity_matches_summary(m, summary)
    # MultiStream's summary prints only the per-query percentiles.
    assert_ms_equal_ns(m.query_latency_ms, summary_percentiles_ns(summary, "latency"))
    assert m.samples_per_second is None
    assert m.samples_per_query == 8


def test_errors_are_collected(runs):
    log = read_detail_log(runs["errors"] / "mlperf_log_detail.txt")
    n_errors = int(re.search(r"^(\d+) ERRORS encountered", summary_text(runs["errors"]), re.MULTILINE).group(1))
    assert n_errors > 0 and len(log.errors) == n_errors
    assert all("first token" in str(e) for e in log.errors)
    assert log.warnings == ()


def test_last_occurrence_wins_and_warnings(runs, tmp_path):
    lines = (runs["server"] / "mlperf_log_detail.txt").read_text().splitlines()
    entry = json.loads(next(l for l in lines if '"result_validity"' in l).removeprefix(":::MLLOG "))
    entry["value"] = "INVALID"
    entry["metadata"]["is_warning"] = True
    edited = tmp_path / "mlperf_log_detail.txt"
    edited.write_text("\n".join(lines + [":::MLLOG " + json.dumps(entry)]) + "\n")
    log = read_detail_log(edited)
    assert log.get("result_validity") == "INVALID" and log.warnings == ("INVALID",)
    assert not scenario_metrics(log).valid


@pytest.mark.parametrize("bad_line", [':::MLLOG {"key": "x", "value": ', "MLPerf Results Summary", ':::MLLOG {"value": 1}'])
def test_malformed_line_names_file_and_line(runs, tmp_path, bad_line):
    lines = (runs["offline"] / "mlperf_log_detail.txt").read_text().splitlines()
    lines[4] = bad_line
    bad = tmp_path / "mlperf_log_detail.txt"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogParseError, match=rf"{re.escape(str(bad))}:5: "):
        read_detail_log(bad)


def test_missing_files_name_the_path(tmp_path):
    for reader, name in ((read_detail_log, "mlperf_log_detail.txt"), (read_accuracy_log, "mlperf_log_accuracy.json")):
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / name))):
            reader(tmp_path / name)


def test_accuracy_only_log_has_no_performance_metrics(runs):
    with pytest.raises(ValueError, match="AccuracyOnly"):
        metrics_of(runs["accuracy"])


def test_accuracy_log_entries_decode(runs):
    entries = read_accuracy_log(runs["accuracy"] / "mlperf_log_accuracy.json")
    assert sorted(e.qsl_idx for e in entries) == list(range(30))
    for e in entries:
        raw = bytes.fromhex(e.data)
        reference = list(struct.unpack(f"<{len(raw) // 4}i", raw))
        assert e.tokens().tolist() == reference
        assert reference[0] == FIRST_TOKEN_BASE + e.qsl_idx
        assert e.token_count == len(reference)
        assert e.first_tokens().tolist() == [FIRST_TOKEN_BASE + e.qsl_idx]


def test_decode_tokens_dtypes_and_errors():
    assert decode_tokens(struct.pack("<3q", 1, -2, 2**40).hex(), "int64").tolist() == [1, -2, 2**40]
    assert decode_tokens("").tolist() == []
    with pytest.raises(ValueError, match="whole number"):
        decode_tokens("010203")


def test_malformed_accuracy_log(tmp_path):
    truncated = tmp_path / "truncated.json"
    truncated.write_text('[\n{ "seq_id" : 0, "qsl_idx" : 3, "data" : "01000000", "token_count" : 1 },\n')
    with pytest.raises(LogParseError, match=rf"{re.escape(str(truncated))}:3: "):
        read_accuracy_log(truncated)
    not_hex = tmp_path / "not_hex.json"
    not_hex.write_text('[{"seq_id": 0, "qsl_idx": 3, "data": "zz", "token_count": 1}]')
    with pytest.raises(LogParseError, match="entry 0: data is not a hex string"):
        read_accuracy_log(not_hex)
    no_count = tmp_path / "no_count.json"
    no_count.write_text('[{"seq_id": 0, "qsl_idx": 3, "data": "01000000"}]')
    (entry,) = read_accuracy_log(no_count)
    assert entry.token_count is None and entry.token_data is None and entry.first_tokens() is None
    assert np.array_equal(entry.tokens(), [1])
