"""Backends: engines behind one small interface, independent of LoadGen.

A backend takes requests (prompt token ids and SamplingParams) with
`add_request`, advances with `step()` returning TokenEvents, and says how many
more requests it can take (`free_slots`) and whether work remains
(`has_unfinished`). Engines that run in process also offer `stats` (an
sut.engine.EngineStats) for the roofline.

The backends are one table, BACKEND_TABLE: a row says where the backend's class
is, which optional packages it needs, what it loads and what it can do; the
config checks, the run driver and the peers read the row, never the name. Adding
a backend is one module (a class with `create`) and one row.

native: our engine. openai: OpenAI-compatible endpoints. hf: HF transformers'
LlamaForCausalLM over the same weights. llamacpp: llama.cpp (llama-cpp-python)
over a GGUF file. The last two are peers to compare with and need the optional
packages of `pip install 'wallperf[peers]'`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

INSTALL_PEERS = "pip install 'wallperf[peers]'"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    # "module:Class"; Class.create(loaded, max_batch=, max_seq_len=, openai=, kv_dtype=)
    # builds it (each takes what it needs).
    target: str
    # (import name, distribution) of the optional packages it needs.
    packages: tuple = ()
    # What the run driver loads for it: the model through sut.loading
    # ("checkpoint"), a GGUF run as stored ("gguf"), or only the tokenizer of a
    # model served elsewhere ("remote": the run config has an `openai:` section).
    weights: Literal["checkpoint", "gguf", "remote"] = "checkpoint"
    # Our own engine: tensor parallelism, an fp8 KV cache, engine statistics.
    native_engine: bool = False
    # A peer engine over the same weights: dense Llama-family models only.
    peer: bool = False
    # Whether it runs fp8 weights (auto picks the published format where it cannot).
    fp8_weights: bool = True


BACKEND_TABLE: dict[str, BackendSpec] = {b.name: b for b in (
    BackendSpec("native", "wallperf.sut.backends.native:NativeBackend", native_engine=True),
    BackendSpec("openai", "wallperf.sut.backends.openai:OpenAIBackend", weights="remote"),
    BackendSpec("hf", "wallperf.sut.backends.hf:HFBackend", packages=(("transformers", "transformers"),),
                peer=True, fp8_weights=False),
    BackendSpec("llamacpp", "wallperf.sut.backends.llamacpp:LlamaCppBackend",
                packages=(("llama_cpp", "llama-cpp-python"),), weights="gguf", peer=True, fp8_weights=False),
)}
BACKENDS = tuple(BACKEND_TABLE)


def backend_spec(name: str) -> BackendSpec:
    if name not in BACKEND_TABLE:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKEND_TABLE[name]


class MissingPackage(ImportError):
    """A backend's optional package is not installed; the message says what to install."""


def require(module: str, package: str, backend: str):
    """`module` imported, or MissingPackage naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackage(f"the {backend} backend needs the package {package!r} ({e}); install it with "
                             f"{INSTALL_PEERS} or pip install {package}") from None


def check_available(kind: str) -> None:
    """Raise MissingPackage when backend `kind` cannot be imported here."""
    for module, package in backend_spec(kind).packages:
        require(module, package, kind)


def create(kind: str, loaded, max_batch: int, max_seq_len: int, openai=None, kv_dtype=None):
    """A backend of `kind`: over a loaded model (sut.loading.load_model; for
    llamacpp, sut.backends.llamacpp.load_gguf_model), or over OpenAI-compatible
    endpoints (`openai`: harness.config.OpenAIConfig), for which `loaded` need only
    carry the model's tokenizer. `kv_dtype` (native only): the KV cache's storage."""
    if openai is not None:
        from wallperf.sut.backends.replicas import REPLICAS, ReplicaBackend

        if openai.routing == REPLICAS:
            return ReplicaBackend.create(loaded, max_batch=max_batch, openai=openai)
    spec = backend_spec(kind)
    if kv_dtype is not None and not spec.native_engine:
        raise ValueError(f"an fp8 KV cache is the native engine's; backend {kind!r} keeps its own")
    check_available(kind)
    module, _, cls = spec.target.partition(":")
    backend_cls = getattr(importlib.import_module(module), cls)
    return backend_cls.create(loaded, max_batch=max_batch, max_seq_len=max_seq_len, openai=openai, kv_dtype=kv_dtype)
