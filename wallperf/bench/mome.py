"""`wallperf bench mome`: the mixture of memory experts over SmolLM2-135M's shape on the
CPU, with a bank of a million experts memory-mapped from the artifact cache.

Two measurements, each side by side in one process:

- Decode: greedy batch-1 decode of `--tokens` tokens after a random prompt, by the
  dense base and by the same base with the memory layers (the base weights are the
  same tensors), alternating per repeat, each repeat with its own prompt; medians.
  The memory's cost per token is the difference of the two times per token.
- One memory layer alone, at batch 1, over `--probe-tokens` random hidden states, in
  three passes: misses with the bank's pages dropped from the OS page cache
  (posix_fadvise DONTNEED: read from disk, as a first touch of a cold bank), misses
  with the pages cached (a fresh expert cache, the same queries), and hits (the same
  cache again). Selection alone (router query, product keys) is timed on the side.

Weights are seeded synthetic bf16 (sut.weights, sut.models.mome): the figures are
about bytes and time, not about what the memory answers. Random weights make
greedy decode loop, so decode repeats its experts more than real text may; the
probe passes bound the cost per token from both sides (all misses, all hits).
The bank is created once (about n_experts * 2304 bytes per memory layer) and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict

import torch

from wallperf.harness.artifacts import cache_dir
from wallperf.harness.config import positive, positive_list
from wallperf.sut.models.expert_cache import ExpertCache
from wallperf.sut.engine.kv_cache import SlotKVCache
from wallperf.sut.models.llama import LlamaConfig
from wallperf.sut.models.mome import (MemoryConfig, MemoryLayer, bank_tensor_name, build_mome_model, synthetic_bank,
                             synthetic_bank_path, synthetic_memory_state_dict)
from wallperf.sut.loading.weights import build_model
from wallperf.sut.models.llama import synthetic_state_dict

# SmolLM2-135M (FACTS.md): 30 layers, hidden 576, 9 heads, 3 KV heads, FFN 1536, vocab 49152.
SMOLLM2_135M = LlamaConfig(n_layers=30, hidden_size=576, n_heads=9, n_kv_heads=3, ffn_size=1536,
                           vocab_size=49152, rope_theta=100000.0, tie_embeddings=True, max_position=8192)
DTYPE = torch.bfloat16


def _decode_seconds(model, prompt: list, tokens: int) -> float:
    """Greedy decode after a prefill of `prompt`; seconds for the `tokens` decode steps."""
    cfg = model.cfg
    cache = SlotKVCache(cfg.n_layers, 1, cfg.n_kv_heads, len(prompt) + tokens, cfg.head_dim, DTYPE)
    positions = torch.arange(len(prompt)).unsqueeze(0)
    logits = model(torch.tensor([prompt]), positions, cache.bind([0], positions), logits_at=positions[:, -1:])
    start = time.perf_counter()
    for t in range(len(prompt), len(prompt) + tokens):
        positions = torch.tensor([[t]])
        ids = logits[:, -1].argmax(dim=-1, keepdim=True)  # (1, 1)
        logits = model(ids, positions, cache.bind([0], positions))
    return time.perf_counter() - start


def _drop_page_cache(path) -> None:
    """Ask the kernel to drop the file's clean pages, so the next reads go to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _probe(layer: MemoryLayer, hidden: torch.Tensor) -> list[float]:
    """Seconds per token of the layer over hidden states (n, hidden), one token a call."""
    times = []
    with torch.inference_mode():
        for h in hidden:
            start = time.perf_counter()
            layer(h.view(1, 1, -1))
            times.append(time.perf_counter() - start)
    return times


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _phase(layer: MemoryLayer, hidden: torch.Tensor) -> dict:
    before = layer.cache.stats
    times = _probe(layer, hidden)
    after = layer.cache.stats
    misses = after.misses - before.misses
    return {"ms_per_token_median": statistics.median(times) * 1e3, "ms_per_token_mean": statistics.mean(times) * 1e3,
            "hits": after.hits - before.hits, "misses": misses,
            "bytes_loaded": after.bytes_loaded - before.bytes_loaded,
            "load_ms_per_miss": (after.load_seconds - before.load_seconds) * 1e3 / misses if misses else None}


