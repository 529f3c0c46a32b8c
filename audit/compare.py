"""`wallperf compare RUN_DIR...`: the performance runs of results folders side by side.

One row per performance run, grouped by scenario, with the figures a reader
weighs engines by: tokens/s (and its ratio to the scenario's best run, or to
the first RUN_DIR's), samples/s, p99 TTFT and TPOT, MBU (the share of the
memory bandwidth the run used, i.e. how close it came to the memory wall) and
LoadGen's verdict. Every figure is read from results.json as `wallperf run`
wrote it; only the ratio is computed here. Accuracy runs get a second, small
table (MMLU).

A ratio says little about the faster system when its baseline runs far below
its own wall: every ratio whose reference run is memory-bound with decode MBU
under 50% (whole-run MBU where LoadGen measured no TPOT), or compute-bound with
MFU under 30%, is marked as measured against an unoptimized baseline (`*` in
the tables, `weak_baseline` and `baseline_note` in the JSON).

Records of a `--find-peak` search are tries at different loads, not results of
their own: each search's peak (its highest VALID try) is shown, marked with its
QPS, and the other tries are left out and counted.

A run whose own record says its roofline cannot be trusted (an MBU or MFU above
1: the wall or the byte count is wrong, `roofline.trusted` false) keeps its
figures, but its MBU cells carry `!` and a note below the table gives the
record's reasons (`roofline_trusted`, `untrusted_reasons` in the JSON): an
impossible figure is never printed quietly.

Past the ~350 lines aimed for: the table, its marks (weak baseline, untrusted
roofline, peak tries) and the JSON are one reading of the records, kept together.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from wallperf.harness.config import ConfigError
from wallperf.sut.scenarios import SCENARIO_NAMES

MISSING = "–"
SCENARIO_ORDER = SCENARIO_NAMES
VS = ("best", "first")
# Below these a baseline is far from its own wall (see the module docstring).
WEAK_DECODE_MBU = 0.5
WEAK_MFU = 0.3


@dataclass(frozen=True)
class RunDir:
    """One results folder: the label it was named by, its results.json and the parsed object."""

    label: str
    path: Path
    results: dict

    @property
    def runs(self) -> list[dict]:
        return self.results["runs"]


def read_run_dir(arg: Path) -> RunDir:
    """A folder written by `wallperf run` (or its results.json), checked for shape."""
    path = arg if arg.is_file() else arg / "results.json"
    if not path.is_file():
        raise ConfigError(arg, None, "no results.json found; give a folder written by `wallperf run`")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(path, None, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, None, f"cannot read it: {e}") from None
    runs = results.get("runs") if isinstance(results, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ConfigError(path, "runs", "not a wallperf results.json: expected an object whose 'runs' "
                          "is a list of run records")
    if not any(r.get("mode") == "performance" for r in runs):
        held = f"it holds {len(runs)} accuracy run(s)" if runs else "its 'runs' list is empty"
        if results.get("complete") is False:
            held += " and the run did not complete"
        raise ConfigError(path, "runs", f"no performance runs to compare ({held})")
    return RunDir(str(arg), path, results)


def _number(value):
    """A figure, or None for anything else (a missing key, null, or a value of the wrong type)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value):
    return None if value is None else str(value)


def _p99(metrics: dict, name: str):
    return _number(_mapping(metrics.get(name)).get("p99"))


