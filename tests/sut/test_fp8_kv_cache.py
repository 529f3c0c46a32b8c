"""The paged KV cache with fp8 storage (e4m3fn, and MI300X's e4m3fnuz), against
an independent reference written here: each key/value vector scaled by its
largest magnitude over the format's maximum (OCP fp8 spec: 448 for e4m3fn, 240
for e4m3fnuz), cast with torch, and attention computed in float64 on the
dequantized vectors."""
import pytest
import torch
import torch.nn.functional as F

from sut.engine import Engine, SamplingParams
from sut.models.llama import LlamaConfig, synthetic_state_dict
from sut.paged_cache import PagedKVCache, kv_bytes_per_element, kv_bytes_per_token
from sut.weights import build_model

FORMATS = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}
CFG = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=96, vocab_size=128,
                  max_position=256, attention_bias=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_fp8(x: torch.Tensor, fp8: torch.dtype) -> tuple:
    amax = x.float().abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FORMATS[fp8], torch.ones_like(amax))
    q = (x.float() / scale).clamp(-FORMATS[fp8], FORMATS[fp8]).to(fp8)
    return q, scale.squeeze(-1)


@pytest.mark.parametrize("fp8", list(FORMATS))
def test_layer_stores_fp8_with_per_vector_scales_and_attends_over_them(fp8):
    g = torch.Generator().manual_seed(0)
    B, T, H, Hkv, D = 2, 11, 4, 2, 16
    cache = PagedKVCache(1, 8, 4, Hkv, D, torch.float32, kv_dtype=fp8)
    tables = [[5, 1, 6], [0, 7, 3]]
    positions = torch.arange(T).expand(B, -1)
    cache.bind(tables, positions, torch.ones(B, T, dtype=torch.bool))
    q, k, v = (torch.randn(B, h, T, D, generator=g) * 3 for h in (H, Hkv, Hkv))
    k[0, 1, 4] = 0  # an all-zero vector keeps scale 1
    mask = cache.attention_mask(positions)
    got = cache.layer(0).attend(q, k, v, mask)

    qk, sk = reference_fp8(k.transpose(1, 2), fp8)  # (B, T, Hkv, D)
    qv, sv = reference_fp8(v.transpose(1, 2), fp8)
    for b, table in enumerate(tables):
        for t in range(T):
            block, off = table[t // 4], t % 4
            assert torch.equal(cache.k[0, block, off].view(torch.uint8), qk[b, t].view(torch.uint8))
            assert torch.equal(cache.v_scale[0, block, off], sv[b, t])
            assert torch.equal(cache.k_scale[0, block, off], sk[b, t])
    assert cache.k_scale[0, tables[0][1], 0, 1] == 1.0
    k_deq = (qk.double() * sk.double()[..., None]).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    v_deq = (qv.double() * sv.double()[..., None]).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    want = F.scaled_dot_product_attention(q.double(), k_deq, v_deq, attn_mask=mask)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_bytes_per_element_count_the_scales():
    assert kv_bytes_per_element(128, torch.bfloat16) == 2
    assert kv_bytes_per_element(128, torch.float8_e4m3fn) == 1 + 4 / 128
    assert kv_bytes_per_token(28, 2, 128, torch.float8_e4m3fn) == 2 * 28 * 2 * (128 + 4)


def test_engine_with_an_fp8_cache_stays_near_the_bf16_cache():
    """Greedy tokens of a tiny model with an fp8 cache against the same model with a
    float32 cache: per-vector e4m3 (3 mantissa bits) moves logits by a few percent."""
    model = build_model(CFG, synthetic_state_dict(CFG, 1, torch.float32), torch.float32)
    prompt = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(max_new_tokens=1)
    logits = {}
    for kv in (None, torch.float8_e4m3fn):
        engine = Engine(model, [0], max_batch=1, max_seq_len=64, block_size=8, num_blocks=8, kv_dtype=kv)
        assert engine.cache.fp8 == (kv is not None)
        engine.add_request(0, prompt, params)
        seq = engine.waiting[0]
        engine.step()
        cache = engine.cache
        positions = torch.tensor([[len(prompt)]])
        cache.bind([seq.block_table], positions, torch.ones(1, 1, dtype=torch.bool))
        logits[kv] = model(torch.tensor([[prompt[-1]]]), positions, cache)[0, -1]
    exact, fp8 = logits[None], logits[torch.float8_e4m3fn]
    error = (fp8 - exact).abs().max() / exact.abs().max()
    assert 0 < error < 0.1
