"""The native engine as a backend: our own PyTorch Llama decoder and scheduler
over a model loaded by sut.loading."""
from __future__ import annotations

from wallperf.sut.engine.engine import Engine
from wallperf.sut.loading.load import LoadedModel


class NativeBackend(Engine):
    name = "native"

    @classmethod
    def create(cls, loaded: LoadedModel, *, max_batch: int, max_seq_len: int, kv_dtype=None, **_):
        return cls(loaded, max_batch=max_batch, max_seq_len=max_seq_len, kv_dtype=kv_dtype)

    def __init__(self, loaded: LoadedModel, max_batch: int, max_seq_len: int, kv_dtype=None):
        super().__init__(loaded.model, loaded.tokenizer.eos_token_ids, max_batch=max_batch,
                         max_seq_len=min(max_seq_len, loaded.config.max_position), device=loaded.device,
                         kv_dtype=kv_dtype)
        self.tokenizer = loaded.tokenizer
