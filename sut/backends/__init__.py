"""Backends: engines behind one small interface, independent of LoadGen.

A backend takes requests (prompt token ids and SamplingParams) with
`add_request`, advances with `step()` returning TokenEvents, and says how many
more requests it can take (`free_slots`) and whether work remains
(`has_unfinished`).
"""
from __future__ import annotations

BACKENDS = ("native",)


def create(kind: str, loaded, max_batch: int, max_seq_len: int):
    """A backend of `kind` over a loaded model (see sut.backends.native.load_model)."""
    if kind == "native":
        from sut.backends.native import NativeBackend

        return NativeBackend(loaded, max_batch=max_batch, max_seq_len=max_seq_len)
    raise ValueError(f"unknown backend {kind!r}; available: {', '.join(BACKENDS)}")
