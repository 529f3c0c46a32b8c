"""`wallperf run` with speculative decoding: every test's engine speculates, the same
test runs again without it, and results.json records the acceptance figures and the
speedup beside the roofline's prediction; bad flags are one line and exit 2."""
import json
import shutil
from pathlib import Path

import pytest

from wallperf.cli import main

CONF = Path(__file__).resolve().parents[2] / "conf"
RUN = ["run", "--model", "tiny-synthetic", "--mode", "performance", "--duration", "1", "--max-samples", "3",
       "--output-tokens", "12", "--no-progress", "--wall-from-profile"]


@pytest.fixture
def conf(tmp_path, monkeypatch, smollm2_gguf_path, mmlu_path, tiny_synthetic_yaml):
    root = tmp_path / "conf"
    shutil.copytree(CONF, root)
    (root / "models" / "tiny-synthetic.yaml").write_text(tiny_synthetic_yaml)
    # The same synthetic weights under a second name: a drafter every draft of which holds.
    (root / "models" / "tiny-draft.yaml").write_text(tiny_synthetic_yaml.replace("tiny-synthetic", "tiny-draft"))
    monkeypatch.setenv("WALLPERF_CONF", str(root))
    return root


@pytest.mark.parametrize("drafter, scenarios", [
    pytest.param(["--draft", "ngram"], "SingleStream,Offline", id="ngram", marks=pytest.mark.slow),
    pytest.param(["--draft-model", "tiny-draft"], "SingleStream", id="model", marks=pytest.mark.slow),
    pytest.param(["--draft-model", "tiny-draft", "--draft-vocab", "64"], "SingleStream", id="model-vocab",
                 marks=pytest.mark.slow)])
def test_every_scenario_speculates_beside_a_baseline_without(conf, tmp_path, drafter, scenarios):
    """Each scenario's speculative test, then the same test without speculation as a
    record of its own; the speculative record sets the two tokens/s side by side with
    the roofline's prediction recomputed here from the record's own counts."""
    out = tmp_path / "out"
    rc = main([*RUN, "--scenario", scenarios, *drafter, "--num-draft-tokens", "3", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["scenario"], r.get("speculative_baseline", False)) for r in runs] == [
        (sc, baseline) for sc in scenarios.split(",") for baseline in (False, True)]
    assert results["config"]["speculation"]["baseline"] is True
    for run, baseline in zip(runs[::2], runs[1::2]):
        spec = run["engine"]["speculative"]
        assert spec["num_draft_tokens"] == 3 and spec["verify_steps"] > 0 and spec["emitted_tokens"] > 0
        assert "speculative" not in baseline["engine"] and "speculative" not in baseline
        assert "no_speculation" in baseline["log_dir"] and baseline["log_dir"] != run["log_dir"]
        # The baseline's own settings are the speculative test's.
        assert baseline["loadgen_settings"] == run["loadgen_settings"]
        figures = run["speculative"]
        with_, without = run["metrics"]["tokens_per_second"], baseline["metrics"]["tokens_per_second"]
        assert (figures["tokens_per_second"], figures["baseline_tokens_per_second"]) == (with_, without)
        assert figures["measured_speedup"] == pytest.approx(with_ / without)
        t, d = spec["target_bytes_per_verify_step"], spec["draft_bytes_per_step"]
        k = spec["drafted_tokens"] / (spec["emitted_tokens"] / spec["mean_acceptance_length"])
        assert figures["predicted_speedup"] == pytest.approx(t / ((t + k * d) / spec["mean_acceptance_length"]))
        if "--draft-vocab" in drafter:
            # The head's rows past the vocabulary are not read: fewer bytes a draft step.
            assert spec["draft_vocab"] == 64 and 0 < d < t
        elif drafter[0] == "--draft-model":
            assert spec["acceptance_rate"] == 1.0 and spec["mean_acceptance_length"] > 1
            assert d == t > 0  # the same weights under a second name
        else:
            assert d == 0
    report = (out / "report.html").read_text()
    assert "<h2>Speculative decoding</h2>" in report and "speedup_without_exactness" in report
    assert "(no speculation: baseline)" in report


@pytest.mark.slow
def test_no_speculative_baseline_runs_the_speculative_tests_alone(conf, tmp_path):
    out = tmp_path / "out"
    assert main([*RUN, "--scenario", "SingleStream", "--draft", "ngram", "--no-speculative-baseline",
                 "--out", str(out)]) == 0
    [run] = json.loads((out / "results.json").read_text())["runs"]
    assert "speculative" in run["engine"] and "speculative" not in run


@pytest.mark.parametrize("flags, said", [
    (["--draft", "model"], "--draft-model NAME"),
    (["--draft", "ngram", "--num-draft-tokens", "0"], "--num-draft-tokens 0"),
    (["--draft", "ngram", "--draft-vocab", "100"], "--draft-vocab limits a draft model"),
    (["--draft-model", "tiny-draft", "--draft-vocab", "8"], "--draft-vocab 8: give at least 16 token ids"),
])
def test_bad_speculation_flags_exit_2(conf, tmp_path, capsys, flags, said):
    out = tmp_path / "out"
    assert main([*RUN, "--scenario", "SingleStream", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err
    assert not out.exists()