def record_row(run_dir: RunDir, record: dict, find_peak_qps=None) -> dict:
    """The fields of one run record that the tables show; the same keys for both modes."""
    m, rf, mmlu = (_mapping(record.get(k)) for k in ("metrics", "roofline", "mmlu"))
    valid, reasons, emulated = (record.get(k) for k in ("valid", "invalid_reasons", "fp8_emulated"))
    trusted, untrusted = rf.get("trusted"), rf.get("untrusted_reasons")
    return {
        "run": run_dir.label,
        "results": str(run_dir.path),
        "scenario": _text(record.get("scenario")),
        "mode": _text(record.get("mode")),
        "model": _text(record.get("model")),
        "backend": _text(record.get("backend")),
        "hardware": _text(record.get("hardware")),
        "dtype": _text(record.get("dtype")),
        "weight_format": _text(record.get("weight_format")),
        "fp8_emulated": emulated if isinstance(emulated, bool) else None,
        "tokens_per_second": _number(m.get("tokens_per_second")),
        "ratio": None,
        "ratio_to": None,
        "samples_per_second": _number(m.get("samples_per_second")),
        "ttft_p99_ms": _p99(m, "ttft_ms"),
        "tpot_p99_ms": _p99(m, "tpot_ms"),
        "mbu": _number(rf.get("mbu")),
        "decode_mbu": _number(rf.get("decode_mbu")),
        "mfu": _number(rf.get("mfu")),
        "roofline_trusted": trusted if isinstance(trusted, bool) else None,
        "untrusted_reasons": [str(r) for r in untrusted] if isinstance(untrusted, list) else [],
        "bound": "compute" if rf.get("bound") == "compute" else "memory",
        "memory_wall_tokens_per_second": _number(rf.get("memory_wall_tokens_per_second")),
        "weak_baseline": False,
        "baseline_note": None,
        "valid": valid if isinstance(valid, bool) else None,
        "invalid_reasons": [str(r) for r in reasons] if isinstance(reasons, list) else [],
        "find_peak_qps": find_peak_qps,
        "mmlu_accuracy": _number(mmlu.get("accuracy", m.get("mmlu_accuracy"))),
        "mmlu_correct": _number(mmlu.get("correct")),
        "mmlu_total": _number(mmlu.get("total")),
    }


def _peak_tries(results: dict) -> dict:
    """log_dir -> target QPS of each find-peak search's peak try."""
    peaks = {}
    for search in _mapping(results.get("find_peak")).values():
        search = _mapping(search)
        qps, curve = _number(search.get("peak_qps")), search.get("curve")
        for point in curve if isinstance(curve, list) and qps is not None else ():
            if isinstance(point, dict) and point.get("qps") == qps and isinstance(point.get("log_dir"), str):
                peaks[point["log_dir"]] = qps
    return peaks


def _scenario_key(scenario: str | None):
    name = scenario or ""
    return (SCENARIO_ORDER.index(name) if name in SCENARIO_ORDER else len(SCENARIO_ORDER), name)


def compare(run_dirs: list[RunDir], vs: str = "best") -> tuple[list[dict], list[dict], int]:
    """(performance rows, accuracy rows, find-peak tries left out).

    Performance rows are grouped by scenario (MLPerf's order, then by name); within a
    scenario they are sorted by tokens/s, highest first, when compared to the best run,
    and kept in command-line order when compared to the first. `ratio` is the row's
    tokens/s over the reference run's: the scenario's highest, or the first row of the
    scenario in command-line order; None where either figure is missing.
    """
    if vs not in VS:
        raise ValueError(f"vs must be one of {', '.join(VS)}, got {vs!r}")
    performance, accuracy, left_out = [], [], 0
    for run_dir in run_dirs:
        peaks = _peak_tries(run_dir.results)
        for record in run_dir.runs:
            if record.get("mode") == "accuracy":
                accuracy.append(record_row(run_dir, record))
            elif record.get("mode") == "performance":
                if not record.get("find_peak_try"):
                    performance.append(record_row(run_dir, record))
                elif isinstance(record.get("log_dir"), str) and record["log_dir"] in peaks:
                    performance.append(record_row(run_dir, record, peaks[record["log_dir"]]))
                else:
                    left_out += 1
    groups: dict = {}
    for row in performance:
        groups.setdefault(row["scenario"], []).append(row)
    ordered = []
    for scenario in sorted(groups, key=_scenario_key):
        rows = groups[scenario]
        figures = [r["tokens_per_second"] for r in rows if r["tokens_per_second"] is not None]
        reference = max(figures, default=None) if vs == "best" else rows[0]["tokens_per_second"]
        reference_row = next((r for r in rows if r["tokens_per_second"] == reference), None)
        weakness = None if reference_row is None else baseline_weakness(reference_row)
        for r in rows:
            r["ratio_to"] = vs
            if r["tokens_per_second"] is not None and reference:
                r["ratio"] = r["tokens_per_second"] / reference
                if weakness and r is not reference_row:
                    r["weak_baseline"] = True
                    r["baseline_note"] = (f"measured against an unoptimized baseline: {_run(reference_row)} "
                                          f"{weakness}")
        if vs == "best":
            rows = sorted(rows, key=lambda r: (r["tokens_per_second"] is None, -(r["tokens_per_second"] or 0)))
        ordered += rows
    accuracy.sort(key=lambda r: _scenario_key(r["scenario"]))
    return ordered, accuracy, left_out


