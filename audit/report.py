"""`wallperf report`: one results folder, or several side by side, as HTML and Markdown.

Every figure stands beside the memory wall it should be read against. The
context handed to the templates is built here, every number already formatted,
so the templates only lay it out (audit/templates/report.{html,md}.j2).

Strings from results.json and audit.json (model names, LoadGen's reasons, the
audit's specs) are data and may hold anything: the HTML environment escapes
every expression, and the Markdown one passes every expression through
`markdown_text`. The HTML is one self-contained file: charts are base64 PNGs
drawn with matplotlib's Agg canvas, styles are inline, nothing is fetched.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2
from markupsafe import Markup

from wallperf.audit.charts import PERCENTILES, accuracy_wall_chart, latency_chart, png, roofline_chart
from wallperf.audit.pareto import pareto_figure, series_of
from wallperf.audit.report_speculative import speculative_section
from wallperf.audit.perf_audit import LATENCY_SCENARIOS, SEVERITIES, audit_results, run_label, scenario_config
from wallperf.harness.config import ConfigError, shorten
from wallperf.harness.loadgen.results import write_text_atomic

TEMPLATES = Path(__file__).resolve().parent / "templates"
MISSING = "n/a"
# Backslash escapes keep table cells whole (`|`) and text free of emphasis and links. Raw HTML can
# only open at a `<` before a letter, `/`, `!` or `?`, and an entity at `&name;`: those become the
# entities `&lt;` and `&amp;` (CommonMark renders them as the characters, and no tag is left in the
# file for a tool that reads it raw), and every other `<`, `>` and `&` stays as written, so
# "p99 > limit" reads the same in the file and rendered.
_MD_ESCAPES = str.maketrans({"\\": "\\\\", "|": "\\|", "`": "\\`", "*": "\\*", "_": "\\_", "~": "\\~",
                             "[": "\\[", "]": "\\]", "\n": " ", "\r": " "})
_MD_HTML = re.compile(r"<(?=[A-Za-z/!?])|&(?=#?[A-Za-z0-9]+;)")
# JSON escapes for characters that could end a code block or open a tag; the text still parses the same.
_JSON_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "`": "\\u0060"})


@dataclass(frozen=True)
class RunFolder:
    """One results folder: its results.json, the audit verdict beside it (if any), and its label."""

    path: Path
    results: dict
    audit: dict | None
    label: str


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise ConfigError(path, None, f"{what} not found; give a folder written by `wallperf run`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(path, None, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ConfigError(path, None, f"not a {what}: nested too deeply to parse") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, None, f"cannot read {what}: {e}") from None
    except ValueError as e:
        # e.g. an integer of more digits than Python converts.
        raise ConfigError(path, None, f"not a {what}: {shorten(str(e))}") from None


def read_folder(run_dir: Path) -> tuple[Path, dict, dict | None]:
    """results.json (and audit.json, when present) of a results folder, checked for shape."""
    results_path = run_dir if run_dir.is_file() else run_dir / "results.json"
    results = _read_json(results_path, "results.json")
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list) or \
            not all(isinstance(r, dict) for r in results["runs"]):
        raise ConfigError(results_path, "runs", "not a wallperf results.json: expected an object whose "
                          "'runs' is a list of run records")
    audit_path = results_path.parent / "audit.json"
    audit = _read_json(audit_path, "audit.json") if audit_path.is_file() else None
    if audit is not None and not isinstance(audit, dict):
        raise ConfigError(audit_path, None, "expected the JSON object `wallperf audit --json` prints")
    return results_path.parent, results, audit


def load_folders(run_dirs: list[Path]) -> list[RunFolder]:
    """Read every folder and label it by what a comparison varies: hardware, backend, dtype
    (and model, when the folders differ in it); the folder name settles ties."""
    read = [read_folder(Path(d)) for d in run_dirs]
    keys = [_identity(results) for _, results, _ in read]
    with_model = len({k[0] for k in keys}) > 1
    bases = [" / ".join(k if with_model else k[1:]) for k in keys]
    labels = [f"{b} ({path.name})" if bases.count(b) > 1 else b for b, (path, _, _) in zip(bases, read)]
    labels = [f"{lab} #{i + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    return [RunFolder(path, results, audit, label) for (path, results, audit), label in zip(read, labels)]


def _identity(results: dict) -> tuple[str, str, str, str]:
    run_cfg = (results.get("config") or {}).get("run") or {}
    first = results["runs"][0] if results["runs"] else {}
    return tuple(str(run_cfg.get(k) or first.get(k) or "?") for k in ("model", "hardware", "backend", "dtype"))


def figure(value) -> str:
    """A measured figure at a precision a reader can compare: 3 significant digits below 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}" if abs(value) >= 1 else f"{value:.3g}"


