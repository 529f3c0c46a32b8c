"""Model loading, in one place for every backend: a checkpoint (GGUF or HF
folder), seeded synthetic weights of a published shape, or a dense base with
memory experts, each in the dtype asked for and, with `fp8_dtype`, with its
projections quantized. The route of a dtype from the command line to the
weights starts and ends here.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from wallperf.sut.models.families import family_of_config
from wallperf.sut.models.llama import LlamaConfig, LlamaModel
from wallperf.sut.loading.tokenizer import Tokenizer
from wallperf.sut.loading.gguf_file import GGUFFile
from wallperf.sut.loading.weights import build_model, load_checkpoint, load_gguf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (truncated, corrupt, not what its name says): one line naming it."""


def unreadable_checkpoint(path: Path, why: str) -> CheckpointError:
    """The one line for a checkpoint that cannot be read: which file, why, what to do."""
    path = Path(path)
    kind = "a GGUF file" if path.is_file() else "an HF checkpoint folder (config.json, *.safetensors, tokenizer.json)"
    return CheckpointError(f"{path}: cannot load it as {kind}: {why}; the file may be truncated or corrupt: "
                           "download or export it again")


@contextmanager
def reading_checkpoint(path: Path):
    """Whatever a reader of an untrusted file raises (struct, numpy, safetensors, JSON,
    tokenizers errors, a shape that does not fit) becomes one CheckpointError naming the file.
    Every loader of a checkpoint, the peer backends' included, reads inside it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - the file is the user's; every reader failure is a bad file
        raise unreadable_checkpoint(path, f"{type(e).__name__}: {e}") from e


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


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(path: Path) -> Tokenizer:
    path = Path(path)
    with reading_checkpoint(path):
        return Tokenizer.from_gguf(path) if path.is_file() else Tokenizer.from_tokenizer_json(path / "tokenizer.json")


def load_model(path: Path, dtype: str, device: str = "cpu", fp8_dtype: torch.dtype | None = None) -> LoadedModel:
    """A GGUF file or HF checkpoint folder, with its own tokenizer, in `dtype`;
    with `fp8_dtype`, its projection weights quantized to that fp8 format."""
    path = Path(path)
    cfg, sd, tokenizer = read_checkpoint(path, torch_dtype(dtype))
    with reading_checkpoint(path):
        model = build_model(cfg, sd, torch_dtype(dtype), device, consume=True)
    return LoadedModel(path, cfg, model, tokenizer, dtype, device, _quantize(model, fp8_dtype))


def read_checkpoint(path: Path, dtype: torch.dtype = torch.float32) -> tuple[LlamaConfig, dict, Tokenizer]:
    """A GGUF file's (its tensors in `dtype`) or HF checkpoint folder's config, state
    dict and tokenizer; one that cannot be read is a CheckpointError naming it."""
    path = Path(path)
    with reading_checkpoint(path):
        if path.is_file() and path.suffix == ".gguf":
            # One read of the file's tables for both the weights and the tokenizer.
            gguf = GGUFFile(path)
            cfg, sd, _ = load_gguf(gguf, dtype)
            return cfg, sd, Tokenizer.from_gguf(gguf)
        cfg, sd, _ = load_checkpoint(path, dtype)
    return cfg, sd, load_tokenizer(path)


def _quantize(model, fp8_dtype) -> dict | None:
    if fp8_dtype is None:
        return None
    from wallperf.sut.quant.fp8 import quantize_model_

    return quantize_model_(model, fp8_dtype, per_channel=True).to_dict()


def load_synthetic(cfg: LlamaConfig, tokenizer: Tokenizer, dtype: str, device: str = "cpu",
                   seed: int = 0, fp8_dtype: torch.dtype | None = None) -> LoadedModel:
    """Seeded random weights of a published shape, with a borrowed tokenizer, for
    timing shapes whose checkpoints are not at hand. Its outputs mean nothing."""
    sd = family_of_config(cfg).synthetic_state_dict(cfg, seed, torch_dtype(dtype), device)
    model = build_model(cfg, sd, torch_dtype(dtype), device)
    return LoadedModel(Path("synthetic"), cfg, model, tokenizer, dtype, device, _quantize(model, fp8_dtype))


def load_mome(cfg: LlamaConfig, sd: dict, tokenizer: Tokenizer, memory, bank_dir: Path, dtype: str,
              device: str = "cpu", path: Path = Path("synthetic")) -> LoadedModel:
    """A dense base (`cfg`, `sd`: a checkpoint's or synthetic weights) with a mixture
    of memory experts (`memory`, a sut.models.mome.MemoryConfig): a seeded synthetic
    router, and an expert bank memory-mapped from `bank_dir` (created there once)."""
    from wallperf.sut.models.mome import build_mome_model, synthetic_bank, synthetic_memory_state_dict

    dt = torch_dtype(dtype)
    sd = {**sd, **synthetic_memory_state_dict(cfg, memory, memory.seed, dt)}
    model = build_mome_model(cfg, memory, sd, synthetic_bank(bank_dir, cfg, memory), dt, device)
    return LoadedModel(path, cfg, model, tokenizer, dtype, device)
