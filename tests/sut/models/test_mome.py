"""wallperf.sut.models.mome and sut.expert_cache against independent references: product-key
retrieval against brute-force top-k over all N full keys, the memory layer against a
loop over experts whose rows are read with the safetensors library, the whole model
against HF's Llama with that reference added beside each memory layer's MLP, and the
LRU cache's counters and eviction order against hand-worked sequences."""
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

from wallperf.sut.engine.engine import Engine, SamplingParams
from wallperf.sut.models.expert_cache import ExpertBank, ExpertCache, write_synthetic_bank
from wallperf.sut.engine.kv_cache import SlotKVCache
from wallperf.sut.models.llama import LlamaConfig
from wallperf.sut.models.mome import (MemoryConfig, MemoryLayer, bank_tensor_name, build_mome_model, product_key_topk,
                             synthetic_bank, synthetic_memory_state_dict)

HIDDEN = 64


def _full_keys(sub_keys: torch.Tensor) -> torch.Tensor:
    """(N, query_dim): expert i's key [sub_keys[0][i // n_sub] | sub_keys[1][i % n_sub]]."""
    n_sub = sub_keys.shape[1]
    return torch.cat([sub_keys[0].repeat_interleave(n_sub, dim=0), sub_keys[1].repeat(n_sub, 1)], dim=1)


@pytest.mark.parametrize("k", [1, 5, 16])
def test_product_keys_equal_brute_force_topk(k):
    g = torch.Generator().manual_seed(0)
    sub_keys = torch.randn(2, 16, 6, generator=g)  # N = 256
    query = torch.randn(50, 12, generator=g)
    scores, ids = product_key_topk(query, sub_keys, k)
    want_scores, want_ids = (query @ _full_keys(sub_keys).T).topk(k, dim=-1)  # (50, N) -> (50, k)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=0)


def _reference_memory(x, query_w, sub_keys, rows, k):
    """x (M, hidden): brute-force retrieval, then a loop over the picked experts."""
    hidden = x.shape[1]
    out = torch.zeros_like(x)
    keys = _full_keys(sub_keys.float())
    for t in range(x.shape[0]):
        top, ids = (keys @ (query_w.float() @ x[t])).topk(k)
        for w, e in zip(top.softmax(-1), ids.tolist()):
            down, up = rows[e].split(hidden)
            out[t] += w * F.silu(down @ x[t]) * up
    return out


def _bank_rows(bank: ExpertBank, name: str) -> torch.Tensor:
    """The bank tensor as the safetensors library reads it, independently of our mapping."""
    with safe_open(str(bank.path), "pt") as f:
        return f.get_tensor(name).float()