def baseline_weakness(row: dict) -> str | None:
    """Why a run is too far from its own wall to be a baseline worth beating, or None."""
    if row["bound"] == "compute":
        mfu = row["mfu"]
        if mfu is not None and mfu < WEAK_MFU:
            return f"is compute-bound at MFU {100 * mfu:.0f}% (< {100 * WEAK_MFU:.0f}%)"
        return None
    mbu, what = (row["decode_mbu"], "decode MBU") if row["decode_mbu"] is not None else (row["mbu"], "MBU")
    if mbu is not None and mbu < WEAK_DECODE_MBU:
        return f"runs at {what} {100 * mbu:.0f}% of its memory wall (< {100 * WEAK_DECODE_MBU:.0f}%)"
    return None


# -- rendering ---------------------------------------------------------------

def _figure(value) -> str:
    if value is None:
        return MISSING
    return f"{value:,.1f}" if abs(value) >= 1 else f"{value:.3g}"


def _percent(fraction) -> str:
    return MISSING if fraction is None else f"{100 * fraction:.1f}%"


def _mbu_cell(key: str):
    def cell(row: dict) -> str:
        text = _percent(row[key])
        return text + "!" if row["roofline_trusted"] is False and row[key] is not None else text
    return cell


def _ratio(row: dict) -> str:
    value = row["ratio"]
    return MISSING if value is None else f"{value:.2f}x" + ("*" if row["weak_baseline"] else "")


def _format(row: dict) -> str:
    dtype, weights = row["dtype"], row["weight_format"]
    text = weights if dtype is None or weights in (None, dtype) else f"{weights}/{dtype}"
    text = text or dtype or MISSING
    return f"{text} (emulated)" if row["fp8_emulated"] else text


def _run(row: dict) -> str:
    return row["run"] if row["find_peak_qps"] is None else f"{row['run']} (peak {row['find_peak_qps']:g} QPS)"


def _verdict(row: dict) -> str:
    return {True: "VALID", False: "INVALID"}.get(row["valid"], MISSING)


def _cell(row: dict, key: str) -> str:
    return MISSING if row[key] is None else row[key]


# (header, cell of a row, right-aligned)
def _performance_columns(vs: str, with_model: bool) -> list:
    return [("scenario", lambda r: _cell(r, "scenario"), False), ("run", _run, False),
            *([("model", lambda r: _cell(r, "model"), False)] if with_model else []),
            ("backend", lambda r: _cell(r, "backend"), False), ("hardware", lambda r: _cell(r, "hardware"), False),
            ("format", _format, False), ("tokens/s", lambda r: _figure(r["tokens_per_second"]), True),
            (f"x {vs}", _ratio, True),
            ("samples/s", lambda r: _figure(r["samples_per_second"]), True),
            ("TTFT p99 ms", lambda r: _figure(r["ttft_p99_ms"]), True),
            ("TPOT p99 ms", lambda r: _figure(r["tpot_p99_ms"]), True),
            ("MBU", _mbu_cell("mbu"), True),
            ("decode MBU", _mbu_cell("decode_mbu"), True), ("LoadGen", _verdict, False)]


def _accuracy_columns(with_model: bool) -> list:
    def correct(r):
        return " / ".join(MISSING if r[k] is None else f"{r[k]:g}" for k in ("mmlu_correct", "mmlu_total"))

    return [("scenario", lambda r: _cell(r, "scenario"), False), ("run", _run, False),
            *([("model", lambda r: _cell(r, "model"), False)] if with_model else []),
            ("backend", lambda r: _cell(r, "backend"), False), ("hardware", lambda r: _cell(r, "hardware"), False),
            ("format", _format, False), ("MMLU", lambda r: _percent(r["mmlu_accuracy"]), True),
            ("correct", correct, True)]


def format_text(rows: list[dict], columns: list) -> str:
    cells = [[cell(r) for _, cell, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if right else v.ljust(w)
                         for v, w, (_, _, right) in zip(values, widths, columns)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line([h for h, _, _ in columns]), rule, *(line(c) for c in cells)])


_MD_ESCAPES = str.maketrans({"|": "\\|", "\\": "\\\\", "*": "\\*", "\n": " ", "\r": " "})


def format_markdown(rows: list[dict], columns: list) -> str:
    def line(values):
        return "| " + " | ".join(v.translate(_MD_ESCAPES) for v in values) + " |"

    rule = "|" + "|".join("---:" if right else "---" for _, _, right in columns) + "|"
    return "\n".join([line([h for h, _, _ in columns]), rule, *(line([c(r) for _, c, _ in columns]) for r in rows)])


