"""What one decode step reads and computes: parameters, bytes and FLOPs.

A decode step produces one token for each sequence in the batch. It reads the
weights once (shared by the batch) and each sequence's KV cache.

Weights are counted as stored (`WeightBytes`), each tensor at its own dtype:

- from a published shape and a format (`shape_weight_bytes`), laid out as
  sut.quant stores it: with fp8, every projection (attention, dense FFN, MoE
  experts) is one byte per weight plus one fp32 scale per output row, while
  the embedding table, the norms, the MoE router and the LM head stay in the
  activation dtype;
- from the tensors a loaded model really holds (`held_weight_bytes`), for a
  run: whatever the loader and the quantizer made of them.

Conventions, both ways:

- The input embedding table is counted whole (the published convention: Llama
  3.1 8B bf16 = 16.06e9 bytes, ~331 tok/s on MI300X). A step only gathers
  `batch` rows of it; `embedding="rows"` counts those instead (6.5% fewer
  bytes for Llama 3.1 8B). A tied table is the LM head, read whole either way.
- Mixture of experts: each token runs `experts_per_token` (k) of `n_experts`
  experts, so a step over a batch touches at most min(n_experts, batch * k)
  distinct experts: an upper bound, reached when the tokens route apart.
- Memory experts (MoME) are read from their bank: the rows a step loaded are
  passed in from the run's own expert counters (`extra`).

The KV cache read per step is 2 (K and V) * n_layers * n_kv_heads * head_dim *
context * bytes per element, per sequence. The element size is the cache's:
the activation dtype unless the caller passes `kv_bytes_per_element` (an fp8
KV cache, or a peer engine's float16 cache).

FLOPs per token are 2 per multiply-accumulate of every weight matrix the token
runs through (attention projections, its k experts, the router, the LM head;
the embedding gather and the norms do no matmul), plus attention over the
context: QK^T and AV are each 2 * n_heads * head_dim * context per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from wallperf.sut.models.config import LlamaConfig

BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
# sut.quant keeps one fp32 scale per output row of every fp8 projection.
FP8_SCALE_BYTES = 4
# Names in a loaded model's state dict that hold MoE experts (stacked, with their scales).
EXPERT_TENSORS = (".w13", ".w2")

Embedding = Literal["table", "rows"]


@dataclass(frozen=True)
class ParameterCount:
    """Parameters by part of the model; experts counted all, as stored."""

    embedding: int
    attention: int
    ffn: int
    experts: int
    router: int
    norms: int
    lm_head: int
    # Q/K/V projection biases (Qwen2): kept in the activation dtype, like the norms.
    biases: int = 0

    @property
    def total(self) -> int:
        return (self.embedding + self.attention + self.ffn + self.experts + self.router + self.norms
                + self.lm_head + self.biases)


def head_dim(shape: LlamaConfig) -> int:
    return shape.head_dim or shape.hidden_size // shape.n_heads


def count_parameters(shape: LlamaConfig) -> ParameterCount:
    """Llama-family parameters: GQA attention (with Q/K/V biases when the shape says so),
    SwiGLU FFN (dense or experts), RMSNorm."""
    h, d, L = shape.hidden_size, head_dim(shape), shape.n_layers
    q_and_o = 2 * h * shape.n_heads * d
    k_and_v = 2 * h * shape.n_kv_heads * d
    swiglu = 3 * h * shape.ffn_size  # gate, up and down projections
    moe = shape.n_experts > 1
    return ParameterCount(
        embedding=shape.vocab_size * h,
        attention=L * (q_and_o + k_and_v),
        ffn=0 if moe else L * swiglu,
        experts=L * shape.n_experts * swiglu if moe else 0,
        router=L * h * shape.n_experts if moe else 0,
        norms=(2 * L + 1) * h,
        lm_head=0 if shape.tie_embeddings else shape.vocab_size * h,
        biases=L * (shape.n_heads + 2 * shape.n_kv_heads) * d if shape.attention_bias else 0,
    )


def experts_touched(shape: LlamaConfig, batch: int) -> int:
    """Distinct experts a step over `batch` tokens reads, at most (see the module docstring)."""
    return min(shape.n_experts, batch * shape.experts_per_token)


def weight_parameters(shape: LlamaConfig, batch: int = 1, embedding: Embedding = "table") -> float:
    """Parameters one decode step over `batch` sequences reads from memory."""
    p = count_parameters(shape)
    experts = p.experts * experts_touched(shape, batch) / shape.n_experts
    if embedding == "rows" and not shape.tie_embeddings:
        table = min(batch, shape.vocab_size) * shape.hidden_size
    else:
        table = p.embedding
    return table + p.attention + p.ffn + experts + p.router + p.norms + p.lm_head + p.biases


def active_parameters(shape: LlamaConfig) -> int:
    """Weights one token multiplies through: its FLOPs are twice this (without attention)."""
    p = count_parameters(shape)
    lm_head = p.lm_head or p.embedding
    active_experts = p.experts * shape.experts_per_token // shape.n_experts
    return p.attention + p.ffn + active_experts + p.router + lm_head


@dataclass(frozen=True)
class WeightBytes:
    """A model's weights as stored, split by how a decode step reads them."""

    # The input embedding table (the LM head too when tied).
    table: float
    # Read whole by every step: attention, dense FFN, router, norms, an untied LM head, scales.
    dense: float
    # Every MoE expert's weights and scales; a step reads the share it touches.
    experts: float = 0.0
    # Bytes per step read beyond the model's tensors (MoME's memory-expert rows, from the run).
    extra: float = 0.0

    @property
    def total(self) -> float:
        return self.table + self.dense + self.experts

    def per_step(self, shape: LlamaConfig, batch: int = 1, embedding: Embedding = "table") -> float:
        experts = self.experts * experts_touched(shape, batch) / shape.n_experts if self.experts else 0.0
        table = self.table
        if embedding == "rows" and not shape.tie_embeddings:
            table = self.table * min(batch, shape.vocab_size) / shape.vocab_size
        return table + self.dense + experts + self.extra


