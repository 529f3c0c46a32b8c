"""The model families, one row each. Adding a family is one module (its model
class and synthetic weights, with its config class in config.py if it needs its
own) and one row here: the loaders, the YAML schema and the run driver read
everything else from the row. Free of torch, so that validating conf/ stays
cheap: a row names its model module, imported only when a model is built.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

from wallperf.sut.models.config import GGUF_ARCHITECTURES, LlamaConfig, MixtralConfig


@dataclass(frozen=True)
class Family:
    # conf/models' `family:` value.
    name: str
    # The family's one config class: conf/'s `shape:`, GGUF metadata
    # (`from_gguf_metadata`) and HF config.json (`from_hf_config`) are built into it.
    config_cls: type
    # "module:attribute" of the model class (built on the meta device, then given a
    # state dict under HF names) and of its seeded synthetic weights; model None for
    # a family built over a dense base (memory experts).
    model: Optional[str]
    synthetic: str
    # config.json `model_type` and GGUF `general.architecture` values the family reads.
    hf_model_types: tuple = ()
    gguf_architectures: tuple = ()
    # The plain Llama block: what the peer engines (hf, llama.cpp) run and what
    # tensor parallelism shards.
    plain_llama: bool = False
    # A dense base plus a mixture of memory experts: the model YAML has a `mome:` section.
    memory_experts: bool = False

    @property
    def model_cls(self) -> Optional[type]:
        return None if self.model is None else _resolve(self.model)

    @property
    def synthetic_state_dict(self) -> Callable:
        return _resolve(self.synthetic)


def _resolve(target: str):
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", LlamaConfig, "wallperf.sut.models.llama:LlamaModel", "wallperf.sut.models.llama:synthetic_state_dict",
           hf_model_types=("llama", "qwen2"), gguf_architectures=GGUF_ARCHITECTURES, plain_llama=True),
    Family("mixtral", MixtralConfig, "wallperf.sut.models.mixtral:MixtralModel",
           "wallperf.sut.models.mixtral:synthetic_state_dict", hf_model_types=("mixtral",)),
    Family("mome", LlamaConfig, None, "wallperf.sut.models.llama:synthetic_state_dict", memory_experts=True),
)}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_config(cfg) -> Family:
    """The family whose model is built from `cfg` (the config names it)."""
    return family(cfg.family)


def family_for_hf(model_type: str | None) -> Family:
    for f in FAMILIES.values():
        if model_type in f.hf_model_types:
            return f
    known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise ValueError(f"config.json model_type {model_type!r} is no family this engine runs; known: {', '.join(known)}")


def family_for_gguf(architecture: str) -> Family:
    for f in FAMILIES.values():
        if architecture in f.gguf_architectures:
            return f
    known = sorted(a for f in FAMILIES.values() for a in f.gguf_architectures)
    raise ValueError(f"GGUF architecture {architecture!r} is no family this engine runs; known: {', '.join(known)}")


def config_for_shape(family_name: str, shape: LlamaConfig) -> LlamaConfig:
    """`shape` (conf/'s `shape:`, built as the base LlamaConfig) as its family's own config class."""
    cls = family(family_name).config_cls
    if type(shape) is cls and shape.family == family_name:
        return shape
    fields = {name: getattr(shape, name) for name in LlamaConfig.__dataclass_fields__}
    return cls(**{**fields, "family": family_name})