def _setting(value) -> str:
    """A configured value as written (2000, not 2,000.0)."""
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else MISSING


def percent(fraction) -> str:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        return MISSING if fraction is None else str(fraction)
    return f"{100 * fraction:.1f}%" if abs(fraction) >= 0.001 else f"{100 * fraction:.2g}%"


def _validity(run: dict) -> tuple[str, str]:
    return {True: ("VALID", "ok"), False: ("INVALID", "bad")}.get(run.get("valid"), ("not judged", "na"))


def performance_row(folder: RunFolder, run: dict) -> dict:
    m, rf = run.get("metrics") or {}, run.get("roofline") or {}
    cfg = scenario_config(folder.results, run.get("scenario"))
    latency = {f"{name}_{p}": figure((m.get(f"{name}_ms") or {}).get(p)) for name in ("ttft", "tpot")
               for p in PERCENTILES}
    limits = (f"{_setting(cfg.get('ttft_ms'))} / {_setting(cfg.get('tpot_ms'))}"
              if run.get("scenario") in LATENCY_SCENARIOS else MISSING)
    valid, valid_class = _validity(run)
    return {"run": folder.label + _speculation_label(run), "tokens_per_second": figure(m.get("tokens_per_second")),
            "samples_per_second": figure(m.get("samples_per_second")), "batch": figure(rf.get("batch")),
            "memory_bound": figure(rf.get("memory_bound_tokens_per_second")),
            "memory_wall": figure(rf.get("memory_wall_tokens_per_second")),
            "mbu": percent(rf.get("mbu")), "mfu": percent(rf.get("mfu")), "limits": limits, **latency,
            "valid": valid, "valid_class": valid_class, "reasons": "; ".join(run.get("invalid_reasons") or []),
            "submission": "yes" if run.get("submission_valid") else "no"}


def _speculation_label(run: dict) -> str:
    """Which side of a speculative comparison a run is (audit.speculative_run), so the two never read as one."""
    if run.get("speculative_baseline"):
        return " (no speculation: baseline)"
    spec = (run.get("engine") or {}).get("speculative") or run.get("speculative")
    return f" (speculative, k={spec.get('num_draft_tokens')})" if isinstance(spec, dict) else ""


def scenario_tables(folders: list[RunFolder]) -> list[dict]:
    """Performance runs grouped by scenario (in the order first met), one row per folder's run."""
    tables: dict[str, list[dict]] = {}
    for folder in folders:
        for run in folder.results["runs"]:
            if run.get("mode") != "accuracy":
                tables.setdefault(run.get("scenario") or "(no scenario)", []).append(performance_row(folder, run))
    return [{"scenario": s, "rows": rows} for s, rows in tables.items()]


def accuracy_rows(folders: list[RunFolder]) -> list[dict]:
    rows = []
    for folder in folders:
        for run in (r for r in folder.results["runs"] if r.get("mode") == "accuracy"):
            mmlu = run.get("mmlu") or {}
            test06 = (run.get("compliance") or {}).get("test06") or {}
            failed = [name for name, c in (test06.get("checks") or {}).items()
                      if isinstance(c, dict) and c.get("status") == "failed"]
            outcome = {True: ("passed", "ok"), False: ("FAILED", "bad")}.get(test06.get("passed"), (MISSING, "na"))
            rows.append({"run": folder.label, "scenario": run.get("scenario") or "(no scenario)",
                         "accuracy": percent(mmlu.get("accuracy")),
                         "correct": f"{mmlu.get('correct', MISSING)} / {mmlu.get('total', MISSING)}",
                         "unparsed": str(mmlu.get("unparsed", MISSING)), "test06": outcome[0],
                         "test06_class": outcome[1], "test06_failed": ", ".join(failed)})
    return rows


