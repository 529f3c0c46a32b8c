"""wallperf.audit.report on synthetic results folders: tables, escaping, self-containedness, comparisons, bad input.

The results.json written here has the shape `wallperf run` writes (README.md's
contract), with figures taken from a real 2-core CPU run, so the expected cells
are the input figures at the report's precision, read off by hand.
"""
import argparse
import base64
import copy
import html
import json
import re
from pathlib import Path

import pytest

from wallperf.audit.report import add_report_parser, cmd_report, render_report, write_run_reports
from wallperf.harness.config import ConfigError

HOSTILE = "<script>alert(1)</script>"
HOSTILE_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
MD_HOSTILE_ESCAPED = "&lt;script>alert(1)&lt;/script>"
EARLY_STOPPING = "early stopping criterion not met (TPOT: Only processed 5 queries.)"


def _roofline(tps, batch, wall, bound, mbu, ai, tflops, mfu=None, hardware="cpu", bandwidth=32.0):
    record = {"dtype": "bfloat16", "compute_dtype": "bfloat16", "batch": batch, "context": 159,
              "memory_wall_tokens_per_second": wall, "memory_bound_tokens_per_second": bound,
              "achieved_bandwidth_gbps": mbu * bandwidth, "mbu": mbu, "arithmetic_intensity": ai,
              "achieved_tflops": tflops, "hardware": hardware, "hardware_source": f"conf/hardware/{hardware}.yaml",
              "peak_bandwidth_gbps": bandwidth}
    if mfu is not None:
        record.update(compute_bound_tokens_per_second=tps / mfu, mfu=mfu)
    return record


def synthetic_results(model="smollm2-135m", hardware="cpu", backend="native", dtype="bfloat16",
                      invalid_reason=EARLY_STOPPING) -> dict:
    ident = {"model": model, "backend": backend, "dtype": dtype, "hardware": hardware, "system": "cpu-native"}
    latency = {"ttft_ms": {"p50": 496.83, "p90": 521.01, "p99": 521.01},
               "tpot_ms": {"p50": 67.17, "p90": 103.53, "p99": 103.53}}

    def perf(scenario, tps, valid, roofline, latencies=True):
        return {"scenario": scenario, "mode": "performance", **ident, "valid": valid,
                "invalid_reasons": [] if valid else [invalid_reason], "submission_valid": False,
                "submission_notes": ["min_duration 5 s is below MLPerf's 600 s"], "log_dir": "/x",
                "max_new_tokens": 8, "ignore_eos": True, "engine": {"mean_decode_batch": 1.0},
                "metrics": {"samples_per_second": tps / 8, "tokens_per_second": tps,
                            **(latency if latencies else {"ttft_ms": None, "tpot_ms": None}),
                            "latency_ms": None, "sample_count": 5, "mmlu_accuracy": None},
                "roofline": roofline}

    def accuracy(scenario, passed):
        return {"scenario": scenario, "mode": "accuracy", **ident, "valid": None, "invalid_reasons": [],
                "submission_valid": False, "submission_notes": ["min_duration 5 s is below MLPerf's 600 s"],
                "metrics": {"tokens_per_second": None, "mmlu_accuracy": 0.5},
                "mmlu": {"accuracy": 0.5, "correct": 3, "total": 6, "unparsed": 1}, "roofline": None,
                "compliance": {"test06": {"passed": passed, "checks": {
                    "first_token": {"status": "passed"}, "eos": {"status": "passed" if passed else "failed"}}}}}

    bandwidth = 32.0 if hardware == "cpu" else 3350.0
    runs = [perf("Server", 5.44734, False, _roofline(5.44734, 1, 117.3479, 117.3479, 0.04642, 1.0266, 0.001525,
                                                    mfu=0.0038125, hardware=hardware, bandwidth=bandwidth)),
            accuracy("Server", True),
            perf("SingleStream", 3.37672, False, _roofline(3.37672, 1, 117.3975, 117.3975, 0.02876, 1.0258,
                                                          0.000944, hardware=hardware, bandwidth=bandwidth)),
            perf("Offline", 7.88483, True, _roofline(7.88483, 11, 117.4174, 1144.5186, 0.006889, 9.9954, 0.0022035,
                                                    mfu=0.0055089, hardware=hardware, bandwidth=bandwidth),
                 latencies=False),
            accuracy("Offline", False)]
    scenarios = [{"name": "Server", "min_duration_s": 5.0, "target_qps": 1.0, "ttft_ms": 2000.0, "tpot_ms": 200.0},
                 {"name": "SingleStream", "min_duration_s": 5.0}, {"name": "Offline", "min_duration_s": 5.0}]
    config = {"file": "conf/runs/default.yaml", "run": {**ident, "scenarios": ["Server", "SingleStream", "Offline"]},
              "hardware": {"name": hardware, "bandwidth_gbps": bandwidth,
                           "peak_tflops": {"bfloat16": 0.4, "float32": 0.2, "fp8": None}},
              "scenarios": scenarios, "user_conf": None}
    return {"wallperf_version": "0.1.0", "config": config, "started": "2026-01-01T00:00:00+0000", "complete": True,
            "wall_time_s": 106.9, "runs": runs}


