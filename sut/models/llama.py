"""Llama-family decoder (Llama 3.x, SmolLM2, Qwen2): GQA, RoPE with llama3
scaling, RMSNorm, SwiGLU, optionally tied embeddings, and (Qwen2) biases on the
Q/K/V projections.

The shapes come from the checkpoint's own metadata (GGUF keys or HF
config.json). Q/K/V and gate/up projections are fused into one weight each, so
a decode step reads every weight in two GEMVs per block instead of five.
Weights use HF parameter names at the state-dict boundary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from wallperf.kernels import dispatch
from wallperf.sut.models.config import GGUF_ARCHITECTURES, LlamaConfig, RopeScaling  # noqa: F401 (their home is config.py)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,), with llama3 scaling where configured."""
    # On the CPU even inside a meta-device build: on meta, arange pulled in torch's reference ops (~2 s).
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64, device="cpu")
                                    / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv.float()
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    interpolated = (1 - smooth) * inv / s.factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, interpolated, out).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (HF layout). x: (B, H, T, D); cos/sin: (B, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Linear(nn.Linear):
    """A projection through the kernel dispatch (the CPU GEMV kernel in bf16),
    bias-free unless asked."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dispatch.linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size)

    def forward(self, x, cos, sin, kv, mask):
        """x: (B, T, hidden); kv: the layer's cache view that stores and returns K/V."""
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = kv.attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, cfg.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.ffn_size = cfg.ffn_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.ffn_size)
        self.down_proj = Linear(cfg.ffn_size, cfg.hidden_size)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        act = dispatch.swiglu(gate_up.reshape(-1, gate_up.shape[-1]))
        return self.down_proj(act.view(*x.shape[:-1], self.ffn_size))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, with_mlp: bool = True):
        """`with_mlp=False`: a subclass brings its own feed-forward as `mlp`."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        if with_mlp:
            self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    # kernels/cpu_decode.py runs this class's decode step in C++ (not its subclasses',
    # which read the class's own __dict__ and find no such flag).
    fused_decode_step = True

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        # Given its (uninitialised) weight: the checkpoint's replaces it, and initialising it on the meta
        # device pulled in torch's reference ops, seconds of every test process's start.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @torch.inference_mode()
    def forward(self, input_ids, positions, cache, logits_at=None):
        """input_ids, positions: (B, T). `cache` gives each layer's K/V store and the
        attention mask. Returns float32 logits at `logits_at` (B, T') indices of T,
        or at every position."""
        freqs = positions.unsqueeze(-1).float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, T, D)
        cos, sin = emb.cos(), emb.sin()
        mask = cache.attention_mask(positions)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.layer(i), mask)
        if logits_at is not None:
            x = x.gather(1, logits_at.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = self.norm(x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return dispatch.linear(x, head).float()

    def load_hf_state_dict(self, sd: dict, dtype: torch.dtype) -> None:
        """Assign weights given under HF names, fusing QKV and gate/up projections."""
        cfg = self.cfg
        own = {}
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            own[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
                [sd.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            if cfg.attention_bias:
                own[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat(
                    [sd.pop(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            own[f"layers.{i}.self_attn.o_proj.weight"] = sd.pop(p + "self_attn.o_proj.weight")
            own[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
                [sd.pop(p + "mlp.gate_proj.weight"), sd.pop(p + "mlp.up_proj.weight")])
            own[f"layers.{i}.mlp.down_proj.weight"] = sd.pop(p + "mlp.down_proj.weight")
            for norm in ("input_layernorm", "post_attention_layernorm"):
                own[f"layers.{i}.{norm}.weight"] = sd.pop(p + f"{norm}.weight")
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


def synthetic_state_dict(cfg: LlamaConfig, seed: int = 0, dtype=torch.bfloat16, device="cpu",
                         with_mlp: bool = True) -> dict:
    """Seeded random weights with a sane scale, for timing shapes without downloads.
    Made on `device`, so an 8B-shaped model never passes through host memory.
    `with_mlp=False` leaves out the dense MLPs, for models that bring their own."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=dtype) * shape[-1] ** -0.5)

    def ones(n):
        return torch.ones(n, dtype=dtype, device=device)

    sd = {"model.embed_tokens.weight": randn(cfg.vocab_size, cfg.hidden_size),
          "model.norm.weight": ones(cfg.hidden_size)}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = randn(cfg.vocab_size, cfg.hidden_size)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = randn(cfg.q_size, cfg.hidden_size)
        sd[p + "self_attn.k_proj.weight"] = randn(cfg.kv_size, cfg.hidden_size)
        sd[p + "self_attn.v_proj.weight"] = randn(cfg.kv_size, cfg.hidden_size)
        sd[p + "self_attn.o_proj.weight"] = randn(cfg.hidden_size, cfg.q_size)
        if cfg.attention_bias:
            for n, size in zip("qkv", (cfg.q_size, cfg.kv_size, cfg.kv_size)):
                sd[p + f"self_attn.{n}_proj.bias"] = randn(1, size)[0]
        if with_mlp:
            sd[p + "mlp.gate_proj.weight"] = randn(cfg.ffn_size, cfg.hidden_size)
            sd[p + "mlp.up_proj.weight"] = randn(cfg.ffn_size, cfg.hidden_size)
            sd[p + "mlp.down_proj.weight"] = randn(cfg.hidden_size, cfg.ffn_size)
        sd[p + "input_layernorm.weight"] = ones(cfg.hidden_size)
        sd[p + "post_attention_layernorm.weight"] = ones(cfg.hidden_size)
    return sd