def bench(memory: MemoryConfig, tokens: int = 64, prompt_tokens: int = 16, repeats: int = 3,
          probe_tokens: int = 256, seed: int = 0) -> dict:
    cfg = SMOLLM2_135M
    existed = synthetic_bank_path(cache_dir(), cfg, memory).is_file()
    start = time.perf_counter()
    bank = synthetic_bank(cache_dir(), cfg, memory)
    bank_seconds = time.perf_counter() - start

    sd = synthetic_state_dict(cfg, seed, DTYPE)
    base = build_model(cfg, sd, DTYPE)
    mome = build_mome_model(cfg, memory, {**sd, **synthetic_memory_state_dict(cfg, memory, seed, DTYPE)}, bank,
                            DTYPE)
    g = torch.Generator().manual_seed(seed + 1)

    def prompt():
        return torch.randint(0, cfg.vocab_size, (prompt_tokens,), generator=g).tolist()

    _decode_seconds(base, prompt(), 4)  # warm-up: allocator, threads, first-touch of the weights
    _decode_seconds(mome, prompt(), 4)
    stats_before = mome.expert_stats()
    base_s, mome_s = [], []
    for _ in range(repeats):
        p = prompt()
        base_s.append(_decode_seconds(base, p, tokens))
        mome_s.append(_decode_seconds(mome, p, tokens))
    stats = mome.expert_stats()
    decode_stats = {k: stats[k] - stats_before[k] for k in ("selections", "lookups", "hits", "misses",
                                                           "evictions", "bytes_loaded", "load_seconds")}
    base_tps, mome_tps = tokens / statistics.median(base_s), tokens / statistics.median(mome_s)

    layer_index = memory.layers[0]
    layer = MemoryLayer(cfg.hidden_size, memory, ExpertCache(bank[bank_tensor_name(layer_index)],
                                                             memory.cache_experts)).to(DTYPE)
    layer.load_state_dict(mome.base.layers[layer_index].mlp.memory.state_dict())
    hidden = torch.randn(probe_tokens, cfg.hidden_size, generator=g).to(DTYPE)
    _drop_page_cache(bank.path)
    miss_disk = _phase(layer, hidden)
    layer.cache = ExpertCache(bank[bank_tensor_name(layer_index)], memory.cache_experts)
    miss_cached = _phase(layer, hidden)
    hit = _phase(layer, hidden)
    with torch.inference_mode():
        select = min(_time(lambda: layer.select(hidden[:1])) for _ in range(50))

    return {
        "model": "SmolLM2-135M shape, synthetic bf16 weights, batch 1, CPU",
        "threads": torch.get_num_threads(),
        "memory": asdict(memory),
        "bank": {"path": str(bank.path), "gb": bank.path.stat().st_size / 1e9, "created": not existed,
                 "seconds": bank_seconds, "bytes_per_expert": memory.bytes_per_expert(cfg.hidden_size)},
        "decode": {"tokens": tokens, "prompt_tokens": prompt_tokens, "repeats": repeats,
                   "base_tokens_per_second": base_tps, "mome_tokens_per_second": mome_tps,
                   "memory_ms_per_token": (1 / mome_tps - 1 / base_tps) * 1e3, "cache": decode_stats},
        "memory_layer_probe": {"tokens": probe_tokens, "miss_from_disk": miss_disk, "miss_from_page_cache": miss_cached,
                               "hit": hit, "selection_ms": select * 1e3},
    }


def format_report(r: dict) -> str:
    d, m, b = r["decode"], r["memory"], r["bank"]
    c = d["cache"]
    lines = [f"MoME over {r['model']}, {r['threads']} threads",
             f"bank: {m['n_experts']:,} experts x {len(m['layers'])} layer(s), {b['bytes_per_expert']} B each, "
             f"{b['gb']:.2f} GB ({'created' if b['created'] else 'opened'} in {b['seconds']:.1f} s); "
             f"top-{m['topk']} by product keys, cache {m['cache_experts']:,} rows",
             f"decode {d['tokens']} tokens x {d['repeats']}: base {d['base_tokens_per_second']:.1f} tok/s, "
             f"MoME {d['mome_tokens_per_second']:.1f} tok/s, memory {d['memory_ms_per_token']:.2f} ms/token",
             f"  cache: {c['hits']} hits, {c['misses']} misses, {c['bytes_loaded'] / 1e6:.2f} MB loaded in "
             f"{c['load_seconds'] * 1e3:.1f} ms, {c['evictions']} evictions"]
    p = r["memory_layer_probe"]
    lines.append(f"one memory layer, batch 1, {p['tokens']} tokens (selection alone {p['selection_ms']:.3f} ms):")
    for name in ("miss_from_disk", "miss_from_page_cache", "hit"):
        x = p[name]
        per_miss = f", {x['load_ms_per_miss'] * 1e3:.1f} us load/miss" if x["load_ms_per_miss"] else ""
        lines.append(f"  {name:22s}{x['ms_per_token_mean']:7.3f} ms/token mean, {x['ms_per_token_median']:.3f} "
                     f"median ({x['hits']} hits, "
                     f"{x['misses']} misses, {x['bytes_loaded'] / 1e6:.2f} MB{per_miss})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wallperf bench mome", description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=positive(int), default=1_000_000, help="experts per memory layer (a perfect "
                   "square)")
    p.add_argument("--layers", type=positive_list(int, zero_ok=True), default="15", help="comma list of memory "
                   "layers (default 15)")
    p.add_argument("--topk", type=positive(int), default=32, help="experts per token (default 32)")
    p.add_argument("--query-dim", type=positive(int), default=256, help="product-key query width (default 256)")
    p.add_argument("--cache-experts", type=positive(int), default=65536, help="expert rows cached per layer")
    p.add_argument("--tokens", type=positive(int), default=64, help="decode tokens per repeat (default 64)")
    p.add_argument("--prompt-tokens", type=positive(int), default=16)
    p.add_argument("--repeats", type=positive(int), default=3)
    p.add_argument("--probe-tokens", type=positive(int), default=256, help="tokens per memory-layer probe pass")
    p.add_argument("--threads", type=positive(int), help="torch CPU threads (default: torch's); on a shared "
                   "machine, fewer threads than free cores avoids OpenMP waiting on descheduled threads")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        memory = MemoryConfig(n_experts=args.experts, layers=tuple(args.layers),
                              topk=args.topk, query_dim=args.query_dim, cache_experts=args.cache_experts)
    except ValueError as e:
        p.error(str(e))
    if max(memory.layers) >= SMOLLM2_135M.n_layers:
        p.error(f"--layers: SmolLM2-135M has layers 0..{SMOLLM2_135M.n_layers - 1}")
    report = bench(memory, args.tokens, args.prompt_tokens, args.repeats, args.probe_tokens)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
