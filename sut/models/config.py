"""The model families' configs, one class per family, free of torch: the YAML
schema builds conf/'s `shape:` and `mome:` sections straight into them (no copy
between the schema and the model), and the loaders build them from GGUF
metadata and HF config.json files.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

# GGUF `general.architecture` values this decoder runs: qwen2 is the Llama block
# with Q/K/V biases (read from the tensors present, not from the name).
GGUF_ARCHITECTURES = ("llama", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    ffn_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    head_dim: Optional[int] = None
    tie_embeddings: bool = False
    max_position: int = 8192
    rope_scaling: Optional[RopeScaling] = None
    # Qwen2 adds a bias to the Q, K and V projections (no other Linear has one).
    attention_bias: bool = False
    # Experts per MLP and how many each token uses: 1 and 1 for a dense model
    # (MixtralConfig sets its own), so every family's config counts the same way.
    n_experts: int = 1
    experts_per_token: int = 1
    # The row of sut/models/families.py this config belongs to: the model built from it.
    family: str = "llama"

    def __post_init__(self):
        # n_layers may be 0: Mixtral builds the Llama shell without blocks, then its own.
        if self.n_layers < 0 or min(self.hidden_size, self.n_heads, self.n_kv_heads, self.ffn_size, self.vocab_size) < 1:
            raise ValueError("every shape figure (sizes, heads, vocabulary) must be >= 1")
        if not 1 <= self.experts_per_token <= self.n_experts:
            raise ValueError(f"need 1 <= experts_per_token ({self.experts_per_token}) <= n_experts ({self.n_experts})")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_gguf_metadata(cls, meta: dict, tensor_names: set) -> "LlamaConfig":
        arch = meta["general.architecture"]
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"GGUF architecture {arch!r} is not a Llama-family model; "
                             f"supported: {', '.join(GGUF_ARCHITECTURES)}")

        def key(name, default=None):
            return meta.get(f"{arch}.{name}", default)

        n_heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        scaling = None
        if key("rope.scaling.type") == "llama3":
            raise ValueError("llama3 RoPE scaling in GGUF is stored as a rope_freqs tensor; use the HF checkpoint")
        return cls(
            n_layers=int(key("block_count")),
            hidden_size=hidden,
            n_heads=n_heads,
            n_kv_heads=int(key("attention.head_count_kv", n_heads)),
            ffn_size=int(key("feed_forward_length")),
            vocab_size=int(key("vocab_size", 0)) or len(meta["tokenizer.ggml.tokens"]),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            head_dim=int(key("rope.dimension_count", hidden // n_heads)),
            tie_embeddings="output.weight" not in tensor_names,
            max_position=int(key("context_length", 8192)),
            rope_scaling=scaling,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
        )

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "LlamaConfig":
        scaling = None
        # transformers 5 nests theta and scaling under rope_parameters; older
        # config.json files keep rope_theta and rope_scaling at the top level.
        rs = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        theta = rs.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rs.get("rope_type", rs.get("type"))
        if rope_type == "llama3":
            scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]),
                                  float(rs["high_freq_factor"]), int(rs["original_max_position_embeddings"]))
        elif rope_type not in (None, "default"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (only llama3)")
        return cls(
            n_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            ffn_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rope_theta=float(theta),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            head_dim=cfg.get("head_dim"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position=int(cfg.get("max_position_embeddings", 8192)),
            rope_scaling=scaling,
            # Qwen2's config.json has no attention_bias key: its Q/K/V biases are implied.
            attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        )



@dataclass(frozen=True)
class MixtralConfig(LlamaConfig):
    """LlamaConfig's fields (ffn_size is one expert's), plus the experts."""

    n_experts: int = 8
    experts_per_token: int = 2
    family: str = "mixtral"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "MixtralConfig":
        window = cfg.get("sliding_window")
        if window is not None and window < cfg.get("max_position_embeddings", 0):
            raise ValueError(f"sliding_window {window} is not supported (full attention only)")
        base = super().from_hf_config(_top_level_rope_keys(cfg))
        return dataclasses.replace(base, n_experts=int(cfg["num_local_experts"]),
                                   experts_per_token=int(cfg["num_experts_per_tok"]))


def _top_level_rope_keys(cfg: dict) -> dict:
    """transformers 5 writes rope_theta (and any scaling) inside `rope_parameters`; the
    published Mixtral config.json and LlamaConfig.from_hf_config use top-level keys."""
    params = dict(cfg.get("rope_parameters") or {})
    if not params:
        return cfg
    out = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    out.setdefault("rope_theta", params.pop("rope_theta", 10000.0))
    if params.get("rope_type", "default") != "default":
        out.setdefault("rope_scaling", params)
    return out



# Bytes per element of the dtypes an expert bank may be stored in.
BANK_DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class MemoryConfig:
    n_experts: int
    layers: tuple
    topk: int = 32
    query_dim: int = 256
    # Rows kept on the compute device per memory layer.
    cache_experts: int = 65536
    bank_dtype: str = "bfloat16"
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        n_sub = math.isqrt(self.n_experts)
        if self.n_experts < 1 or n_sub * n_sub != self.n_experts:
            raise ValueError(f"n_experts must be a perfect square (product keys), got {self.n_experts}")
        if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ValueError(f"layers must be distinct layer indices, got {self.layers}")
        if self.query_dim < 2 or self.query_dim % 2:
            raise ValueError(f"query_dim must be even and >= 2, got {self.query_dim}")
        if not 1 <= self.topk <= n_sub:
            raise ValueError(f"need 1 <= topk <= sqrt(n_experts) = {n_sub}, got {self.topk}")
        if self.cache_experts < self.topk:
            raise ValueError(f"cache_experts ({self.cache_experts}) must hold one token's {self.topk} experts")
        if self.bank_dtype not in BANK_DTYPE_BYTES:
            raise ValueError(f"bank_dtype must be one of {', '.join(BANK_DTYPE_BYTES)}, got {self.bank_dtype!r}")

    @property
    def n_sub_keys(self) -> int:
        return math.isqrt(self.n_experts)

    def bytes_per_expert(self, hidden: int) -> int:
        return 2 * hidden * BANK_DTYPE_BYTES[self.bank_dtype]
