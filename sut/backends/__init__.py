"""Backends: engines behind one small interface, independent of LoadGen.

A backend takes requests (prompt token ids and SamplingParams) with
`add_request`, advances with `step()` returning TokenEvents, and says how many
more requests it can take (`free_slots`) and whether work remains
(`has_unfinished`).
"""
from __future__ import annotations

BACKENDS = ("native", "openai")


def create(kind: str, loaded, max_batch: int, max_seq_len: int, openai=None):
    """A backend of `kind`: over a loaded model (sut.backends.native.load_model), or
    over OpenAI-compatible endpoints (`openai`: harness.config.OpenAIConfig), for
    which `loaded` need only carry the model's tokenizer."""
    if kind == "native":
        from sut.backends.native import NativeBackend

        return NativeBackend(loaded, max_batch=max_batch, max_seq_len=max_seq_len)
    if kind == "openai":
        from sut.backends.openai import OpenAIBackend

        return OpenAIBackend(list(openai.endpoints), openai.model, max_concurrency=max_batch,
                             timeout_s=openai.timeout_s, retries=openai.retries, tokenizer=loaded.tokenizer,
                             api_key_env=openai.api_key_env, routing=openai.routing)
    raise ValueError(f"unknown backend {kind!r}; available: {', '.join(BACKENDS)}")
