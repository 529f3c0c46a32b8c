"""`wallperf run --dataset sharegpt` end to end on a tiny synthetic model: the cut
is reported, every request decodes its reply's length, and results.json's issued
lengths are those of the samples LoadGen issued."""
import json
import shutil
from pathlib import Path

import pytest

from wallperf.cli import main

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.slow
def test_sharegpt_offline_run(tmp_path, monkeypatch, capfd, smollm2_gguf_path, sharegpt_path, tiny_synthetic_yaml):
    root = tmp_path / "conf"
    shutil.copytree(CONF, root)
    (root / "models" / "tiny-synthetic.yaml").write_text(tiny_synthetic_yaml)
    monkeypatch.setenv("WALLPERF_CONF", str(root))
    out = tmp_path / "out"
    rc = main(["run", "--model", "tiny-synthetic", "--dataset", "sharegpt", "--scenario", "Offline",
               "--mode", "performance", "--duration", "1", "--max-samples", "3", "--no-progress", "--out", str(out)])
    assert rc == 0
    # The LoadGen test runs in a process of its own: its warning reaches the shared stderr.
    cuts = [line for line in capfd.readouterr().err.splitlines() if "the JSON array is cut" in line]
    assert len(cuts) == 1 and "kept 17671 complete records, lost 1 partial record" in cuts[0]
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["records"] == 17671 and results["dataset"]["sampled"] == 3
    (run,) = results["runs"]
    assert run["output_lengths"] == "dataset" and run["ignore_eos"] is True
    lengths = run["lengths"]
    # EOS ignored: every answer is exactly as long as its sample's reply.
    assert lengths["output"] == lengths["output_target"]
    assert lengths["input"]["count"] == lengths["output"]["count"] >= 1
    whole = results["dataset"]["lengths"]
    assert whole["input"]["min"] <= lengths["input"]["min"] <= lengths["input"]["max"] <= whole["input"]["max"]


def test_sharegpt_refuses_accuracy_mode(capsys):
    assert main(["run", "--dataset", "sharegpt", "--mode", "both", "--out", "/nonexistent/x"]) == 2
    assert "has no reference answers to score" in capsys.readouterr().err
