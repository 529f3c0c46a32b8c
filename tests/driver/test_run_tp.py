"""`wallperf run --tp N`: the run config's checks, and end to end on the CPU over
gloo, where two ranks must give the tokens one process gives.

SmolLM2's 9 query and 3 KV heads do not split over 2 ranks, so the end-to-end runs
use a tiny Llama checkpoint written here (seeded random weights, SmolLM2's
tokenizer), in float32: the row-parallel sums add in another order, which moves
logits by float32 rounding only, far below the gaps between greedy choices.
"""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from wallperf.cli import main
from wallperf.harness.config import ConfigError, load_hardware_config, load_run
from wallperf.driver.tp_launch import launch
from wallperf.harness.hardware.profiles import system_hardware

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_tp_defaults_to_one():
    assert load_run().run.tp == 1


@pytest.mark.parametrize("overrides, message", [
    ({"tp": 0}, "must be an integer >= 1, got 0"),
    ({"tp": 1.5}, "expected int, got float 1.5"),
    ({"tp": "2"}, "expected int, got str '2'"),
    ({"tp": 2}, "does not fit model smollm2-135m: .* not divisible: n_heads 9, n_kv_heads 3$"),
    ({"tp": 2, "model": "mixtral-8x7b"}, "model mixtral-8x7b is family mixtral"),
    ({"tp": 3, "model": "mome-smollm2"}, "model mome-smollm2 is family mome"),
    ({"tp": 3, "dtype": "fp8"}, "fp8 weights is not supported"),
    ({"tp": 3, "backend": "openai", "openai": {"endpoints": ["http://127.0.0.1:1"], "model": "m"}},
     "backend 'openai' runs its own"),
    ({"tp": 3, "backend": "llamacpp"}, "backend 'llamacpp' runs its own"),
])
def test_bad_tp_is_a_config_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_run(overrides=overrides)
    assert e.value.key == "tp"


def test_tp_that_splits_the_model_is_accepted():
    # 9 query heads, 3 KV heads and FFN 1536 all divide by 3.
    assert load_run(overrides={"tp": 3}).run.tp == 3


def test_config_error_survives_pickling():
    """A rank's ConfigError reaches the parent pickled, and must read the same there."""
    import pickle

    err = ConfigError("run.yaml", "tp", "tp 2 does not fit")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.file, back.key) == (ConfigError, str(err), "run.yaml", "tp")


