"""The model a run names, loaded for the backend it runs on: a checkpoint or
synthetic weights through sut.loading, a GGUF for llama.cpp, or only the
tokenizer for a remote server."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from wallperf.harness.artifacts import cache_dir, resolve_model_file
from wallperf.harness.config import ConfigError, ResolvedRun, load_model_config
from wallperf.sut.models.config import LlamaConfig
from wallperf.driver.peers import load_llamacpp_model
from wallperf.driver.progress import say
from wallperf.sut.backends import backend_spec
from wallperf.sut.models.families import family
from wallperf.sut.loading.load import (load_model, load_mome, load_synthetic, load_tokenizer, read_checkpoint,
                         torch_dtype)


@dataclass(frozen=True)
class RemoteModel:
    """What a run over a remote server needs of the model: its tokenizer."""

    tokenizer: object
    model: None = None


def model_shape(resolved: ResolvedRun, loaded) -> LlamaConfig:
    """The published shape from conf/, or the loaded checkpoint's own. Whether the head
    is tied and the attention has biases are the loaded file's, whatever conf/ says:
    a GGUF can store its own LM head for a model published tied (Qwen2.5-Coder-0.5B's
    holds a Q8_0 output.weight beside its Q5_0 token_embd), and the roofline must
    count the head the engine reads."""
    config = getattr(loaded, "config", None)
    if resolved.model.shape is None:
        return config
    if config is None or not hasattr(config, "tie_embeddings"):
        return resolved.model.shape
    return dataclasses.replace(resolved.model.shape, tie_embeddings=config.tie_embeddings,
                               attention_bias=getattr(config, "attention_bias", False))


def choose_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(None, "device", "cuda was asked for, but torch sees no GPU")
    return requested


def check_synthetic(resolved: ResolvedRun) -> None:
    """Before anything is written: random weights have no accuracy to measure."""
    if resolved.model.format == "synthetic" and "accuracy" in resolved.run.modes:
        raise ConfigError(resolved.path, "modes", f"{resolved.model.name} has synthetic (random) weights: "
                          "accuracy means nothing; run modes: [performance]")


def load_for_run(resolved: ResolvedRun, device: str, choice):
    """The model a run names, in the format `choice` (sut.quant.FormatChoice) says:
    its checkpoint, or synthetic weights of its published shape; for MoME, that
    base with its memory experts."""
    model_cfg, run = resolved.model, resolved.run
    dtype, fp8 = choice.dtype, choice.fp8_dtype
    spec = backend_spec(run.backend)
    if spec.weights == "remote":
        source = model_cfg if model_cfg.format != "synthetic" else load_model_config(model_cfg.tokenizer_from)
        say(f"SUT: {', '.join(run.openai.endpoints)} (model {run.openai.model}); tokenizer of {source.name}")
        return RemoteModel(load_tokenizer(resolve_model_file(source)))
    if spec.weights == "gguf":
        loaded = load_llamacpp_model(resolved)
        say(f"SUT: llama.cpp on {loaded.path.name} ({loaded.weight_format})")
        return loaded
    if model_cfg.format == "synthetic":
        donor = load_model_config(model_cfg.tokenizer_from, resolved.path, "tokenizer_from")
        tokenizer = load_tokenizer(resolve_model_file(donor))
        cfg = model_cfg.shape
        say(f"building {model_cfg.name} with synthetic weights, {choice.weight_format}, on {device}")
        if not family(model_cfg.family).memory_experts:
            return load_synthetic(cfg, tokenizer, dtype, device, seed=run.seed, fp8_dtype=fp8)
        sd = family(model_cfg.family).synthetic_state_dict(cfg, run.seed, torch_dtype(dtype), device)
        path = Path("synthetic")
    else:
        path = resolve_model_file(model_cfg)
        say(f"loading {model_cfg.name} ({path.name}), {choice.weight_format}, on {device}")
        if not family(model_cfg.family).memory_experts:
            return load_model(path, dtype, device, fp8_dtype=fp8)
        cfg, sd, tokenizer = read_checkpoint(path)
    if fp8 is not None:
        raise ConfigError(resolved.path, "dtype", "fp8 weights are not supported for MoME models yet; "
                          "use bfloat16 or float32")
    memory = model_cfg.mome
    say(f"{memory.n_experts:,} memory experts in layers {list(memory.layers)}; the bank is "
         f"created once under {cache_dir() / 'mome'}")
    return load_mome(cfg, sd, tokenizer, memory, cache_dir(), dtype, device, path)
