"""The native engine as a backend: our own PyTorch Llama decoder and scheduler."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sut.engine import Engine
from sut.models.llama import LlamaConfig, LlamaModel
from sut.tokenizer import Tokenizer
from sut.weights import build_model, load_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    """Weights and tokenizer of one checkpoint, shared by every engine built on it."""

    path: Path
    config: LlamaConfig
    model: LlamaModel
    tokenizer: Tokenizer
    dtype: str


def load_model(path: Path, dtype: str) -> LoadedModel:
    """A GGUF file or HF checkpoint folder, with its own tokenizer, in `dtype`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    path = Path(path)
    cfg, sd, _ = load_checkpoint(path)
    model = build_model(cfg, sd, DTYPES[dtype])
    tokenizer = Tokenizer.from_gguf(path) if path.is_file() else Tokenizer.from_tokenizer_json(
        path / "tokenizer.json")
    return LoadedModel(path, cfg, model, tokenizer, dtype)


class NativeBackend(Engine):
    name = "native"

    def __init__(self, loaded: LoadedModel, max_batch: int, max_seq_len: int):
        super().__init__(loaded.model, loaded.tokenizer.eos_token_ids, max_batch=max_batch,
                         max_seq_len=min(max_seq_len, loaded.config.max_position))
        self.tokenizer = loaded.tokenizer
