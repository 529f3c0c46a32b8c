"""Tensor parallelism against the unsharded model: two gloo ranks on the CPU must
give the same greedy tokens as one process running the plain engine (continuous
batching with chunked prefill), and prefill logits within float32 rounding (the
row-parallel sums add in a different order)."""
import dataclasses

import pytest
import torch

from wallperf.driver.tp_launch import run_tp_generate
from wallperf.sut.engine.engine import Engine, SamplingParams
from wallperf.sut.engine.kv_cache import SlotKVCache
from wallperf.sut.models.llama import LlamaConfig
from wallperf.sut.models.mixtral import MixtralConfig, MixtralModel
from wallperf.sut.engine.tp import shard_model_
from wallperf.sut.loading.weights import build_model
from wallperf.sut.models.llama import synthetic_state_dict

CFG = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=128, vocab_size=256,
                  max_position=128)
PROMPTS = [[5, 9, 13, 2, 7], [3] * 21, [11, 4], list(range(1, 30))]
PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)
# Chunked prefill and a batch smaller than the prompts: requests wait and join mid-run.
ENGINE = dict(max_batch=3, max_tokens_per_step=16, block_size=8)


# One torch thread: tiny GEMMs gain nothing from a second on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(cfg):
    """One process, no sharding: each prompt's prefill logits, and the plain
    engine's greedy tokens for all prompts together."""
    model = build_model(cfg, synthetic_state_dict(cfg, 0, torch.float32), torch.float32)
    logits = []
    for p in PROMPTS:
        cache = SlotKVCache(cfg.n_layers, 1, cfg.n_kv_heads, len(p), cfg.head_dim, torch.float32)
        pos = torch.arange(len(p)).unsqueeze(0)
        logits.append(model(torch.tensor([p]), pos, cache.bind([0], pos))[0])
    engine = Engine(model, (), max_seq_len=max(map(len, PROMPTS)) + PARAMS.max_new_tokens, **ENGINE)
    for i, p in enumerate(PROMPTS):
        engine.add_request(i, p, PARAMS)
    tokens = {i: [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for ev in engine.step():
            tokens[ev.request_id].append(ev.token_id)
    return [tokens[i] for i in range(len(PROMPTS))], logits


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, attention_bias=True)], ids=["llama", "qwen2"])
def test_two_ranks_match_one(cfg):
    """Qwen2's Q/K/V biases are split with their rows."""
    want_tokens, want_logits = reference(cfg)
    ranks = run_tp_generate(cfg, PROMPTS, PARAMS, world_size=2, **ENGINE)
    for rank, got in enumerate(ranks):
        assert got["tokens"] == want_tokens, f"rank {rank}"
        for g, w in zip(got["logits"], want_logits):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_local_config_sizes_the_cache_per_rank():
    model = build_model(CFG, synthetic_state_dict(CFG, 0, torch.float32), torch.float32)
    full_qkv = model.layers[0].self_attn.qkv_proj.weight.clone()
    shard_model_(model, rank=1, world_size=2)
    cfg, hd = model.cfg, CFG.head_dim
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_size, cfg.head_dim) == (2, 1, 64, CFG.head_dim)
    # Rank 1's rows: q heads 2-3, k head 1, v head 1 of the fused weight.
    q, k, v = full_qkv.split([4 * hd, 2 * hd, 2 * hd])
    want = torch.cat([q[2 * hd:], k[hd:], v[hd:]])
    assert torch.equal(model.layers[0].self_attn.qkv_proj.weight, want)
    assert model.layers[0].self_attn.o_proj.weight.shape == (CFG.hidden_size, 2 * hd)
    assert Engine(model, (), max_batch=1, max_seq_len=32, num_blocks=4).cache.k.shape[-2:] == (1, hd)


@pytest.mark.parametrize("heads, kv, ffn, world, bad", [
    (4, 2, 128, 4, "n_kv_heads 2"),
    (6, 3, 128, 2, "n_kv_heads 3"),
    (6, 2, 128, 4, "n_heads 6, n_kv_heads 2"),
    (4, 2, 129, 2, "ffn_size 129"),
])
def test_uneven_split_is_a_clear_error(heads, kv, ffn, world, bad):
    cfg = LlamaConfig(n_layers=1, hidden_size=48, n_heads=heads, n_kv_heads=kv, ffn_size=ffn, vocab_size=32,
                      head_dim=8)
    model = build_model(cfg, synthetic_state_dict(cfg, 0, torch.float32), torch.float32)
    with pytest.raises(ValueError, match=f"divisible by {world}; not divisible: {bad}$"):
        shard_model_(model, 0, world)


def test_moe_is_refused():
    with torch.device("meta"):
        model = MixtralModel(MixtralConfig(n_layers=1, hidden_size=32, n_heads=4, n_kv_heads=2, ffn_size=32,
                                           vocab_size=32, n_experts=2, experts_per_token=1))
    with pytest.raises(TypeError, match="MixtralModel"):
        shard_model_(model, 0, 2)
