"""Checkpoint readers: GGUF (dequantized with the `gguf` package) and HF
safetensors (single file or sharded with model.safetensors.index.json), and the
assembly of a state dict into a model (`build_model`). Never pickle. State dicts
use HF parameter names. Seeded synthetic weights live with each model family.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from wallperf.sut.loading.gguf_file import GGUFFile
from wallperf.sut.models.families import family_for_gguf, family_for_hf, family_of_config
from wallperf.sut.models.build import build_model as _build
from wallperf.sut.models.llama import LlamaConfig, LlamaModel

_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_metadata(reader) -> dict:
    """GGUF key/value metadata as plain Python values, from a GGUFFile or gguf's GGUFReader."""
    if isinstance(reader, GGUFFile):
        return dict(reader.metadata)
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores Q/K rows of each head interleaved (pairs) for its RoPE;
    restore HF's layout, where a head's first half and second half rotate together."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
    base, suffix = gguf_name.rsplit(".", 1)
    parts = base.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK_NAMES[parts[2]]}.{suffix}"
    return f"{_GGUF_TOP_NAMES[base]}.{suffix}"


def load_gguf(path: Path | GGUFFile, dtype: torch.dtype = torch.float32) -> tuple[LlamaConfig, dict, dict]:
    """(config, state dict under HF names, metadata) from a GGUF file (or one already
    open, to share it with the tokenizer). Each tensor is dequantized to float32 and
    stored in `dtype` at once, so a bf16 load never holds the whole model in float32
    (1.5B parameters: 6 GB)."""
    reader = path if isinstance(path, GGUFFile) else GGUFFile(path)
    path = reader.path
    meta = gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    fam = family_for_gguf(meta["general.architecture"])
    cfg = dataclasses.replace(fam.config_cls.from_gguf_metadata(meta, names), family=fam.name)
    permuted = meta["general.architecture"] == "llama"
    sd = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise ValueError(f"{path}: GGUF with a rope_freqs tensor (llama3 scaling) is not supported")
        w = reader.dequantized(t)
        # Only llama.cpp's llama converter interleaves Q/K rows; qwen2 keeps HF's layout.
        if permuted and t.name.endswith("attn_q.weight"):
            w = _unpermute_rope_rows(w, cfg.n_heads)
        elif permuted and t.name.endswith("attn_k.weight"):
            w = _unpermute_rope_rows(w, cfg.n_kv_heads)
        sd[_hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
    return cfg, sd, meta


def load_hf_checkpoint(folder: Path) -> tuple[LlamaConfig, dict, dict]:
    """(config, state dict, config.json) from an HF folder, sharded or not."""
    from safetensors.torch import load_file

    folder = Path(folder)
    hf_cfg = json.loads((folder / "config.json").read_text())
    fam = family_for_hf(hf_cfg.get("model_type"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors files")
    sd = {}
    for name in files:
        sd.update(load_file(str(folder / name)))
    return dataclasses.replace(fam.config_cls.from_hf_config(hf_cfg), family=fam.name), sd, hf_cfg


def build_model(cfg: LlamaConfig, sd: dict, dtype: torch.dtype, device="cpu", consume: bool = False) -> LlamaModel:
    """The model of `cfg`'s family, built on the meta device, then given `sd`'s
    weights (sut.models.build); `consume=True` empties `sd` as it goes."""
    return _build(family_of_config(cfg).model_cls, cfg, sd, dtype, device, consume)


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32) -> tuple[LlamaConfig, dict, dict]:
    """A GGUF file (its tensors in `dtype`) or an HF checkpoint folder (as stored)."""
    path = Path(path)
    if path.is_dir():
        return load_hf_checkpoint(path)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype)
    raise ValueError(f"{path}: expected a .gguf file or an HF checkpoint folder")
