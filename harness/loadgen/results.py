"""Result records: one per (scenario, mode), built from LoadGen's own logs.

results.json is a public contract that scripts read. Its LoadGen figures
(throughput, TTFT/TPOT/latency percentiles, sample counts, validity) are
parsed from mlperf_log_detail.txt, and MMLU accuracy is scored from
mlperf_log_accuracy.json; a figure LoadGen did not log is null, never
estimated. The run driver adds figures of other origin beside them:
`goodput` and `lengths` from the SUT's own clock and counts per query
(harness.loadgen.queries), `energy` from the hardware's counters over the
whole test (harness.hardware.energy), `roofline` computed from the model's
shape, the hardware profile or measured wall and the engine's batch and
context counters (harness.hardware.roofline), `engine`/`client` from the
backend's own counters.
"""
from __future__ import annotations

import io
import json
from importlib import metadata
from pathlib import Path

from wallperf.harness.loadgen.logs import read_accuracy_log, read_detail_log, scenario_metrics
from wallperf.harness.loadgen.qsl import parse_answer_letter
from wallperf.sut.atomic import atomic_file
from wallperf.sut.redact import redact, redact_obj

# MLPerf's minimum duration for a submission run.
SUBMISSION_MIN_DURATION_S = 600


def wallperf_version() -> str:
    try:
        return metadata.version("wallperf")
    except metadata.PackageNotFoundError:
        return "unknown"


class OutputError(OSError):
    """A result or report could not be written (a full disk, no permission): names the file."""


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`data` written through sut.atomic (a reader or a crash never sees half a file).
    0644: results, reports, charts and profiles hold no secret, and are meant to be shared."""
    path = Path(path)
    try:
        with atomic_file(path) as f:
            f.write(data)
    except OSError as e:
        raise OutputError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def write_text_atomic(path: Path, text: str) -> None:
    """Text, redacted, written as write_bytes_atomic writes (UTF-8). For prose
    (reports, logs); JSON goes through write_json_atomic."""
    write_bytes_atomic(path, redact(text).encode("utf-8"))


def write_figure_atomic(path: Path, fig, **savefig) -> None:
    """A matplotlib figure in the format `path`'s suffix names (png, svg, pdf), drawn
    in memory and written as write_bytes_atomic writes."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or None, **savefig)
    write_bytes_atomic(path, buf.getvalue())


def write_json_atomic(path: Path, obj) -> None:
    """`obj` as JSON, each of its strings redacted before it is serialized: the JSON
    text itself is never rewritten (a mask applied to it could break its escapes)."""
    write_bytes_atomic(path, (json.dumps(redact_obj(obj), indent=2) + "\n").encode("utf-8"))


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


def counter_delta(before: dict, after: dict) -> dict:
    """This test's share of cumulative counters: counts subtract, the hit rate is
    recomputed from them, configuration figures are kept."""
    out = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = counter_delta(before.get(k, {}), v)
        elif k in EXPERT_COUNTERS:
            out[k] = v - before.get(k, 0)
        else:
            out[k] = v
    if "hits" in out and "lookups" in out:
        out["hit_rate"] = out["hits"] / out["lookups"] if out["lookups"] else None
    return out


EXPERT_COUNTERS = ("steps", "selections", "lookups", "hits", "misses", "evictions", "bytes_loaded",
                    "load_seconds")


def decode_roofline(bytes_per_step: float, bandwidth_gbps: float, tpot_ms: dict | None) -> dict:
    """Decode alone against the wall: one step (bytes_per_step, at the run's
    decode batch) per time per output token, at LoadGen's TPOT median and p99.
    Unlike the run-level MBU, prefill time is not in it."""
    out = {"decode_achieved_bandwidth_gbps": None, "decode_mbu": None, "decode_mbu_at_p99": None}
    p50 = (tpot_ms or {}).get("p50")
    if not p50 or p50 <= 0:
        return out
    achieved = bytes_per_step / (p50 / 1e3)
    out["decode_achieved_bandwidth_gbps"] = achieved / 1e9
    out["decode_mbu"] = achieved / (bandwidth_gbps * 1e9)
    p99 = tpot_ms.get("p99")
    if p99 and p99 > 0:
        out["decode_mbu_at_p99"] = bytes_per_step / (p99 / 1e3) / (bandwidth_gbps * 1e9)
    return out


def roofline_summary(rf: dict) -> str:
    """The bound that applies at the run's batch, and the run's share of it."""
    mbu = (f"MBU {100 * rf['mbu']:.0f}% of {rf['peak_bandwidth_gbps']:.3g} GB/s "
           f"(wall {rf['memory_wall_tokens_per_second']:.3g} tok/s at batch 1)")
    mfu = f"MFU {100 * rf['mfu']:.0f}% of {rf['peak_tflops']:.3g} TFLOP/s {rf['compute_dtype']}, prefill counted"
    if rf.get("bound") == "compute":
        text = f"compute-bound at batch {rf['batch']}: {mfu}; {mbu}"
    else:
        text = f"memory-bound at batch {rf['batch']}: {mbu}"
    if rf.get("decode_mbu") is not None:
        text += f"; decode MBU {100 * rf['decode_mbu']:.0f}% at TPOT p50"
    if rf.get("trusted") is False:
        text += " ROOFLINE NOT TRUSTED: " + "; ".join(rf["untrusted_reasons"])
    return text


def summary_line(r: dict) -> str:
    m = r["metrics"]
    parts = [f"{r['scenario']} {r['mode']}:"]
    if r["mode"] == "performance":
        parts.append("VALID" if r["valid"] else f"INVALID ({'; '.join(r['invalid_reasons'])})")
        if m["tokens_per_second"] is not None:
            parts.append(f"{m['tokens_per_second']:.1f} tokens/s ({r['scenario']})")
        if m["samples_per_second"] is not None:
            parts.append(f"{m['samples_per_second']:.2f} samples/s")
        for name in ("ttft_ms", "tpot_ms"):
            if m[name] and m[name]["p99"] is not None:
                parts.append(f"{name[:4].upper()} p99 {m[name]['p99']:.0f} ms")
        if r.get("roofline"):
            parts.append(roofline_summary(r["roofline"]))
    else:
        mm = r["mmlu"]
        parts.append(f"MMLU {mm['correct']}/{mm['total']}" +
                     (f" = {100 * mm['accuracy']:.1f}%" if mm["accuracy"] is not None else ""))
        parts.append("TEST06 " + ("passed" if r["compliance"]["test06"]["passed"] else "FAILED"))
    parts.append("[not valid for submission]" if not r["submission_valid"] else "[submission-valid]")
    return " ".join(parts)
