"""Tensor parallelism for the dense Llama decoder (Megatron-style), over torch.distributed.

Each of `world_size` ranks holds a slice of every block and runs the same forward
on the same tokens:

- attention: `qkv_proj` is column-parallel. The rank keeps its n_heads / world_size
  query heads and its n_kv_heads / world_size KV heads, cut from each section of
  the fused weight (rows: all q heads, then all k heads, then all v heads). Query
  head h reads KV head h // (n_heads / n_kv_heads), so a rank's contiguous run of
  query heads reads exactly its own run of KV heads: attention needs no
  communication. `o_proj` is row-parallel: the rank multiplies its heads' columns
  and the partial outputs are summed with one all-reduce.
- MLP: `gate_up_proj` is column-parallel (the gate and up sections are cut
  separately, so the rank's rows stay "its gate, then its up" as swiglu reads
  them), `down_proj` row-parallel with one all-reduce.

So there are two all-reduces per block. They cannot be fused into one: the MLP's
RMSNorm needs the whole residual stream after attention, which exists only after
the first all-reduce. Embeddings, norms and the LM head are replicated: every rank
computes the same logits (an all-reduce leaves the same sum on every rank), so
every rank's greedy choice, and hence its scheduler, stays identical without
exchanging tokens. A vocab-parallel head would save memory for large vocabularies
at the price of a gather per step; not needed at these sizes.

The rank's model reports its local head counts and FFN width in `model.cfg` (and
each Attention's cfg), so the Engine sizes its KV cache per rank: every rank
stores only its own KV heads. head_dim and hidden_size are unchanged.

The all-reduces are forward hooks on each block's `self_attn` and `mlp` modules:
their outputs are exactly the row-parallel partial sums. The projections stay
plain nn.Linear under their own names, so `sut.quant.quantize_model_` run after
sharding quantizes the shards (per-channel scales of the row-parallel shards are
then per rank; the hooks live on the parents and survive the swap).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from wallperf.sut.models.llama import Block, LlamaConfig, LlamaModel


@dataclass(frozen=True)
class TPShard:
    """Which slice of the model a rank holds; set on the model as `model.tp`."""

    rank: int
    world_size: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")


def check_shardable(cfg: LlamaConfig, world_size: int) -> None:
    """Raise unless query heads, KV heads and the FFN width all split evenly."""
    if world_size < 1:
        raise ValueError(f"tensor-parallel world_size must be >= 1, got {world_size}")
    uneven = [f"{name} {value}" for name, value in
              (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("ffn_size", cfg.ffn_size))
              if value % world_size]
    if uneven:
        # Replicating KV heads (as vLLM does when tp > n_kv_heads) is not implemented.
        raise ValueError(f"tensor parallelism over {world_size} ranks needs n_heads, n_kv_heads and ffn_size "
                         f"divisible by {world_size}; not divisible: {', '.join(uneven)}")


def local_config(cfg: LlamaConfig, world_size: int) -> LlamaConfig:
    """The config one rank's shard reports: its own heads and FFN width."""
    check_shardable(cfg, world_size)
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // world_size, n_kv_heads=cfg.n_kv_heads // world_size,
                               ffn_size=cfg.ffn_size // world_size)


def shard_model_(model: LlamaModel, rank: int, world_size: int, group=None) -> LlamaModel:
    """Turn a built, unquantized LlamaModel into rank `rank`'s shard, in place.

    `group` is the process group of the tensor-parallel ranks (None: the default
    world group). World size 1 leaves the model as it is. The full weights are
    released as each projection is replaced by its (copied) slice."""
    if type(model) is not LlamaModel or not all(type(layer) is Block for layer in model.layers):
        raise TypeError(f"tensor parallelism covers the dense Llama decoder; {type(model).__name__} "
                        "(MoE experts, memory experts) is not sharded")
    if hasattr(model, "tp"):
        raise ValueError(f"the model is already sharded ({model.tp})")
    shard = TPShard(rank, world_size)
    full = model.cfg
    local = local_config(full, world_size)
    if world_size == 1:
        model.tp = shard
        return model
    for name, m in model.named_modules():
        if name.endswith("_proj") and not isinstance(m, nn.Linear):
            raise TypeError(f"{name} is a {type(m).__name__}: shard before quantizing")
    all_reduce = functools.partial(_all_reduce_output, group=group)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _set_rows(attn.qkv_proj, [full.q_size, full.kv_size, full.kv_size], rank, world_size)
        _set_columns(attn.o_proj, rank, world_size)
        attn.cfg = local
        attn.register_forward_hook(all_reduce)
        _set_rows(mlp.gate_up_proj, [full.ffn_size, full.ffn_size], rank, world_size)
        _set_columns(mlp.down_proj, rank, world_size)
        mlp.ffn_size = local.ffn_size
        mlp.register_forward_hook(all_reduce)
    model.cfg = local
    model.tp = shard
    return model


def _set_rows(linear: nn.Linear, sections: list[int], rank: int, world_size: int) -> None:
    """Column parallel: keep the rank's share of every section of the output rows
    (and of the bias, which belongs to those rows)."""

    def share(t: torch.Tensor) -> torch.Tensor:
        parts, start = [], 0
        for size in sections:
            n = size // world_size
            parts.append(t[start + rank * n: start + (rank + 1) * n])
            start += size
        return torch.cat(parts)

    if linear.bias is not None:
        linear.bias = nn.Parameter(share(linear.bias), requires_grad=linear.bias.requires_grad)
    _assign(linear, share(linear.weight), in_features=linear.in_features)


def _set_columns(linear: nn.Linear, rank: int, world_size: int) -> None:
    """Row parallel: keep the rank's share of the input columns."""
    n = linear.in_features // world_size
    _assign(linear, linear.weight[:, rank * n: (rank + 1) * n], in_features=n)


def _assign(linear: nn.Linear, weight: torch.Tensor, in_features: int) -> None:
    # A copy, so the full weight's storage is freed rather than kept alive by a view.
    linear.weight = nn.Parameter(weight.clone(memory_format=torch.contiguous_format),
                                 requires_grad=linear.weight.requires_grad)
    linear.in_features, linear.out_features = in_features, weight.shape[0]


def _all_reduce_output(module, args, output, group=None):
    """Sum the row-parallel partial outputs of all ranks (in place; same sum everywhere)."""
    dist.all_reduce(output, op=dist.ReduceOp.SUM, group=group)
    return output
