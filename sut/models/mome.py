"""Mixture of memory experts (MoME), in the spirit of Lamini's memory tuning: a dense
Llama model plus, in chosen layers, a bank of millions of tiny experts of which each
token uses a few dozen, picked by product-key retrieval (Lample et al. 2019, "Large
Memory Layers with Product Keys").

Experts: single neurons, as in PEER (He 2024, "Mixture of A Million Experts"). Expert
i is a row [down_i | up_i] of 2 * hidden values; its output is silu(down_i . x) * up_i.
A rank-r adapter would cost r times the bytes per expert for the same count; single
neurons give the most experts per byte, and the bank's bytes are what a token misses.

Selection: the query q = router_query(x) (hidden -> query_dim) is split in halves q1,
q2, each scored against n_sub = sqrt(N) sub-keys. Expert i = a * n_sub + b has the key
[sub_keys[0][a] | sub_keys[1][b]], so its score is s1[a] + s2[b]; the best k of the N
sums are among the k * k sums of each half's best k (see `product_key_topk`). A token
costs O(sqrt(N) * query_dim) to score, not O(N * query_dim). The picked experts'
outputs are weighted by a softmax over their scores.

Placement: in each memory layer the memory reads what the dense MLP reads (the
post-attention norm's output) and its output is added beside the MLP's, so block i
computes x + mlp(h) + memory(h). Lample's query BatchNorm is left out: at inference
it is an affine map that folds into router_query.

The experts live in an ExpertBank (a memory-mapped safetensors file, one tensor
`layers.{i}.experts` (N, 2 * hidden) per memory layer); an ExpertCache per layer keeps
the hot rows on the compute device. router_query and sub_keys are ordinary weights,
under the HF-style names `model.layers.{i}.memory.router_query.weight` and
`model.layers.{i}.memory.sub_keys`; router_query has "router" in its name so that the
fp8 pass leaves it alone, since a small error there changes which experts are read.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wallperf.sut.models.expert_cache import ExpertBank, ExpertCache, ExpertCacheStats, write_synthetic_bank
from wallperf.sut.models.llama import MLP, LlamaConfig, LlamaModel
from wallperf.sut.models.build import build_model
from wallperf.sut.models.config import MemoryConfig

BANK_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def bank_tensor_name(layer: int) -> str:
    return f"layers.{layer}.experts"


def product_key_topk(query: torch.Tensor, sub_keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """query (M, query_dim), sub_keys (2, n_sub, query_dim / 2) -> the k best experts of
    n_sub**2: fp32 scores (M, k), descending, and ids (M, k) int64.

    Exact: if expert (a, b) is among the best k but a is not among its half's best k,
    then the k sub-keys a' that beat a each give (a', b) a higher score, k experts
    ahead of (a, b), a contradiction; the same holds for b."""
    n_sub = sub_keys.shape[1]
    q1, q2 = query.float().chunk(2, dim=-1)  # (M, query_dim / 2) each
    s1, i1 = (q1 @ sub_keys[0].float().T).topk(k, dim=-1)  # (M, k)
    s2, i2 = (q2 @ sub_keys[1].float().T).topk(k, dim=-1)
    pairs = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(1)  # (M, k * k): pair (a, b) at a * k + b
    scores, best = pairs.topk(k, dim=-1)  # (M, k)
    ids = i1.gather(1, best // k) * n_sub + i2.gather(1, best % k)
    return scores, ids


class MemoryLayer(nn.Module):
    def __init__(self, hidden: int, cfg: MemoryConfig, cache: ExpertCache):
        super().__init__()
        if cache.bank_rows.shape != (cfg.n_experts, 2 * hidden):
            raise ValueError(f"the bank holds {tuple(cache.bank_rows.shape)} experts; expected "
                             f"({cfg.n_experts}, {2 * hidden})")
        self.hidden, self.topk, self.cache = hidden, cfg.topk, cache
        self.router_query = nn.Linear(hidden, cfg.query_dim, bias=False)
        self.sub_keys = nn.Parameter(torch.empty(2, cfg.n_sub_keys, cfg.query_dim // 2))

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, hidden) -> fp32 weights (M, k) summing to 1, expert ids (M, k)."""
        scores, ids = product_key_topk(self.router_query(x), self.sub_keys, self.topk)
        return scores.softmax(dim=-1), ids

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, self.hidden)  # (M, hidden)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        # The cache must hold a step's experts: take the tokens in chunks that fit it.
        chunk = self.cache.capacity // self.topk
        for start in range(0, x.shape[0], chunk):
            out[start:start + chunk] = self._experts(x[start:start + chunk])
        return out.to(h.dtype).view_as(h)

    def _experts(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.select(x)
        rows = self.cache.storage[self.cache.fetch(ids)].float()  # (M, k, 2 * hidden)
        down, up = rows.split(self.hidden, dim=-1)  # (M, k, hidden) each
        act = F.silu(torch.bmm(down, x.float().unsqueeze(-1)).squeeze(-1))  # (M, k)
        return torch.bmm((weights * act).unsqueeze(1), up).squeeze(1)  # (M, hidden)


class MemoryMLP(nn.Module):
    """A block's dense MLP with a memory layer beside it, both reading the same input."""

    def __init__(self, mlp: MLP, memory: MemoryLayer):
        super().__init__()
        self.mlp, self.memory = mlp, memory

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h) + self.memory(h)


