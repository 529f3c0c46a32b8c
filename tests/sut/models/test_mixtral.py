"""wallperf.sut.models.mixtral against HF transformers' MixtralForCausalLM, and its MoE block
against a per-token loop written from HF's routing rule (softmax over all experts,
top k, renormalize)."""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from wallperf.sut.engine.kv_cache import SlotKVCache
from wallperf.sut.models.llama import rope_inv_freq
from wallperf.sut.models.mixtral import MixtralConfig, MixtralModel, SparseMoeBlock, synthetic_state_dict
from wallperf.sut.quant.fp8 import is_excluded
from wallperf.sut.loading.weights import load_hf_checkpoint

# fp32 over 2 tiny layers, as the Llama comparison: summation order only.
TINY_ATOL = 1e-5


def _tiny_hf_model(seed: int = 0) -> transformers.MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = transformers.MixtralForCausalLM(cfg).eval()
    # HF's init (std 0.02, unit norms) gives near-zero logits and near-uniform routing.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def _build(cfg: MixtralConfig, sd: dict, dtype=torch.float32) -> MixtralModel:
    """wallperf.sut.loading.weights.build_model's recipe: on meta, assign the weights, real RoPE table."""
    with torch.device("meta"):
        model = MixtralModel(cfg)
    model.load_hf_state_dict(dict(sd), dtype)
    model.inv_freq = rope_inv_freq(cfg)
    return model.eval()


def _forward(model, cache: SlotKVCache, slots, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
    B, T = ids.shape
    positions = torch.arange(start, start + T).expand(B, -1)
    return model(ids, positions, cache.bind(slots, positions))


def test_logits_match_hf_prefill_and_decode(tmp_path):
    hf = _tiny_hf_model()
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    # The published names, which our loader maps, not transformers 5's in-memory ones.
    _, sd, _ = load_hf_checkpoint(tmp_path)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in sd
    cfg = MixtralConfig.from_hf_config(hf_cfg)
    assert (cfg.n_experts, cfg.experts_per_token, cfg.ffn_size, cfg.rope_theta) == (4, 2, 48, 1e6)
    model = _build(cfg, sd)

    T = 24
    ids = torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits.float()  # (2, T, V)
    cache = SlotKVCache(cfg.n_layers, 3, cfg.n_kv_heads, 32, cfg.head_dim, torch.float32)
    torch.testing.assert_close(_forward(model, cache, [0, 2], ids), want, atol=TINY_ATOL, rtol=0)
    # Prefill 16 tokens, then one token per step through the cache.
    torch.testing.assert_close(_forward(model, cache, [2, 0], ids[:, :16]), want[:, :16], atol=TINY_ATOL, rtol=0)
    for t in range(16, T):
        step = _forward(model, cache, [2, 0], ids[:, t:t + 1], start=t)[:, 0]
        torch.testing.assert_close(step, want[:, t], atol=TINY_ATOL, rtol=0, msg=f"decode at {t}")


def _moe_loop_reference(x, router_w, w1, w3, w2, k):
    """Per token: HF's routing, then each picked expert's SwiGLU in HF's layout."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = F.softmax(x[t] @ router_w.T, dim=-1)
        top, ids = probs.topk(k)
        top = top / top.sum()
        for w, e in zip(top, ids.tolist()):
            out[t] += w * (w2[e] @ (F.silu(w1[e] @ x[t]) * (w3[e] @ x[t])))
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_moe_block_matches_per_token_loop(k):
    cfg = MixtralConfig(n_layers=1, hidden_size=32, n_heads=4, n_kv_heads=2, ffn_size=24, vocab_size=16,
                        n_experts=5, experts_per_token=k)
    g = torch.Generator().manual_seed(2)
    router_w = torch.randn(5, 32, generator=g)
    w1, w3 = torch.randn(5, 24, 32, generator=g) / 6, torch.randn(5, 24, 32, generator=g) / 6
    w2 = torch.randn(5, 32, 24, generator=g) / 5
    block = SparseMoeBlock(cfg)
    block.load_state_dict({"router.weight": router_w, "w13": torch.cat([w1, w3], dim=1), "w2": w2})
    x = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        got = block(x)
    want = _moe_loop_reference(x.view(14, 32), router_w, w1, w3, w2, k).view(2, 7, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_router_is_left_out_of_fp8_and_from_shape_keeps_the_experts():
    cfg = MixtralConfig(n_layers=1, hidden_size=32, n_heads=4, n_kv_heads=2, ffn_size=24, vocab_size=16)
    model = _build(cfg, synthetic_state_dict(cfg, dtype=torch.float32))
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert {n for n in linears if is_excluded(n)} == {"layers.0.block_sparse_moe.router", "lm_head"}

    from wallperf.sut.models.config import LlamaConfig
    from wallperf.sut.models.families import config_for_shape

    shape = LlamaConfig(n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=8, ffn_size=14336,
                        vocab_size=32000, rope_theta=1e6, max_position=32768, n_experts=8, experts_per_token=2)
    big = config_for_shape("mixtral", shape)
    assert type(big) is MixtralConfig
    assert (big.head_dim, big.n_experts, big.experts_per_token, big.max_position) == (128, 8, 2, 32768)
