"""`wallperf run` with speculative decoding: every test's engine speculates, and
results.json records the acceptance figures; bad flags are one line and exit 2."""
import json
import shutil
from pathlib import Path

import pytest

from wallperf.cli import main

CONF = Path(__file__).resolve().parents[2] / "conf"
RUN = ["run", "--model", "tiny-synthetic", "--mode", "performance", "--duration", "1", "--max-samples", "3",
       "--output-tokens", "12", "--no-progress"]


@pytest.fixture
def conf(tmp_path, monkeypatch, smollm2_gguf_path, mmlu_path, tiny_synthetic_yaml):
    root = tmp_path / "conf"
    shutil.copytree(CONF, root)
    (root / "models" / "tiny-synthetic.yaml").write_text(tiny_synthetic_yaml)
    # The same synthetic weights under a second name: a drafter every draft of which holds.
    (root / "models" / "tiny-draft.yaml").write_text(tiny_synthetic_yaml.replace("tiny-synthetic", "tiny-draft"))
    monkeypatch.setenv("WALLPERF_CONF", str(root))
    return root


@pytest.mark.parametrize("drafter", [["--draft", "ngram"], ["--draft-model", "tiny-draft"]], ids=["ngram", "model"])
def test_every_scenario_speculates_and_records_its_figures(conf, tmp_path, drafter):
    out = tmp_path / "out"
    rc = main([*RUN, "--scenario", "SingleStream,Offline", *drafter, "--num-draft-tokens", "3", "--out", str(out)])
    assert rc == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["scenario"] for r in runs] == ["SingleStream", "Offline"]
    for run in runs:
        spec = run["engine"]["speculative"]
        assert spec["num_draft_tokens"] == 3 and spec["verify_steps"] > 0 and spec["emitted_tokens"] > 0
        if drafter[0] == "--draft-model":
            assert spec["acceptance_rate"] == 1.0 and spec["mean_acceptance_length"] > 1


@pytest.mark.parametrize("flags, said", [
    (["--draft", "model"], "--draft-model NAME"),
    (["--draft", "ngram", "--num-draft-tokens", "0"], "--num-draft-tokens 0"),
])
def test_bad_speculation_flags_exit_2(conf, tmp_path, capsys, flags, said):
    out = tmp_path / "out"
    assert main([*RUN, "--scenario", "SingleStream", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err
    assert not out.exists()