class MoMEModel(nn.Module):
    """A loaded LlamaModel whose memory layers' MLPs are MemoryMLPs. Same forward (and
    `cfg`, `embed_tokens`) as the base, so the engine runs it unchanged."""

    def __init__(self, base: LlamaModel, memory_cfg: MemoryConfig, memories: dict):
        super().__init__()
        self.base, self.memory_cfg = base, memory_cfg
        for i, memory in memories.items():
            base.layers[i].mlp = MemoryMLP(base.layers[i].mlp, memory)
        self._caches = {i: memory.cache for i, memory in memories.items()}

    @property
    def cfg(self) -> LlamaConfig:
        return self.base.cfg

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.base.embed_tokens

    def forward(self, input_ids, positions, cache, logits_at=None):
        return self.base(input_ids, positions, cache, logits_at)

    @contextlib.contextmanager
    def uncounted(self):
        """Work inside is left out of the expert caches' counters (the experts it
        loads stay resident): for a forward that is not part of the run, such as
        an fp8 KV cache's key calibration."""
        saved = {i: (dict(c._counts), c._load_seconds) for i, c in self._caches.items()}
        try:
            yield
        finally:
            for i, (counts, seconds) in saved.items():
                self._caches[i]._counts, self._caches[i]._load_seconds = counts, seconds

    def expert_stats(self) -> dict:
        """Cache counters summed over memory layers, and per layer (for results.json)."""
        per_layer = {i: c.stats for i, c in self._caches.items()}
        total = sum(per_layer.values(), ExpertCacheStats())
        bytes_per_expert = next(iter(self._caches.values())).bytes_per_expert
        return {**total.to_dict(), "n_experts": self.memory_cfg.n_experts, "topk": self.memory_cfg.topk,
                "cache_experts": self.memory_cfg.cache_experts, "bytes_per_expert": bytes_per_expert,
                "layers": {str(i): s.to_dict() for i, s in per_layer.items()}}


def build_mome_model(cfg: LlamaConfig, memory: MemoryConfig, sd: dict, bank: ExpertBank, dtype: torch.dtype,
                     device="cpu") -> MoMEModel:
    """The base from `sd`'s Llama weights (sut.models.build), plus a memory layer
    in each of memory.layers from its weights in `sd` and its experts in `bank`."""
    if max(memory.layers) >= cfg.n_layers:
        raise ValueError(f"memory layers {memory.layers} outside the model's {cfg.n_layers} layers")
    sd = dict(sd)
    memories = {}
    for i in memory.layers:
        p = f"model.layers.{i}.memory."
        layer = MemoryLayer(cfg.hidden_size, memory,
                            ExpertCache(bank[bank_tensor_name(i)], memory.cache_experts, device))
        layer.load_state_dict({"router_query.weight": sd.pop(p + "router_query.weight").to(dtype),
                               "sub_keys": sd.pop(p + "sub_keys").to(dtype)}, strict=True, assign=True)
        memories[i] = layer.to(device)
    base = build_model(LlamaModel, cfg, sd, dtype, device)
    return MoMEModel(base, memory, memories).eval()


def synthetic_memory_state_dict(cfg: LlamaConfig, memory: MemoryConfig, seed: int = 0,
                                dtype=torch.bfloat16) -> dict:
    """Seeded router_query and sub_keys for every memory layer, scaled by fan-in."""
    g = torch.Generator().manual_seed(seed)
    half = memory.query_dim // 2
    sd = {}
    for i in memory.layers:
        p = f"model.layers.{i}.memory."
        sd[p + "router_query.weight"] = (torch.randn(memory.query_dim, cfg.hidden_size, generator=g)
                                         * cfg.hidden_size ** -0.5).to(dtype)
        sd[p + "sub_keys"] = (torch.randn(2, memory.n_sub_keys, half, generator=g) * half ** -0.5).to(dtype)
    return sd


def synthetic_bank_path(cache_dir: Path, cfg: LlamaConfig, memory: MemoryConfig) -> Path:
    layers = "-".join(map(str, memory.layers))
    return Path(cache_dir) / "mome" / (f"mome-bank-n{memory.n_experts}-h{cfg.hidden_size}-l{layers}"
                                       f"-{memory.bank_dtype}-s{memory.seed}.safetensors")


def synthetic_bank(cache_dir: Path, cfg: LlamaConfig, memory: MemoryConfig) -> ExpertBank:
    """The seeded synthetic bank for this shape, created once under `cache_dir` (about
    n_experts * bytes_per_expert per memory layer) and memory-mapped."""
    path = synthetic_bank_path(cache_dir, cfg, memory)
    if not path.is_file():
        # down . x is then about N(0, 1) for an RMS-normed x, and up adds ~1/sqrt(hidden) per unit.
        write_synthetic_bank(path, {bank_tensor_name(i): (memory.n_experts, 2 * cfg.hidden_size)
                                    for i in memory.layers},
                             BANK_DTYPES[memory.bank_dtype], memory.seed, cfg.hidden_size ** -0.5,
                             {"format": "wallperf-mome-bank", "n_experts": memory.n_experts,
                              "hidden": cfg.hidden_size})
    return ExpertBank(path)