def render(performance: list[dict], accuracy: list[dict], left_out: int, vs: str, markdown: bool) -> str:
    with_model = len({r["model"] for r in performance + accuracy}) > 1
    table = format_markdown if markdown else format_text
    reference = "the best run of its scenario" if vs == "best" else "the first RUN_DIR's run of its scenario"
    heading = "## {}" if markdown else "{}"
    parts = [heading.format("Performance"),
             table(performance, _performance_columns(vs, with_model)),
             "", f"x {vs}: tokens/s over {reference}. MBU: achieved memory bandwidth over the hardware's "
             f"peak (closest to the memory wall = highest), over the whole run (prefill included); decode MBU: "
             f"one decode step's bytes per TPOT p50, decode alone."]
    notes = sorted({r["baseline_note"] for r in performance if r["weak_baseline"]})
    parts += [f"* {note}: the ratio says little about the faster system." for note in notes]
    parts += [f"! {_run(r)} {r['scenario']}: roofline NOT TRUSTED (the wall or the byte count is wrong): "
              + ("; ".join(r["untrusted_reasons"]) or "its record gives no reason")
              for r in performance if r["roofline_trusted"] is False]
    if left_out:
        parts.append(f"{left_out} find-peak tries left out; each search's peak is shown, marked with its QPS.")
    if accuracy:
        parts += ["", heading.format("Accuracy"), table(accuracy, _accuracy_columns(with_model))]
    return "\n".join(parts)


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare", help="performance runs of results folders side by side",
        description="One row per performance run of each RUN_DIR (written by `wallperf run`), grouped by "
                    "scenario: tokens/s and its ratio to the scenario's best run (or the first RUN_DIR's), "
                    "samples/s, p99 TTFT and TPOT, MBU and LoadGen's verdict; accuracy runs (MMLU) in a "
                    "second table. Of a --find-peak search only the peak try is shown. Missing figures "
                    f"print as {MISSING}.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="a folder holding results.json (or the file itself), or one written by `wallperf sweep "
                   "--concurrency` (its points as a table, and on --pareto's chart)")
    p.add_argument("--vs", choices=VS, default="best", help="the ratio column's reference: the scenario's "
                   "highest tokens/s (default), or the first RUN_DIR that has the scenario")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the rows as a JSON list of objects "
                        "(performance rows, then accuracy rows; missing figures are null)")
    output.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--pareto", type=Path, metavar="FILE.png", help="draw the RUN_DIRs written by `wallperf "
                   "sweep` on one Pareto chart: tokens/s per user against system tokens/s, one series per "
                   "sweep (backend), each beside its roofline front; with a `--concurrency` sweep among them, "
                   "the MLPerf Endpoints chart (system tokens/s against 1000 / TPOT p90, step functions) with "
                   "the LoadGen Server sweeps on the same axes")
    return p


def cmd_compare(args) -> int:
    from wallperf.audit.pareto import (concurrency_series, concurrency_table, loadgen_series,
                                       read_concurrency_sweep, series_of, write_concurrency_png, write_pareto_png)

    # `wallperf sweep --concurrency` folders (sweep.json only) beside `wallperf run`/`sweep` folders.
    concurrency = [s for d in args.run_dirs if (s := read_concurrency_sweep(Path(d))) is not None]
    run_dirs = [read_run_dir(Path(d)) for d in args.run_dirs if read_concurrency_sweep(Path(d)) is None]
    performance, accuracy, left_out = compare(run_dirs, args.vs) if run_dirs else ([], [], 0)
    if args.pareto is not None:
        sweeps = [d.results["sweep"] for d in run_dirs if isinstance(d.results.get("sweep"), dict)]
        if not sweeps and not concurrency:
            raise ConfigError("command line", "--pareto", "none of the RUN_DIRs was written by `wallperf sweep`")
        if concurrency:
            # The Endpoints axes, LoadGen Server sweeps beside the fixed-concurrency ones.
            write_concurrency_png(args.pareto, [*map(concurrency_series, concurrency), *map(loadgen_series, sweeps)])
        else:
            write_pareto_png(args.pareto, [series_of(s) for s in sweeps])
    if args.json:
        print(json.dumps(performance + accuracy + [{"concurrency_sweep": concurrency_series(s)["label"], **p}
                                                   for s in concurrency for p in s["points"]], indent=2))
    else:
        parts = [render(performance, accuracy, left_out, args.vs, args.markdown)] if run_dirs else []
        print("\n".join(parts + [concurrency_table(s) for s in concurrency]))
    return 0
