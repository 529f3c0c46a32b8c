"""The native engine as a backend: our own PyTorch Llama decoder and scheduler."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sut.engine import Engine
from sut.models.llama import LlamaConfig, LlamaModel
from sut.tokenizer import Tokenizer
from sut.weights import build_model, load_checkpoint, synthetic_state_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    """Weights and tokenizer of one checkpoint, shared by every engine built on it."""

    path: Path
    config: LlamaConfig
    model: LlamaModel
    tokenizer: Tokenizer
    dtype: str
    device: str = "cpu"
    # What quantization did (sut.quant.QuantReport.to_dict()), when weights are fp8.
    quantization: dict | None = None


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(path: Path) -> Tokenizer:
    path = Path(path)
    return Tokenizer.from_gguf(path) if path.is_file() else Tokenizer.from_tokenizer_json(path / "tokenizer.json")


def load_model(path: Path, dtype: str, device: str = "cpu", fp8_dtype: torch.dtype | None = None) -> LoadedModel:
    """A GGUF file or HF checkpoint folder, with its own tokenizer, in `dtype`;
    with `fp8_dtype`, its projection weights quantized to that fp8 format."""
    torch_dtype = _check_dtype(dtype)
    path = Path(path)
    cfg, sd, _ = load_checkpoint(path)
    model = build_model(cfg, sd, torch_dtype, device)
    return LoadedModel(path, cfg, model, load_tokenizer(path), dtype, device, _quantize(model, fp8_dtype))


def _quantize(model, fp8_dtype) -> dict | None:
    if fp8_dtype is None:
        return None
    from sut.quant import quantize_model_

    return quantize_model_(model, fp8_dtype, per_channel=True).to_dict()


def load_synthetic(cfg: LlamaConfig, tokenizer: Tokenizer, dtype: str, device: str = "cpu",
                   seed: int = 0, fp8_dtype: torch.dtype | None = None) -> LoadedModel:
    """Seeded random weights of a published shape, with a borrowed tokenizer, for
    timing shapes whose checkpoints are not at hand. Its outputs mean nothing."""
    torch_dtype = _check_dtype(dtype)
    from sut.models.mixtral import MixtralConfig, synthetic_state_dict as mixtral_synthetic

    make = mixtral_synthetic if isinstance(cfg, MixtralConfig) else synthetic_state_dict
    sd = make(cfg, seed, torch_dtype, device)
    model = build_model(cfg, sd, torch_dtype, device)
    return LoadedModel(Path("synthetic"), cfg, model, tokenizer, dtype, device, _quantize(model, fp8_dtype))


def load_mome(cfg: LlamaConfig, sd: dict, tokenizer: Tokenizer, memory, bank_dir: Path, dtype: str,
              device: str = "cpu", path: Path = Path("synthetic")) -> LoadedModel:
    """A dense base (`cfg`, `sd`: a checkpoint's or synthetic weights) with a mixture
    of memory experts (`memory`, a sut.models.mome.MemoryConfig): a seeded synthetic
    router, and an expert bank memory-mapped from `bank_dir` (created there once)."""
    from sut.models.mome import build_mome_model, synthetic_bank, synthetic_memory_state_dict

    torch_dtype = _check_dtype(dtype)
    sd = {**sd, **synthetic_memory_state_dict(cfg, memory, memory.seed, torch_dtype)}
    model = build_mome_model(cfg, memory, sd, synthetic_bank(bank_dir, cfg, memory), torch_dtype, device)
    return LoadedModel(path, cfg, model, tokenizer, dtype, device)


class NativeBackend(Engine):
    name = "native"

    def __init__(self, loaded: LoadedModel, max_batch: int, max_seq_len: int):
        super().__init__(loaded.model, loaded.tokenizer.eos_token_ids, max_batch=max_batch,
                         max_seq_len=min(max_seq_len, loaded.config.max_position), device=loaded.device)
        self.tokenizer = loaded.tokenizer
