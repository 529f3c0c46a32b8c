"""Mixtral decoder: Llama's attention, norms and RoPE (imported from llama.py) with a
sparse mixture-of-experts MLP in every block.

Each token's router picks `experts_per_token` (2) of `n_experts` (8) SwiGLU experts
and sums their outputs weighted by a softmax over the picked router logits. HF's
Mixtral takes the softmax over all experts, then the top k, then renormalizes; the
two agree, because softmax is monotonic (same top k) and renormalizing the picked
probabilities e^l_i / Z over their sum cancels Z, leaving e^l_i / sum_picked e^l_j.

Experts are stored stacked, as `kernels.dispatch.fused_moe` reads them: w13 (E, 2F,
hidden) holds each expert's gate rows (HF's w1) above its up rows (w3), w2 (E, hidden,
F) its down projection. The router is an nn.Linear named `router`, so the fp8 pass's
name rule (sut.quant.EXCLUDED_NAMES) leaves it unquantized: a small error there flips
which experts a token goes to. The fp8 pass turns the stacked experts into fp8 buffers
with per-row scales (sut.quant.quantize_experts_); the forward widens the experts a
batch routes to (sut.quant.dequantize_experts).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from wallperf.kernels.dispatch import fused_moe
from wallperf.sut.models.config import MixtralConfig
from wallperf.sut.models.llama import Block, LlamaConfig, LlamaModel
from wallperf.sut.models.llama import synthetic_state_dict as dense_synthetic
from wallperf.sut.quant.fp8 import dequantize_experts


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.top_k = cfg.experts_per_token
        self.router = nn.Linear(cfg.hidden_size, cfg.n_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.ffn_size, cfg.hidden_size))
        self.w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.hidden_size, cfg.ffn_size))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, hidden) -> fp32 weights (N, k) summing to 1, expert ids (N, k)."""
        logits = self.router(x).float()  # (N, E)
        top, ids = logits.topk(self.top_k, dim=-1)
        return top.softmax(dim=-1), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, hidden = x.shape
        flat = x.reshape(B * T, hidden).contiguous()
        weights, ids = self.route(flat)
        w13, w2, ids = dequantize_experts(self, ids, flat.dtype)
        return fused_moe(flat, w13, w2, weights, ids).view(B, T, hidden)


class MixtralBlock(Block):
    """A Llama block whose feed-forward is the sparse MoE, kept under HF's name."""

    def __init__(self, cfg: MixtralConfig):
        super().__init__(cfg, with_mlp=False)
        self.block_sparse_moe = SparseMoeBlock(cfg)

    @property
    def mlp(self) -> SparseMoeBlock:
        return self.block_sparse_moe


class MixtralModel(LlamaModel):
    """LlamaModel's embedding, RoPE table, final norm, head and forward, over MoE blocks."""

    def __init__(self, cfg: MixtralConfig):
        # Zero layers: the parent builds everything but its dense blocks, which would be
        # allocated only to be replaced.
        super().__init__(dataclasses.replace(cfg, n_layers=0))
        self.cfg = cfg
        self.layers = nn.ModuleList(MixtralBlock(cfg) for _ in range(cfg.n_layers))

    def load_hf_state_dict(self, sd: dict, dtype: torch.dtype) -> None:
        """Assign weights given under Mixtral's published HF names: QKV fused as in Llama,
        each layer's experts stacked into w13 and w2."""
        cfg = self.cfg
        own = {}
        for i in range(cfg.n_layers):
            p, q = f"model.layers.{i}.", f"layers.{i}."
            own[q + "self_attn.qkv_proj.weight"] = torch.cat([sd.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            own[q + "self_attn.o_proj.weight"] = sd.pop(p + "self_attn.o_proj.weight")
            for norm in ("input_layernorm", "post_attention_layernorm"):
                own[q + f"{norm}.weight"] = sd.pop(p + f"{norm}.weight")
            moe = p + "block_sparse_moe."

            def stacked(w: str) -> torch.Tensor:
                return torch.stack([sd.pop(f"{moe}experts.{e}.{w}.weight") for e in range(cfg.n_experts)])

            own[q + "block_sparse_moe.router.weight"] = sd.pop(moe + "gate.weight")
            # HF's w1 is the gate, w3 the up projection: (E, F, hidden) each -> (E, 2F, hidden).
            own[q + "block_sparse_moe.w13"] = torch.cat([stacked("w1"), stacked("w3")], dim=1)
            own[q + "block_sparse_moe.w2"] = stacked("w2")  # (E, hidden, F)
        own["embed_tokens.weight"] = sd.pop("model.embed_tokens.weight")
        own["norm.weight"] = sd.pop("model.norm.weight")
        if self.lm_head is not None:
            own["lm_head.weight"] = sd.pop("lm_head.weight")
        else:
            sd.pop("lm_head.weight", None)
        if sd:
            raise ValueError(f"unexpected weights in checkpoint: {sorted(sd)[:5]}")
        own = {k: v.to(dtype).contiguous() for k, v in own.items()}
        self.load_state_dict(own, strict=True, assign=True)


def synthetic_state_dict(cfg: MixtralConfig, seed: int = 0, dtype=torch.bfloat16, device="cpu") -> dict:
    """Seeded random weights under Mixtral's HF names, scaled by fan-in, for timing
    shapes without downloads: Llama's attention and norms, plus router and experts."""
    sd = dense_synthetic(cfg, seed, dtype, device, with_mlp=False)
    g = torch.Generator(device=device).manual_seed(seed + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype) * shape[-1] ** -0.5

    for i in range(cfg.n_layers):
        p = f"model.layers.{i}.block_sparse_moe."
        sd[p + "gate.weight"] = randn(cfg.n_experts, cfg.hidden_size)
        for e in range(cfg.n_experts):
            x = f"{p}experts.{e}."
            sd[x + "w1.weight"] = randn(cfg.ffn_size, cfg.hidden_size)
            sd[x + "w3.weight"] = randn(cfg.ffn_size, cfg.hidden_size)
            sd[x + "w2.weight"] = randn(cfg.hidden_size, cfg.ffn_size)
    return sd

