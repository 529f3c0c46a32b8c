"""accuracy/accuracy.txt as the submission checker reads it, and the truncated
accuracy log it expects beside it.

The checker matches one regular expression per metric against each line (for
llama3.1-8b(-edge) `'rouge1': X` ... `'gen_len': N`; for deepseek-r1, gpt-oss-120b
and llama3.1-405b `'exact_match': X` and `'tokens_per_sample': X`) and wants a
`hash=` line: the sha256 of the whole mlperf_log_accuracy.json, which is then cut
to its first and last 4 KiB (the checker refuses one over 10 KiB).

wallperf's data set is MMLU, so its accuracy file reports MMLU exact match and
tokens per sample in that line format. That is honest for the open division
only: a closed result needs the benchmark's own data set and metric (ROUGE on
CNN/DailyMail for llama3.1-8b), which `wallperf submission` refuses to fake.
Below the hash, the file names each metric the checker parses for the benchmark
(harness.config.benchmarks' accuracy_metrics) and says which of them the line
reports, measured on what, and which it cannot report. A run without an MMLU
score is refused, never written as a zero.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from wallperf.harness.config import ConfigError
from wallperf.harness.config.benchmarks import benchmark
from wallperf.harness.loadgen.logs import read_accuracy_log

VIEWABLE_BYTES = 4096


# The checker's metric names (its ACC_PATTERN keys) the results line fills, and with what.
REPORTED = {
    "exact_match": "MMLU exact match (%)",
    "TOKENS_PER_SAMPLE": "mean output tokens per MMLU answer",
}


def require_accuracy(record: dict) -> float:
    """The accuracy run's MMLU accuracy (0..1); a ConfigError naming the run when it has none."""
    mmlu = record.get("mmlu") or {}
    if mmlu.get("accuracy") is None:
        raise ConfigError(record.get("log_dir"), "mmlu.accuracy",
                          f"the {record.get('scenario')} accuracy run has no MMLU score ({mmlu.get('total', 0)} "
                          "answers scored); rerun it with `wallperf run --submission` and package that run")
    return mmlu["accuracy"]


def accuracy_line(record: dict, accuracy_log: Path) -> str:
    """The results line: MMLU exact match (%) and mean output tokens per sample."""
    entries = read_accuracy_log(accuracy_log)
    tokens = [e.token_count if e.token_count is not None else len(e.tokens()) for e in entries]
    exact = 100.0 * require_accuracy(record)
    per_sample = sum(tokens) / len(tokens) if tokens else 0.0
    return (f"{{'exact_match': {exact:.4f}, 'tokens_per_sample': {per_sample:.2f}, 'gen_num': {len(tokens)}, "
            f"'dataset': 'mmlu'}}")


def metric_notes(benchmark_name: str) -> str:
    """Which of the benchmark's checker metrics the results line reports, and why the others
    are absent. No line starts with a metric's key or quotes one, so none matches a pattern
    of the checker's."""
    bench = benchmark(benchmark_name)
    lines = [f"# wallperf scores MMLU: {' and '.join(REPORTED.values())} stand in for {bench.checker_name}'s "
             "own accuracy, which only its own data set gives; an open-division result only.",
             f"# The checker parses {', '.join(bench.accuracy_metrics)} for {bench.checker_name}:"]
    lines += [f"# {name}: reported, as {REPORTED[name]}" if name in REPORTED else
              f"# {name}: not reported, it needs {bench.checker_name}'s own data set"
              for name in bench.accuracy_metrics]
    return "\n".join(lines) + "\n"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_accuracy_dir(record: dict, run_dir: Path, out_dir: Path) -> None:
    """accuracy.txt, the truncated accuracy log and LoadGen's other logs of one accuracy run."""
    log = Path(run_dir) / "mlperf_log_accuracy.json"
    text = ("Results\n\n" + accuracy_line(record, log) + "\n\nhash=" + sha256_file(log) + "\n\n"
            + metric_notes(record["benchmark"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "accuracy.txt").write_text(text)
    for name in ("mlperf_log_summary.txt", "mlperf_log_detail.txt"):
        (out_dir / name).write_bytes((Path(run_dir) / name).read_bytes())
    write_truncated(log, out_dir / "mlperf_log_accuracy.json")


def write_truncated(src: Path, dst: Path) -> None:
    """The first and last VIEWABLE_BYTES of a log, as the checker wants it submitted."""
    data = Path(src).read_bytes()
    if len(data) > 2 * VIEWABLE_BYTES:
        data = data[:VIEWABLE_BYTES] + b"\n\n...\n\n" + data[-VIEWABLE_BYTES:]
    Path(dst).write_bytes(data)