AUDIT = {"reference_accuracy": 0.293, "candidate_accuracy": 0.281, "drop_points": 1.2, "drop_ci95": [0.4, 2.0],
         "agreement": 0.91, "kl": 0.0123, "questions": 570, "format": "cloze", "chance": 0.25,
         "verdict": "INCONCLUSIVE", "baseline_accuracy": None, "reason": "cannot detect damage",
         "specs": {"reference": "smollm2-135m", "candidate": "smollm2-135m@fp8"}}


def write_folder(root: Path, name: str, results: dict | None = None, audit: dict | None = None, **kw) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results or synthetic_results(**kw)))
    if audit is not None:
        (folder / "audit.json").write_text(json.dumps(audit))
    return folder


def render(folders, tmp_path) -> tuple[str, str]:
    html_path, md_path = tmp_path / "out" / "r.html", tmp_path / "out" / "r.md"
    render_report(folders, html_path, md_path)
    return html_path.read_text(), md_path.read_text()


def md_cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def md_table(md: str, heading: str) -> list[list[str]]:
    """Rows (header first, separator dropped) of the first table after `heading`."""
    lines = md.split(f"\n{heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return [md_cells(line) for line in table if not line.startswith("|--")]


@pytest.fixture(scope="module")
def one_folder(tmp_path_factory):
    """One folder with an audit.json beside it, rendered once for the tests that only read it."""
    tmp = tmp_path_factory.mktemp("one")
    return render([write_folder(tmp, "run", audit=AUDIT)], tmp)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    audit = {**AUDIT, "reason": HOSTILE, "specs": {"candidate": HOSTILE}}
    folder = write_folder(tmp, "run", model=HOSTILE, invalid_reason=HOSTILE, audit=audit)
    return json.loads((folder / "results.json").read_text()), *render([folder], tmp)


def test_one_folder_sets_each_figure_beside_its_memory_wall(one_folder):
    page, md = one_folder
    header, row = md_table(md, "### Server")
    cells = dict(zip(header, row))
    assert cells["tokens/s"] == "5.4" and cells["memory wall (batch 1)"] == "117.3" and cells["MBU"] == "4.6%"
    assert cells["TTFT ms p50 / p99"] == "496.8 / 521.0" and cells["TPOT ms p50 / p99"] == "67.2 / 103.5"
    assert cells["limits ms TTFT / TPOT"] == "2000 / 200" and cells["LoadGen"].startswith("INVALID: early stopping")
    offline = dict(zip(*md_table(md, "### Offline")))
    assert offline["memory-bound tokens/s at batch"] == "1,144.5" and offline["batch"] == "11"
    assert offline["LoadGen"] == "VALID"
    accuracy = md_table(md, "## Accuracy and TEST06")
    assert [(r[1], r[2], r[3], r[5]) for r in accuracy[1:]] == [("Server", "50.0%", "3 / 6", "passed"),
                                                                ("Offline", "50.0%", "3 / 6", "FAILED: eos")]
    assert "test06\\_failed" in md and "loadgen\\_invalid" in md
    for text in ("117.3", "1,144.5", "4.6%", "INVALID", "test06_failed", "FAILED"):
        assert text in page


def test_html_is_one_self_contained_file(one_folder):
    page, _ = one_folder
    assert not re.search(r"https?:", page, re.IGNORECASE)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2  # the roofline and the latency chart
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def test_hostile_text_is_shown_as_text(hostile):
    _, page, md = hostile
    assert "<script" not in page and "<script" not in md and "</script" not in md
    # model name (label, tables), invalid reason (table, findings), audit reason and spec: all present as text
    assert page.count(HOSTILE_ESCAPED) >= 5 and md.count(MD_HOSTILE_ESCAPED) >= 5
    assert "alert(1)" in html.unescape(page)


def test_markdown_shows_comparisons_as_written(tmp_path):
    # CommonMark: ">" opens nothing inside text, so it stays ">" (not "&gt;"); "&" too unless it spells an entity.
    _, md = render([write_folder(tmp_path, "run", invalid_reason="p99 TTFT 2100 ms > 2000 ms & p99 < 1 s; &amp;")],
                   tmp_path)
    assert "p99 TTFT 2100 ms > 2000 ms & p99 < 1 s; &amp;amp;" in md
    assert "&gt;" not in md and "&lt;" not in md


def test_a_pipe_in_cell_text_keeps_markdown_columns(tmp_path):
    _, md = render([write_folder(tmp_path, "run", model="a|b", invalid_reason="x | y\nz")], tmp_path)
    for heading in ("### Server", "### Offline", "## Accuracy and TEST06", "## Performance audit"):
        header, *rows = md_table(md, heading)
        assert rows and all(len(r) == len(header) for r in rows), heading


def test_the_exact_configuration_is_shown(hostile):
    results, page, md = hostile
    config = results["config"]
    [pre] = re.findall(r"<pre>(.*?)</pre>", page, re.DOTALL)
    assert json.loads(html.unescape(pre)) == config
    [block] = re.findall(r"```json\n(.*?)\n```", md, re.DOTALL)
    assert json.loads(block) == config
    assert "wallperf 0.1.0" in md and "wallperf 0.1.0" in page


def test_a_comparison_puts_every_folder_in_every_table(tmp_path):
    cpu = write_folder(tmp_path, "cpu")
    h100 = write_folder(tmp_path, "h100", hardware="h100-sxm")
    page, md = render([cpu, h100], tmp_path)
    assert md.startswith("# wallperf comparison: 2 result folders")
    for heading in ("### Server", "### SingleStream", "### Offline"):
        assert [r[0] for r in md_table(md, heading)[1:]] == ["cpu / native / bfloat16",
                                                             "h100-sxm / native / bfloat16"]
    assert [r[0] for r in md_table(md, "## Result folders")[1:]] == ["cpu / native / bfloat16",
                                                                     "h100-sxm / native / bfloat16"]
    assert page.count("h100-sxm / native / bfloat16") >= 5


def test_folders_alike_are_told_apart_by_name_and_models_by_model(tmp_path):
    _, md = render([write_folder(tmp_path, "a"), write_folder(tmp_path, "b")], tmp_path)
    assert [r[0] for r in md_table(md, "### Server")[1:]] == ["cpu / native / bfloat16 (a)",
                                                              "cpu / native / bfloat16 (b)"]
    _, md = render([write_folder(tmp_path, "c"), write_folder(tmp_path, "d", model="llama3.1-8b")], tmp_path)
    assert [r[0] for r in md_table(md, "### Server")[1:]] == ["smollm2-135m / cpu / native / bfloat16",
                                                              "llama3.1-8b / cpu / native / bfloat16"]


def test_the_accuracy_audit_verdict_is_rendered_when_present(one_folder, tmp_path):
    page, md = one_folder
    rows = dict(md_table(md, "### Accuracy audit: cpu / native / bfloat16")[1:])
    assert rows["verdict"] == "INCONCLUSIVE" and rows["reference accuracy"] == "29.3%"
    assert rows["drop"] == "1.2 points (95% CI 0.4 to 2.0 points)" and rows["candidate model"] == "smollm2-135m@fp8"
    assert "INCONCLUSIVE" in page
    page, md = render([write_folder(tmp_path, "without")], tmp_path)
    assert "Accuracy audit" not in md and "Accuracy audit" not in page


def test_the_audit_chart_puts_each_model_at_its_memory_wall(tmp_path):
    models = {role: {"spec": spec, "accuracy": acc, "accuracy_ci95": [acc - 0.02, acc + 0.02],
                     "memory_wall_tokens_per_second": wall, "bytes_per_token": 1e9, "weight_dtype": "bfloat16"}
              for role, spec, acc, wall in [("reference", "big@bf16", 0.51, 20.0), ("candidate", "big@fp8", 0.5, 38.0),
                                            ("baseline", "small", 0.27, 60.0)]}
    audit = {**AUDIT, "models": models, "hardware": "cpu", "point_estimate_verdict": "FAIL",
             "baseline_comparison": {"verdict": "quantized", "reason": "quantizing beats the small one"}}
    page, md = render([write_folder(tmp_path, "run", audit=audit)], tmp_path)
    rows = dict(md_table(md, "### Accuracy audit: cpu / native / bfloat16")[1:])
    assert rows["point estimate alone (MLPerf's rule)"] == "FAIL"
    assert rows["quantize or run the baseline"] == "quantizing beats the small one"
    assert 'alt="MMLU accuracy against memory-wall tokens/s' in page
    page, _ = render([write_folder(tmp_path, "old", audit=AUDIT)], tmp_path)
    assert "memory-wall tokens/s" not in page


@pytest.mark.parametrize("content,match", [
    (None, "results.json not found"),
    ("{not json", "malformed JSON at line 1"),
    ('{"runs": {}}', "key 'runs'"),
    ('[1, 2]', "key 'runs'"),
])
def test_bad_input_names_the_file(tmp_path, content, match):
    folder = tmp_path / "bad"
    folder.mkdir()
    if content is not None:
        (folder / "results.json").write_text(content)
    with pytest.raises(ConfigError, match=match) as err:
        render_report([folder], tmp_path / "r.html", None)
    assert str(folder / "results.json") in str(err.value)
    assert not (tmp_path / "r.html").exists()


def test_a_malformed_audit_json_names_the_file(tmp_path):
    folder = write_folder(tmp_path, "run")
    (folder / "audit.json").write_text("[]")
    with pytest.raises(ConfigError, match="audit.json"):
        render_report([folder], tmp_path / "r.html", None)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="wallperf")
    add_report_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cmd_report_writes_both_reports_into_the_first_folder_by_default(tmp_path):
    first, second = write_folder(tmp_path, "a"), write_folder(tmp_path, "b", hardware="h100-sxm")
    assert cmd_report(_parse(["report", str(first), str(second)])) == 0
    assert (first / "report.html").stat().st_size > 10_000 and (first / "report.md").is_file()
    assert not list(first.glob(".*.part")) and not (second / "report.html").exists()
    assert cmd_report(_parse(["report", str(first), "--md", str(tmp_path / "only.md")])) == 0
    assert (tmp_path / "only.md").is_file() and not (tmp_path / "only.html").exists()