def shape_weight_bytes(shape: LlamaConfig, dtype: str, activation_dtype: str = "bfloat16") -> WeightBytes:
    """The weights of a published shape stored in `dtype`; fp8 as sut.quant lays it out
    (see the module docstring), the unquantized tensors in `activation_dtype`."""
    p = count_parameters(shape)
    if dtype != "fp8":
        size = BYTES_PER_ELEMENT[dtype]
        return WeightBytes(table=p.embedding * size,
                           dense=(p.attention + p.ffn + p.router + p.norms + p.lm_head + p.biases) * size,
                           experts=p.experts * size)
    high = BYTES_PER_ELEMENT[activation_dtype]
    h, d, L, F = shape.hidden_size, head_dim(shape), shape.n_layers, shape.ffn_size
    attention_rows = L * ((shape.n_heads + 2 * shape.n_kv_heads) * d + h)
    swiglu_rows = 2 * F + h  # gate and up rows, then down's
    moe = shape.n_experts > 1
    ffn_rows = 0 if moe else L * swiglu_rows
    expert_rows = L * shape.n_experts * swiglu_rows if moe else 0
    return WeightBytes(
        table=p.embedding * high,
        dense=(p.attention + p.ffn + FP8_SCALE_BYTES * (attention_rows + ffn_rows)
               + (p.router + p.norms + p.lm_head + p.biases) * high),
        experts=p.experts + FP8_SCALE_BYTES * expert_rows)


def held_weight_bytes(model, extra: float = 0.0) -> WeightBytes:
    """The bytes of every tensor a loaded model holds (`model.state_dict()`), each at its
    own element size, a tensor shared by two names (a tied head) counted once."""
    table = dense = experts = 0
    seen = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) if t.device.type != "meta" else name
        if key in seen:
            continue
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        if "embed_tokens" in name:
            table += nbytes
        elif any(part in name for part in EXPERT_TENSORS):
            experts += nbytes
        else:
            dense += nbytes
    return WeightBytes(table=table, dense=dense, experts=experts, extra=extra)


def kv_bytes_per_sequence(shape: LlamaConfig, context: int, bytes_per_element: float) -> float:
    """K and V of every layer for `context` positions of one sequence."""
    return 2 * shape.n_layers * shape.n_kv_heads * head_dim(shape) * context * bytes_per_element


def flops_per_token(shape: LlamaConfig, context: int = 0) -> float:
    attention = 4 * shape.n_layers * shape.n_heads * head_dim(shape) * context
    return 2 * active_parameters(shape) + attention


def prefill_flops(shape: LlamaConfig, prompt_tokens: float) -> float:
    """FLOPs of prefilling one prompt of `prompt_tokens`: every token through the
    weights, and causal attention over the positions before it (mean context n/2)."""
    return prompt_tokens * flops_per_token(shape, prompt_tokens / 2)