def length_rows(folders: list[RunFolder]) -> list[dict]:
    """The prompt and output token counts each performance run issued (min / mean / p50 / p90 / max)."""
    def dist(d) -> str:
        return " / ".join(figure(d.get(k)) for k in ("min", "mean", "p50", "p90", "max")) if d else MISSING
    def test(run) -> str:
        qps = run.get("sweep_target_qps")
        return run_label(0, run) + (f" at {qps:g} QPS" if qps is not None else "")
    return [{"run": folder.label, "test": test(run), "input": dist(lengths.get("input")),
             "output": dist(lengths.get("output")), "output_target": dist(lengths.get("output_target")),
             "count": figure((lengths.get("input") or {}).get("count"))}
            for folder in folders for run in folder.results["runs"]
            if run.get("mode") == "performance" and isinstance(lengths := run.get("lengths"), dict)]


def pareto_section(sweeps: list[dict]) -> dict | None:
    """The report's Pareto section: the chart and one table row per point of every sweep,
    figures formatted (templates only lay them out)."""
    if not sweeps:
        return None
    rows = []
    for sweep in sweeps:
        label = series_of(sweep)["label"]
        for p in sweep.get("points") or []:
            rows.append({"series": label, "qps": f"{p['target_qps']:g}",
                         "tokens_per_second": figure(p.get("tokens_per_second")),
                         "per_user": figure(p.get("tokens_per_second_per_user")),
                         "ttft": " / ".join(figure(p.get(f"ttft_ms_{q}")) for q in ("p50", "p90", "p99")),
                         "tpot": " / ".join(figure(p.get(f"tpot_ms_{q}")) for q in ("p50", "p90", "p99")),
                         "goodput": percent(p.get("goodput_share")),
                         "goodput_tps": figure(p.get("goodput_tokens_per_second")),
                         "batch": figure(p.get("mean_decode_batch")), "context": figure(p.get("mean_decode_context")),
                         "mbu": percent(p.get("decode_mbu")), "mfu": percent(p.get("decode_mfu")),
                         "front_share": percent(p.get("front_share")), "front_batch": figure(p.get("front_batch"))})
    fronts = [f"{series_of(s)['label']}: memory floor meets compute floor at batch "
              f"{figure(s['front'].get('crossing_batch'))} (context {figure(s['front'].get('context'))})"
              for s in sweeps if s.get("front")]
    limits = sorted({f"{_setting((s.get('limits_ms') or {}).get('ttft'))} / "
                     f"{_setting((s.get('limits_ms') or {}).get('tpot'))}" for s in sweeps})
    return {"chart": png(pareto_figure([series_of(s) for s in sweeps])), "rows": rows, "fronts": fronts,
            "limits": ", ".join(limits)}


def finding_rows(folders: list[RunFolder]) -> list[dict]:
    """Every folder's findings, errors of all folders first."""
    rows = [{"run": folder.label, "test": f.run, "severity": f.severity, "code": f.code, "message": f.message}
            for folder in folders for f in audit_results(folder.results)]
    return sorted(rows, key=lambda r: SEVERITIES.index(r["severity"]))


def audit_rows(audit: dict) -> list[tuple[str, str]]:
    """The accuracy audit's verdict as (name, value) lines: accuracies in %, drops in points."""
    ci = audit.get("drop_ci95")
    ci_text = f"{figure(ci[0])} to {figure(ci[1])} points" if isinstance(ci, list) and len(ci) == 2 else figure(ci)
    rows = [("verdict", str(audit.get("verdict", MISSING))), ("reason", str(audit.get("reason", MISSING))),
            ("reference accuracy", percent(audit.get("reference_accuracy"))),
            ("candidate accuracy", percent(audit.get("candidate_accuracy"))),
            ("baseline accuracy", percent(audit.get("baseline_accuracy"))),
            ("drop", f"{figure(audit.get('drop_points'))} points (95% CI {ci_text})"),
            ("point estimate alone (MLPerf's rule)", str(audit.get("point_estimate_verdict", MISSING))),
            ("quantize or run the baseline", str((audit.get("baseline_comparison") or {}).get("reason", MISSING))),
            ("agreement", percent(audit.get("agreement"))), ("mean KL", f"{figure(audit.get('kl'))} nats"),
            ("questions", figure(audit.get("questions"))), ("format", str(audit.get("format", MISSING))),
            ("chance", percent(audit.get("chance")))]
    specs = audit.get("specs")
    if isinstance(specs, dict):
        rows += [(f"{role} model", str(spec)) for role, spec in specs.items()]
    return rows