@pytest.mark.parametrize("bank_dtype", ["float32", "bfloat16"])
def test_memory_layer_matches_loop_over_experts(tmp_path, bank_dtype):
    lcfg = LlamaConfig(n_layers=1, hidden_size=HIDDEN, n_heads=4, n_kv_heads=2, ffn_size=32, vocab_size=8)
    # Cache of 8 rows, 4 per token: 2 tokens per fetch, so 9 tokens also exercise chunking and eviction.
    mem = MemoryConfig(n_experts=144, layers=(0,), topk=4, query_dim=10, cache_experts=8, bank_dtype=bank_dtype)
    bank = synthetic_bank(tmp_path, lcfg, mem)
    sd = synthetic_memory_state_dict(lcfg, mem, seed=3, dtype=torch.float32)
    layer = MemoryLayer(HIDDEN, mem, ExpertCache(bank[bank_tensor_name(0)], mem.cache_experts))
    layer.load_state_dict({"router_query.weight": sd["model.layers.0.memory.router_query.weight"],
                           "sub_keys": sd["model.layers.0.memory.sub_keys"]})
    h = torch.randn(3, 3, HIDDEN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = layer(h)
    want = _reference_memory(h.view(9, HIDDEN), layer.router_query.weight, layer.sub_keys,
                             _bank_rows(bank, bank_tensor_name(0)), mem.topk)
    torch.testing.assert_close(got, want.view_as(h), atol=1e-5, rtol=1e-5)
    stats = layer.cache.stats
    assert (stats.steps, stats.selections) == (5, 36)
    assert stats.misses > stats.evictions > 0


def test_bank_is_plain_safetensors_written_once(tmp_path):
    lcfg = LlamaConfig(n_layers=3, hidden_size=8, n_heads=2, n_kv_heads=1, ffn_size=8, vocab_size=8)
    mem = MemoryConfig(n_experts=36, layers=(0, 2), topk=2, query_dim=4, cache_experts=4)
    bank = synthetic_bank(tmp_path, lcfg, mem)
    assert [p.name for p in (tmp_path / "mome").iterdir()] == [bank.path.name]  # no temporary left
    for layer in (0, 2):
        name = bank_tensor_name(layer)
        assert bank[name].shape == (36, 16) and bank[name].dtype == torch.bfloat16
        assert torch.equal(bank[name].float(), _bank_rows(bank, name))
    assert not torch.equal(bank["layers.0.experts"], bank["layers.2.experts"])
    mtime = os.stat(bank.path).st_mtime_ns
    again = synthetic_bank(tmp_path, lcfg, mem)
    assert os.stat(again.path).st_mtime_ns == mtime
    assert torch.equal(again["layers.2.experts"], bank["layers.2.experts"])


@pytest.fixture
def small_cache(tmp_path):
    write_synthetic_bank(tmp_path / "bank.safetensors", {"e": (20, 6)}, torch.float32, seed=0, scale=1.0)
    bank = ExpertBank(tmp_path / "bank.safetensors")
    return ExpertCache(bank["e"], capacity=4), _bank_rows(bank, "e")


def _resident(cache: ExpertCache) -> set:
    return {e for e in cache.expert_of.tolist() if e >= 0}


def test_cache_counts_hits_misses_and_bytes(small_cache):
    cache, rows = small_cache
    bpe = 6 * 4
    slots = cache.fetch(torch.tensor([[0, 1], [1, 0]]))
    assert slots.shape == (2, 2) and slots[0, 0] == slots[1, 1]
    s = cache.stats
    assert (s.steps, s.selections, s.lookups, s.hits, s.misses, s.bytes_loaded) == (1, 4, 2, 0, 2, 2 * bpe)
    slots = cache.fetch(torch.tensor([1, 2, 3, 3]))
    s = cache.stats
    assert (s.selections, s.lookups, s.hits, s.misses, s.evictions, s.bytes_loaded) == (8, 5, 1, 4, 0, 4 * bpe)
    # Only selected experts were loaded, and each slot holds its expert's row.
    assert _resident(cache) == {0, 1, 2, 3}
    torch.testing.assert_close(cache.storage[slots], rows[[1, 2, 3, 3]], atol=0, rtol=0)
    with pytest.raises(ValueError, match="distinct experts"):
        cache.fetch(torch.tensor([4, 5, 6, 7, 8]))


def test_cache_evicts_least_recently_used(small_cache):
    cache, rows = small_cache
    for e in (0, 1, 2, 3, 0):  # 0 is used again: 1 is now the oldest
        cache.fetch(torch.tensor([e]))
    for new, evicted in ((4, 1), (5, 2), (1, 3), (6, 0)):
        cache.fetch(torch.tensor([new]))
        assert evicted not in _resident(cache) and new in _resident(cache), (new, evicted)
    assert _resident(cache) == {4, 5, 1, 6}
    s = cache.stats
    assert (s.hits, s.misses, s.evictions) == (1, 8, 4)
    slots = cache.fetch(torch.tensor([6, 4, 1, 5]))
    torch.testing.assert_close(cache.storage[slots], rows[[6, 4, 1, 5]], atol=0, rtol=0)
    assert cache.stats.hits == 5


def _tiny_hf_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def test_mome_model_matches_hf_llama_plus_reference_memory(tmp_path):
    hf = _tiny_hf_llama()
    cfg = LlamaConfig.from_hf_config(hf.config.to_dict())
    mem = MemoryConfig(n_experts=256, layers=(0, 1), topk=4, query_dim=16, cache_experts=24, bank_dtype="float32")
    bank = synthetic_bank(tmp_path, cfg, mem)
    memory_sd = synthetic_memory_state_dict(cfg, mem, seed=5, dtype=torch.float32)
    model = build_mome_model(cfg, mem, {**hf.state_dict(), **memory_sd}, bank, torch.float32)
    for i in mem.layers:
        p = f"model.layers.{i}.memory."
        args = (memory_sd[p + "router_query.weight"], memory_sd[p + "sub_keys"],
                _bank_rows(bank, bank_tensor_name(i)), mem.topk)
        hf.model.layers[i].mlp.register_forward_hook(
            lambda mod, inp, out, args=args: out + _reference_memory(inp[0].reshape(-1, HIDDEN), *args).view_as(out))

    T = 20
    ids = torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = hf(ids).logits.float()
    cache = SlotKVCache(cfg.n_layers, 2, cfg.n_kv_heads, 32, cfg.head_dim, torch.float32)

    def forward(part, start):
        positions = torch.arange(start, start + part.shape[1]).expand(2, -1)
        return model(part, positions, cache.bind([0, 1], positions))

    torch.testing.assert_close(forward(ids[:, :12], 0), want[:, :12], atol=1e-5, rtol=0)
    for t in range(12, T):
        torch.testing.assert_close(forward(ids[:, t:t + 1], t)[:, 0], want[:, t], atol=1e-5, rtol=0)

    # The engine runs it unchanged (paged cache, logits_at): greedy tokens equal HF's with the memory.
    prompt = ids[0, :8].tolist()
    got = Engine(model, {0}, max_batch=1, max_seq_len=16).generate(
        prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[8:]

    stats = model.expert_stats()
    assert stats["bytes_loaded"] == stats["misses"] * stats["bytes_per_expert"] == stats["misses"] * 2 * HIDDEN * 4
    assert stats["hits"] + stats["misses"] == stats["lookups"] <= stats["selections"]
    assert set(stats["layers"]) == {"0", "1"}

    # An fp8 KV cache's key calibration runs the model once more, outside the counters.
    from wallperf.sut.quant.kv_calibration import key_centres

    centres = key_centres(model)
    assert centres.shape == (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim) and bool(centres.abs().sum() > 0)
    assert model.expert_stats() == stats


@pytest.mark.slow
def test_million_expert_bank_loads_only_missed_rows(tmp_path):
    lcfg = LlamaConfig(n_layers=1, hidden_size=16, n_heads=2, n_kv_heads=1, ffn_size=16, vocab_size=8)
    mem = MemoryConfig(n_experts=1_000_000, layers=(0,), topk=8, query_dim=16, cache_experts=256)
    bank = synthetic_bank(tmp_path, lcfg, mem)
    rows = bank[bank_tensor_name(0)]
    assert rows.shape == (1_000_000, 32)
    sd = synthetic_memory_state_dict(lcfg, mem, dtype=torch.float32)
    layer = MemoryLayer(16, mem, ExpertCache(rows, mem.cache_experts))
    layer.load_state_dict({"router_query.weight": sd["model.layers.0.memory.router_query.weight"],
                           "sub_keys": sd["model.layers.0.memory.sub_keys"]})
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(8, 16, generator=g)
    with torch.no_grad():
        for step in range(24):  # 8 distinct tokens, each seen 3 times: the repeats hit
            layer(tokens[step % 8].view(1, 1, 16))
    s = layer.cache.stats
    assert s.selections == 24 * 8 and s.lookups == s.selections
    # 64 picks per pass over the 8 tokens fit in the 256 rows: the second and third passes hit.
    assert s.evictions == 0 and s.hits >= 2 * 64
    assert 0 < s.misses == s.lookups - s.hits <= 64
    assert s.bytes_loaded == s.misses * 32 * 2
    assert s.bytes_loaded < bank.path.stat().st_size / 1000