def test_cli_flag(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--tp N" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["run", "--tp", "0", "--out", str(tmp_path / "a")])
    assert e.value.code == 2
    assert main(["run", "--tp", "2", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "key 'tp': tp 2 does not fit model smollm2-135m" in capsys.readouterr().err


def test_fp8_hardware_needs_a_forced_dtype(capsys, tmp_path):
    """dtype auto means fp8 on an H100 profile: refused before any rank starts."""
    assert main(["run", "--tp", "3", "--hardware", "h100-sxm", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    assert "fp8 weights is not supported yet" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_roofline_counts_the_whole_system():
    h100 = load_hardware_config("h100-sxm")
    gpus, note = system_hardware(h100, 4, "cuda")
    assert gpus.bandwidth_gbps == 4 * h100.bandwidth_gbps
    assert gpus.peak_tflops["bfloat16"] == 4 * h100.peak_tflops["bfloat16"]
    assert "4 ranks" in note
    cpu = load_hardware_config("cpu")
    shared, note = system_hardware(cpu, 2, "cpu")
    assert shared == cpu and "share" in note


# --- spawning ranks ---------------------------------------------------------------

def _rank_1_dies(ctx):
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    # Rank 0 would wait here for rank 1 until the collective's timeout.
    torch.distributed.barrier()


def test_a_rank_that_dies_ends_the_launch():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 of 2 ended early .*SIGKILL"):
        launch(_rank_1_dies, 2, timeout_s=300)
    assert time.monotonic() - t0 < 120


# --- end to end (spawns ranks) ---------------------------------------------------

TINY_CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
               "tie_word_embeddings": True}


def write_checkpoint(folder: Path, gguf: Path, n_heads: int, n_kv_heads: int, seed: int = 0) -> Path:
    """An HF checkpoint folder: random Llama weights with SmolLM2's tokenizer."""
    from safetensors.torch import save_file

    from wallperf.sut.models.llama import LlamaConfig
    from wallperf.sut.loading.tokenizer import Tokenizer
    from wallperf.sut.models.llama import synthetic_state_dict

    tok = Tokenizer.from_gguf(gguf)
    hf = {**TINY_CONFIG, "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
          "head_dim": 16, "vocab_size": tok.vocab_size}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf))
    sd = synthetic_state_dict(LlamaConfig.from_hf_config(hf), seed, torch.float32)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": tok.backend.id_to_token(tok.eos_token_id), "chat_template": tok.chat_template}))
    return folder


@pytest.fixture(scope="module")
def tiny_conf(tmp_path_factory, smollm2_gguf_path, mmlu_path):
    root = tmp_path_factory.mktemp("tp") / "conf"
    shutil.copytree(CONF, root)
    for name, heads, kv in (("tiny-tp", 4, 2), ("tiny-odd", 6, 3)):
        folder = write_checkpoint(root.parent / name, smollm2_gguf_path, heads, kv)
        (root / "models" / f"{name}.yaml").write_text(
            f"name: {name}\nfamily: llama\nformat: safetensors\npublished_dtype: float32\n"
            f"source: {{kind: path, path: {folder}}}\n")
    # The spawned ranks read conf/ through the environment they inherit.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WALLPERF_CONF", str(root))
        yield root


def wallperf_run(out: Path, *args: str) -> dict:
    assert main(["run", "--model", "tiny-tp", "--dtype", "float32", "--scenario", "SingleStream,Offline",
                 "--max-samples", "4", "--duration", "1", "--output-tokens", "4", "--out", str(out),
                 "--no-progress", "--accuracy-scenarios", "all", "--wall-from-profile", *args]) == 0
    return json.loads((out / "results.json").read_text())


def accuracy_tokens(results: dict, scenario: str) -> dict:
    """qsl index -> the int32 tokens LoadGen logged in the accuracy run."""
    (run,) = [r for r in results["runs"] if r["scenario"] == scenario and r["mode"] == "accuracy"]
    entries = json.loads((Path(run["log_dir"]) / "mlperf_log_accuracy.json").read_text())
    return {e["qsl_idx"]: bytes.fromhex(e["data"]) for e in entries}


@pytest.mark.slow
def test_two_ranks_log_the_tokens_of_one(tiny_conf, tmp_path):
    one = wallperf_run(tmp_path / "tp1", "--mode", "accuracy")
    two = wallperf_run(tmp_path / "tp2", "--mode", "both", "--tp", "2")
    assert (one["tp"], two["tp"], two["config"]["run"]["tp"]) == (1, 2, 2)
    assert two["complete"] is True
    # Four tests, each with fresh engines on both ranks.
    assert [(r["scenario"], r["mode"], r["tp"]) for r in two["runs"]] == [
        (s, m, 2) for s in ("SingleStream", "Offline") for m in ("performance", "accuracy")]
    for scenario in ("SingleStream", "Offline"):
        want = accuracy_tokens(one, scenario)
        assert len(want) == 4 and all(len(t) >= 8 for t in want.values())
        assert accuracy_tokens(two, scenario) == want, scenario
    for r in two["runs"]:
        assert not any("the SUT failed" in reason for reason in r["invalid_reasons"])
        if r["mode"] == "performance":
            assert r["metrics"]["tokens_per_second"] > 0
            assert "tensor parallel over 2 ranks" in r["roofline"]["tp_note"]


def test_an_error_on_the_ranks_ends_the_run(tiny_conf, tmp_path, capsys):
    """The shape is only known once loaded: every rank refuses 3 KV heads over 2
    ranks, and the run ends with that ConfigError (no hang, no traceback)."""
    out = tmp_path / "out"
    # No calibration process and no wall measurement before the test: the ranks' load is the point.
    rc = main(["run", "--model", "tiny-odd", "--tp", "2", "--scenario", "SingleStream", "--max-samples", "2",
               "--no-calibrate", "--wall-from-profile", "--out", str(out), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "key 'tp': tp 2 does not fit tiny-odd" in err and "not divisible: n_kv_heads 3" in err
    assert not (out / "results.json").exists()