def test_the_cli_exits_2_on_bad_input(tmp_path, capsys):
    from wallperf import cli

    try:
        code = cli.main(["report", str(tmp_path / "nowhere")])
    except SystemExit as exc:  # argparse exits on a subcommand it does not know
        pytest.fail(f"`wallperf report` is missing from wallperf.cli (argparse exited {exc.code})")
    assert code == 2
    assert f"{tmp_path / 'nowhere' / 'results.json'}: results.json not found" in capsys.readouterr().err


def test_write_run_reports_writes_into_the_run_folder(tmp_path):
    folder = write_folder(tmp_path, "run")
    before = copy.deepcopy(json.loads((folder / "results.json").read_text()))
    html_path, md_path = write_run_reports(folder)
    assert html_path == folder / "report.html" and md_path == folder / "report.md"
    assert html_path.read_text().startswith("<!DOCTYPE html>") and md_path.read_text().startswith("# wallperf")
    assert json.loads((folder / "results.json").read_text()) == before


def test_an_interrupted_run_with_no_tests_still_renders(tmp_path):
    empty = {"wallperf_version": "0.1.0", "config": {}, "complete": False, "runs": []}
    page, md = render([write_folder(tmp_path, "empty", results=empty)], tmp_path)
    assert "No performance runs." in md and "No accuracy runs." in md and "incomplete" in md
    assert "<img" not in page and "No run has roofline figures" in page
