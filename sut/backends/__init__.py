"""Backends: engines behind one small interface, independent of LoadGen.

A backend takes requests (prompt token ids and SamplingParams) with
`add_request`, advances with `step()` returning TokenEvents, and says how many
more requests it can take (`free_slots`) and whether work remains
(`has_unfinished`). Engines that run in process also offer `stats` (an
sut.engine.EngineStats) for the roofline.

native: our engine. openai: OpenAI-compatible endpoints. hf: HF transformers'
LlamaForCausalLM over the same weights. llamacpp: llama.cpp (llama-cpp-python)
over a GGUF file. The last two are peers to compare with and need the optional
packages of `pip install 'wallperf[peers]'`.
"""
from __future__ import annotations

import importlib

BACKENDS = ("native", "openai", "hf", "llamacpp")
# The import each peer backend needs, and the distribution that provides it.
PEER_PACKAGES = {"hf": [("transformers", "transformers")], "llamacpp": [("llama_cpp", "llama-cpp-python")]}
INSTALL_PEERS = "pip install 'wallperf[peers]'"


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
    for module, package in PEER_PACKAGES.get(kind, ()):
        require(module, package, kind)


def create(kind: str, loaded, max_batch: int, max_seq_len: int, openai=None, kv_dtype=None):
    """A backend of `kind`: over a loaded model (sut.loading.load_model; for
    llamacpp, sut.backends.llamacpp.load_gguf_model), or over OpenAI-compatible
    endpoints (`openai`: harness.config.OpenAIConfig), for which `loaded` need only
    carry the model's tokenizer. `kv_dtype` (native only): the KV cache's storage."""
    if kv_dtype is not None and kind != "native":
        raise ValueError(f"an fp8 KV cache is the native engine's; backend {kind!r} keeps its own")
    if kind == "native":
        from wallperf.sut.backends.native import NativeBackend

        return NativeBackend(loaded, max_batch=max_batch, max_seq_len=max_seq_len, kv_dtype=kv_dtype)
    if kind == "openai":
        from wallperf.sut.backends.openai import OpenAIBackend

        return OpenAIBackend(list(openai.endpoints), openai.model, max_concurrency=max_batch,
                             timeout_s=openai.timeout_s, retries=openai.retries, tokenizer=loaded.tokenizer,
                             api_key_env=openai.api_key_env, routing=openai.routing)
    if kind == "hf":
        check_available(kind)
        from wallperf.sut.backends.hf import HFBackend

        return HFBackend(loaded, max_batch=max_batch, max_seq_len=max_seq_len)
    if kind == "llamacpp":
        check_available(kind)
        from wallperf.sut.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(loaded, max_batch=max_batch, max_seq_len=max_seq_len)
    raise ValueError(f"unknown backend {kind!r}; available: {', '.join(BACKENDS)}")
