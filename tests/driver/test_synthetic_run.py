"""A run on a synthetic (seeded random) model of a published shape: the path the
GPU check takes for Llama 3.1 8B, here on a tiny shape on the CPU."""
import json
import shutil
from pathlib import Path

import pytest

from wallperf.cli import main

CONF = Path(__file__).resolve().parents[2] / "conf"

TINY_MIXTRAL = """\
name: tiny-mixtral
family: mixtral
format: synthetic
tokenizer_from: smollm2-135m
shape: {n_layers: 2, hidden_size: 64, n_heads: 4, n_kv_heads: 2, ffn_size: 96,
        vocab_size: 1000, max_position: 2048, n_experts: 4, experts_per_token: 2}
"""


@pytest.fixture
def conf(tmp_path, monkeypatch, smollm2_gguf_path, mmlu_path, tiny_synthetic_yaml):
    root = tmp_path / "conf"
    shutil.copytree(CONF, root)
    (root / "models" / "tiny-synthetic.yaml").write_text(tiny_synthetic_yaml)
    (root / "models" / "tiny-mixtral.yaml").write_text(TINY_MIXTRAL)
    monkeypatch.setenv("WALLPERF_CONF", str(root))
    return root


@pytest.mark.parametrize("model", ["tiny-synthetic", "tiny-mixtral"])
def test_synthetic_model_runs_performance(conf, tmp_path, model):
    out = tmp_path / "out"
    rc = main(["run", "--model", model, "--scenario", "SingleStream", "--mode", "performance",
               "--duration", "1", "--max-samples", "3", "--output-tokens", "4", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["model"] == model and run["metrics"]["tokens_per_second"] > 0
    assert run["roofline"]["batch"] == 1


def test_synthetic_model_refuses_accuracy(conf, tmp_path):
    rc = main(["run", "--model", "tiny-synthetic", "--scenario", "SingleStream", "--out",
               str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    assert not (tmp_path / "out").exists()


def test_fp8_kv_cache_is_recorded_and_counted(conf, tmp_path):
    out = tmp_path / "out"
    rc = main(["run", "--model", "tiny-synthetic", "--scenario", "SingleStream", "--mode", "performance",
               "--duration", "1", "--max-samples", "3", "--output-tokens", "4", "--kv-dtype", "fp8",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert run["kv_dtype"] == "fp8_e4m3fn" and results["config"]["run"]["kv_dtype"] == "fp8"
    roof = run["roofline"]
    # 2 layers x 2 KV heads x head_dim 16, K and V: 1 byte each plus a 4-byte scale per vector.
    kv_per_token = 2 * 2 * 2 * (16 + 4)
    weights = (2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 5 * 64 + 49152 * 64) * 2
    assert roof["bytes_per_step"] == pytest.approx(weights + roof["context"] * kv_per_token)


def test_fp8_kv_cache_is_refused_for_a_peer_backend(conf, tmp_path, capsys):
    rc = main(["run", "--model", "tiny-synthetic", "--backend", "hf", "--kv-dtype", "fp8",
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    assert "kv_dtype" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
