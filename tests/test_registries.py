"""Model families and backends are tables: every row works through the product's
own code paths, and a new family or backend is one module plus one row (planted
here in a temporary module; nothing else in the package is touched)."""
import sys
import textwrap

import pytest
import torch

from wallperf.harness.config import ConfigError, load_model_config, load_run
from wallperf.sut import backends
from wallperf.sut.engine.kv_cache import SlotKVCache
from wallperf.sut.loading.load import load_synthetic
from wallperf.sut.loading.weights import build_model, load_hf_checkpoint
from wallperf.sut.models import families
from wallperf.sut.models.config import LlamaConfig, MemoryConfig

TINY = dict(n_layers=2, hidden_size=32, n_heads=4, n_kv_heads=2, ffn_size=48, vocab_size=64)


@pytest.mark.parametrize("name", [f.name for f in families.FAMILIES.values() if f.model is not None])
def test_each_family_row_builds_and_runs_its_model(name):
    fam = families.family(name)
    cfg = families.config_for_shape(name, LlamaConfig(**TINY, n_experts=1 if fam.config_cls is LlamaConfig else 4,
                                                      experts_per_token=1 if fam.config_cls is LlamaConfig else 2))
    assert type(cfg) is fam.config_cls and cfg.family == name
    model = build_model(cfg, fam.synthetic_state_dict(cfg, 0, torch.float32), torch.float32)
    assert type(model) is fam.model_cls
    cache = SlotKVCache(cfg.n_layers, 1, cfg.n_kv_heads, 8, cfg.head_dim, torch.float32)
    positions = torch.arange(3).unsqueeze(0)
    logits = model(torch.tensor([[1, 2, 3]]), positions, cache.bind([0], positions))
    assert logits.shape[-1] == TINY["vocab_size"] and torch.isfinite(logits).all()


def test_hf_model_types_are_read_by_their_family(tiny_llama_folder):
    cfg, _, hf_cfg = load_hf_checkpoint(tiny_llama_folder)
    assert hf_cfg["model_type"] == "llama" and cfg.family == "llama" and type(cfg) is LlamaConfig
    with pytest.raises(ValueError, match="model_type 'gpt2' is no family"):
        families.family_for_hf("gpt2")
    with pytest.raises(ValueError, match="GGUF architecture 'phi3' is no family"):
        families.family_for_gguf("phi3")


def test_conf_models_build_into_their_familys_config_class():
    """conf/'s `shape:` and `mome:` are the model's own config classes (no schema copy)."""
    mixtral, mome, smol = (load_model_config(n) for n in ("mixtral-8x7b", "mome-smollm2", "smollm2-135m"))
    assert type(mixtral.shape).__name__ == "MixtralConfig" and mixtral.shape.n_experts == 8
    assert isinstance(mome.mome, MemoryConfig) and mome.shape is None or mome.shape.family == "mome"
    assert type(smol.shape) is LlamaConfig and smol.shape.family == "llama"


@pytest.fixture
def planted_module(tmp_path, monkeypatch):
    """A module file on sys.path, importable under `name`, removed afterwards."""
    def plant(name: str, text: str):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, name, raising=False)
    return plant


def test_a_new_family_is_one_module_and_one_row(planted_module, tiny_conf, monkeypatch):
    planted_module("tinyfam", """
        from wallperf.sut.models.llama import LlamaModel, synthetic_state_dict

        class TinyFamModel(LlamaModel):
            pass
    """)
    monkeypatch.setitem(families.FAMILIES, "tinyfam", families.Family(
        "tinyfam", LlamaConfig, "tinyfam:TinyFamModel", "tinyfam:synthetic_state_dict", hf_model_types=("tinyfam",)))
    (tiny_conf / "models" / "tinyfam-model.yaml").write_text(
        "name: tinyfam-model\nfamily: tinyfam\nformat: synthetic\ntokenizer_from: smollm2-135m\n"
        "shape: {n_layers: 2, hidden_size: 64, n_heads: 4, n_kv_heads: 2, ffn_size: 128, vocab_size: 49152}\n")
    model_cfg = load_model_config("tinyfam-model")
    assert model_cfg.shape.family == "tinyfam"

    class Tok:
        eos_token_ids = {0}
    loaded = load_synthetic(model_cfg.shape, Tok(), "float32")
    assert type(loaded.model).__name__ == "TinyFamModel"
    (tiny_conf / "models" / "bad-family.yaml").write_text(
        "name: bad-family\nfamily: nosuch\nformat: synthetic\ntokenizer_from: smollm2-135m\n"
        "shape: {n_layers: 2, hidden_size: 64, n_heads: 4, n_kv_heads: 2, ffn_size: 128, vocab_size: 49152}\n")
    with pytest.raises(ConfigError, match="family.*unknown model family 'nosuch'; known: llama, mixtral, mome"):
        load_model_config("bad-family")


def test_each_backend_row_names_a_class_that_creates_it():
    import importlib

    for spec in backends.BACKEND_TABLE.values():
        try:
            backends.check_available(spec.name)
        except backends.MissingPackage:
            continue
        module, _, cls = spec.target.partition(":")
        assert callable(getattr(getattr(importlib.import_module(module), cls), "create"))


def test_a_new_backend_is_one_module_and_one_row(planted_module, tiny_conf, monkeypatch):
    planted_module("echobackend", """
        class EchoBackend:
            name = "echo"

            @classmethod
            def create(cls, loaded, *, max_batch, max_seq_len, **_):
                self = cls()
                self.max_batch, self.max_seq_len, self.tokenizer = max_batch, max_seq_len, loaded.tokenizer
                return self
    """)
    monkeypatch.setitem(backends.BACKEND_TABLE, "echo", backends.BackendSpec("echo", "echobackend:EchoBackend"))
    resolved = load_run(None, {"backend": "echo"})
    assert resolved.run.backend == "echo"

    class Loaded:
        tokenizer = "tok"
    made = backends.create("echo", Loaded(), max_batch=3, max_seq_len=128)
    assert type(made).__name__ == "EchoBackend" and (made.max_batch, made.tokenizer) == (3, "tok")
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        load_run(None, {"backend": "nope"})
    with pytest.raises(ConfigError, match="tp 2 shards the native engine"):
        load_run(None, {"backend": "echo", "tp": 2})