def source_rows(folder: RunFolder) -> dict:
    r = folder.results
    config = json.dumps(r.get("config"), indent=2, ensure_ascii=False).translate(_JSON_ESCAPES)
    return {"label": folder.label, "path": str(folder.path), "version": str(r.get("wallperf_version", MISSING)),
            "started": str(r.get("started", MISSING)),
            "complete": {True: "yes", False: "no (interrupted)"}.get(r.get("complete"), MISSING),
            "wall_time": f"{figure(r.get('wall_time_s'))} s", "config_json": config,
            "audit": audit_rows(folder.audit) if folder.audit is not None else None,
            "audit_chart": accuracy_wall_chart(folder.audit) if folder.audit is not None else None}


def _count(n: int, severity: str) -> str:
    return f"{n} {severity}" + ("s" if n != 1 and severity != "info" else "")


def report_context(folders: list[RunFolder]) -> dict:
    title = (f"wallperf report: {folders[0].label}" if len(folders) == 1
             else f"wallperf comparison: {len(folders)} result folders")
    findings = finding_rows(folders)
    return {"title": title, "sources": [source_rows(f) for f in folders], "scenarios": scenario_tables(folders),
            "accuracy": accuracy_rows(folders), "findings": findings,
            "finding_counts": ", ".join(_count(sum(r["severity"] == s for r in findings), s)
                                        for s in ("error", "warning", "info")),
            "roofline_chart": roofline_chart(folders), "latency_chart": latency_chart(folders),
            "lengths": length_rows(folders), "speculative": speculative_section(folders, figure, percent, MISSING),
            "pareto": pareto_section([f.results["sweep"] for f in folders if isinstance(f.results.get("sweep"), dict)])}


def markdown_text(value) -> str:
    """Every Markdown expression's text: inert in a table cell or a paragraph. `|safe` opts out."""
    if isinstance(value, Markup):
        return str(value)
    return _MD_HTML.sub(lambda m: "&lt;" if m.group(0) == "<" else "&amp;", str(value).translate(_MD_ESCAPES))


def _environment(markdown: bool) -> jinja2.Environment:
    loader = jinja2.FileSystemLoader(TEMPLATES)
    if markdown:
        return jinja2.Environment(loader=loader, autoescape=False, finalize=markdown_text,
                                  undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)


def render_report(run_dirs: list[Path], html: Path | None, md: Path | None) -> None:
    """Render one results folder, or a comparison of several, to HTML and/or Markdown."""
    if not run_dirs:
        raise ConfigError("command line", "RUN_DIR", "give at least one results folder")
    try:
        context = report_context(load_folders(run_dirs))
        pages = {path: _environment(markdown).get_template(name).render(context)
                 for path, markdown, name in ((html, False, "report.html.j2"), (md, True, "report.md.j2"))
                 if path is not None}
    except ConfigError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, RecursionError, jinja2.TemplateError) as e:
        # results.json is the user's file: one edited by hand, or cut short, is bad input.
        raise ConfigError(", ".join(str(d) for d in run_dirs), None, "a record is not in the shape `wallperf "
                          f"run` writes ({type(e).__name__}: {e})") from None
    for path, text in pages.items():
        write_text_atomic(Path(path), text)


def write_run_reports(out_dir: Path) -> tuple[Path, Path]:
    """report.html and report.md of a finished `wallperf run`, in its output folder."""
    html, md = Path(out_dir) / "report.html", Path(out_dir) / "report.md"
    render_report([Path(out_dir)], html, md)
    return html, md


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="HTML and Markdown report of one or more results folders",
        description="Render results folders written by `wallperf run` (and the audit.json of "
                    "`wallperf audit --json`, when one lies beside results.json): every figure beside "
                    "its memory wall, the roofline and latency charts, the performance audit's findings, "
                    "accuracy, TEST06, and the exact configuration. Several folders are compared side "
                    "by side. With neither --html nor --md, writes report.html and report.md into the "
                    "first RUN_DIR; with one of them, only that one.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a folder holding results.json")
    p.add_argument("--html", type=Path, help="write the self-contained HTML report here")
    p.add_argument("--md", type=Path, help="write the Markdown report here")
    return p


def cmd_report(args) -> int:
    html, md = args.html, args.md
    if html is None and md is None:
        first = args.run_dirs[0] if not args.run_dirs[0].is_file() else args.run_dirs[0].parent
        html, md = first / "report.html", first / "report.md"
    render_report(args.run_dirs, html, md)
    for path in (html, md):
        if path is not None:
            print(f"wallperf: wrote {path}", file=sys.stderr)
    return 0
