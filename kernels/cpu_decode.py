"""A whole Llama decode step in one C++ call, for bf16 on the CPU.

The eager decode step issues ~20 small ops per block besides its four GEMVs;
over SmolLM2's 30 blocks their Python and dispatch overhead cost as much as
streaming the weights. `FusedDecoder` hands the step to the compiled
`wallperf::llama_decode_bf16` (csrc/decode_bf16.cpp, built with the GEMV kernel
by kernels.cpu_linear): embedding lookup in PyTorch, then every block (with
Q/K/V biases where the model has them), the final norm and the LM head (tied or
its own) in C++, against the engine's paged KV cache, bf16 or fp8
with scales (keys stored less their centres, as sut.paged_cache does). The
projections and the head are packed once, at construction, into the panels of
csrc/gemm_bf16.h (a second copy of those weights: the eager path, which
prefills, keeps the row-major ones), so that each step's GEMMs read every
weight once for all its rows.

It runs where `fused_decode_problem(model, cache)` returns None: a plain
Llama-family model (not Mixtral, MoME, fp8 or tensor-parallel) in bf16 on a CPU
whose kernels built, on the instruction-set path kernels.cpu_linear chose
(`cpu_isa()`; the step's logic is one C++ source for every path). Elsewhere the engine keeps the eager
path. `WALLPERF_FUSED_DECODE=0` turns it off, for side-by-side measurements.
"""
from __future__ import annotations

import os

import torch

from wallperf.kernels.cpu_linear import _extension

# Rows beyond this go through the eager path. The GEMM reads each weight once
# per step whatever the rows; 64 is the engine's largest decode batch measured.
MAX_FUSED_ROWS = 64


def fused_decode_problem(model, cache) -> str | None:
    """Why the fused step cannot run this model and cache, or None when it can."""
    if os.environ.get("WALLPERF_FUSED_DECODE", "1") == "0":
        return "WALLPERF_FUSED_DECODE=0"
    # The model says whether its step is the plain Llama block the C++ code runs;
    # a subclass with other blocks (Mixtral) or a wrapper (MoME) says no.
    if not type(model).__dict__.get("fused_decode_step", False):
        return f"{type(model).__name__} is not a plain Llama-family model"
    weight = model.embed_tokens.weight
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return f"weights are {weight.dtype} on {weight.device}, not bfloat16 on the CPU"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "the model is sharded or hooked (tensor parallelism)"
    for layer in model.layers:
        for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            w = getattr(lin, "weight", None)
            if w is None or w.dtype != torch.bfloat16 or not w.is_contiguous():
                return "projection weights are not contiguous bfloat16 (quantized?)"
            if lin.bias is not None and (lin is not layer.self_attn.qkv_proj or lin.bias.dtype != torch.bfloat16):
                return "a projection has a bias the fused step does not add (only bfloat16 Q/K/V biases)"
    cfg = model.cfg
    if any(width % 2 for width in (cfg.hidden_size, cfg.n_heads * cfg.head_dim, cfg.ffn_size)):
        return "an odd hidden, attention or FFN width (the packed GEMM takes K in pairs)"
    if cache.k.dtype not in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e4m3fnuz) or not cache.k.is_contiguous():
        return "the KV cache is not contiguous bfloat16 or fp8 e4m3"
    op, why = _extension()
    if op is None:
        return why
    return None


def step_profile(on: bool, reset: bool) -> torch.Tensor | None:
    """The fused step's phase clock (csrc/decode_step.h, StepPhase): switches it on or off
    and returns the seconds summed per phase since the last reset, then the steps timed
    (`reset` zeroes them); None where no compiled step runs."""
    ops = _extension()[0]
    return None if ops is None else ops.step_profile(on, reset)


class FusedDecoder:
    """`model`'s decode step against the engine's paged cache in one C++ call."""

    def __init__(self, model, cache):
        problem = fused_decode_problem(model, cache)
        if problem is not None:
            raise ValueError(f"the fused decode step cannot run here: {problem}")
        cfg = model.cfg
        self.model, self.cache, self.cfg = model, cache, cfg
        layers = model.layers
        ops = _extension()[0]
        pack = ops.pack_bf16
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        self._vocab = head.size(0)
        self._weights = (
            [pack(l.self_attn.qkv_proj.weight) for l in layers],
            [l.self_attn.qkv_proj.bias for l in layers] if cfg.attention_bias else [],
            [pack(l.self_attn.o_proj.weight) for l in layers],
            [pack(l.mlp.gate_up_proj.weight) for l in layers],
            [pack(l.mlp.down_proj.weight) for l in layers],
            [l.input_layernorm.weight for l in layers],
            [l.post_attention_layernorm.weight for l in layers],
            model.norm.weight,
            pack(head),
        )
        self._op = ops.llama_decode_bf16
        self._pack, self._head = pack, head

    def limit_head(self, vocab: int) -> None:
        """From now on compute logits for the first `vocab` token ids only: the head
        reads those rows alone (a drafter restricted to a frequent vocabulary)."""
        if not 16 <= vocab <= self._head.size(0):
            raise ValueError(f"limit_head: vocab {vocab} must be within 16..{self._head.size(0)}")
        self._weights = self._weights[:-1] + (self._pack(self._head[:vocab].contiguous()),)
        self._vocab = vocab

    @torch.inference_mode()
    def __call__(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]],
                 logits_rows: list[int] | None = None) -> torch.Tensor:
        """float32 logits (M, vocab) for each row's token at its position; its key
        and value are written into the cache at that position's slot. `logits_rows`:
        the logits of those rows only (R, vocab), in that order, the same bits as in a
        call computing every row's; [] computes no head at all (only the cache writes
        are wanted).

        Every row's key and value are written before any row attends, so rows of one
        sequence at consecutive positions are a prefill: each attends to the ones before
        it (ModelRunner.prefill)."""
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        x = self.model.embed_tokens(torch.tensor(token_ids))
        cfg = self.cfg
        c = self.cache
        rows = None if logits_rows is None else torch.tensor(logits_rows, dtype=torch.long)
        out = self._op(x, *self._weights, c.k, c.v, c.k_scale, c.v_scale, c.k_centre, tables, torch.tensor(positions),
                       self.model.inv_freq, cfg.n_heads, cfg.n_kv_heads, cfg.rms_eps, rows)
        return out[:, :self._vocab]  # the packed head's rows are the vocabulary rounded up to 16
