"""The report's speculative section (audit/report_speculative.py), rendered from the
results.json that `wallperf audit speculative --out` writes after a real run of a tiny
model: the acceptance figures and tokens/s as the record holds them, the exactness
verdict where there is one, and the perf audit's flag where there is none or it failed.
(`wallperf run`'s own record, with its baseline test, is rendered in
tests/driver/test_speculative_run.py.)"""
import json

import pytest

from wallperf.audit import speculative as audit
from wallperf.audit.report import figure, percent, render_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def audited(tiny_llama_folder, tmp_path_factory):
    """A results folder from a real audit: prompt lookup on the tiny model, PASS."""
    folder = tmp_path_factory.mktemp("spec_report")
    rc = audit.main(["--model", str(tiny_llama_folder), "--draft", "ngram", "--num-prompts", "3",
                     "--max-new-tokens", "12", "--num-draft-tokens", "3", "--out", str(folder / "results.json"),
                     "--no-progress"])
    assert rc == 0
    return folder


def rendered(folder):
    render_report([folder], folder / "report.html", folder / "report.md")
    return (folder / "report.html").read_text(), (folder / "report.md").read_text()


def test_the_section_shows_the_records_figures_and_its_verdict(audited):
    spec = json.loads((audited / "results.json").read_text())["runs"][0]["speculative"]
    html, md = rendered(audited)
    assert "<h2>Speculative decoding</h2>" in html and "## Speculative decoding" in md
    by_position = " / ".join(percent(a) for a in spec["acceptance_by_position"])
    row = next(line for line in md.splitlines() if line.startswith("| ") and "prompt lookup" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["ngram (prompt lookup)", "3", spec["verify_path"], percent(spec["acceptance_rate"]),
                         figure(spec["mean_acceptance_length"]), by_position, figure(spec["draft_ms_per_step"]),
                         figure(spec["verify_ms_per_step"])]
    row = next(line for line in md.splitlines() if "identical" in line and line.startswith("| "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:6] == [figure(spec["candidate_tokens_per_s"]), figure(spec["reference_tokens_per_s"]),
                          f"{figure(spec['measured_speedup'])}x", f"{figure(spec['predicted_speedup'])}x"]
    assert cells[7] == "PASS (3/3 identical)"
    assert "speedup\\_without\\_exactness" not in md and "speculation\\_not\\_exact" not in md


def test_a_failed_or_missing_exactness_audit_is_flagged_beside_the_speedup(audited, tmp_path):
    results = json.loads((audited / "results.json").read_text())
    spec = results["runs"][0]["speculative"]
    spec["exactness"].update(verdict="FAIL", identical=2, share_identical=2 / 3)
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "results.json").write_text(json.dumps(results))
    html, md = rendered(tmp_path / "failed")
    assert "FAIL (2/3 identical)" in md and "speculation_not_exact" in html
    del spec["exactness"]
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "results.json").write_text(json.dumps(results))
    html, md = rendered(tmp_path / "none")
    assert "no exactness audit on record" in md and "speedup_without_exactness" in html


def test_no_speculative_record_no_section(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"complete": True, "runs": [
        {"scenario": "SingleStream", "mode": "performance", "metrics": {"tokens_per_second": 5.0}}]}))
    html, md = rendered(tmp_path)
    assert "Speculative decoding" not in html and "Speculative decoding" not in md
