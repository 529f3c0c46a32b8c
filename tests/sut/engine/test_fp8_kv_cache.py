"""The paged KV cache with fp8 storage (e4m3fn, and MI300X's e4m3fnuz), against
an independent reference written here: each key/value vector scaled by its
largest magnitude over the format's maximum (OCP fp8 spec: 448 for e4m3fn, 240
for e4m3fnuz), cast with torch, and attention computed in float64 on the
dequantized vectors."""
import pytest
import torch
import torch.nn.functional as F

from wallperf.sut.engine.engine import Engine, SamplingParams
from wallperf.sut.quant.kv_calibration import key_centres
from wallperf.sut.models.llama import LlamaConfig, synthetic_state_dict
from wallperf.sut.engine.paged_cache import PagedKVCache, kv_bytes_per_element, kv_bytes_per_token
from wallperf.sut.loading.weights import build_model

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
        if kv is not None:
            assert torch.equal(engine.cache.k_centre, key_centres(model))
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


@pytest.mark.parametrize("fp8", list(FORMATS))
def test_keys_are_stored_less_their_centre_and_attention_does_not_see_it(fp8):
    """Stored bytes: the reference quantization of k - centre. Attention over the
    centred keys equals attention over the true keys (centred + centre), because
    each query's scores all move by q . centre, which softmax ignores."""
    g = torch.Generator().manual_seed(1)
    B, T, H, Hkv, D = 2, 9, 4, 2, 16
    centre = torch.randn(1, Hkv, D, generator=g)
    centre[0, 0, 3] = 300.0  # a large, constant channel, as Qwen2's layer 0 has
    cache = PagedKVCache(1, 8, 4, Hkv, D, torch.float32, kv_dtype=fp8, k_centre=centre)
    tables = [[2, 4, 6], [1, 3, 5]]
    positions = torch.arange(T).expand(B, -1)
    cache.bind(tables, positions, torch.ones(B, T, dtype=torch.bool))
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    k = k + centre[0][None, :, None, :]
    mask = cache.attention_mask(positions)
    got = cache.layer(0).attend(q, k, v, mask)

    qk, sk = reference_fp8(k.transpose(1, 2) - centre[0], fp8)  # (B, T, Hkv, D)
    qv, sv = reference_fp8(v.transpose(1, 2), fp8)
    for b, table in enumerate(tables):
        for t in range(T):
            assert torch.equal(cache.k[0, table[t // 4], t % 4].view(torch.uint8), qk[b, t].view(torch.uint8))
    k_true = (qk.double() * sk.double()[..., None] + centre[0].double()).transpose(1, 2).repeat_interleave(2, 1)
    v_deq = (qv.double() * sv.double()[..., None]).transpose(1, 2).repeat_interleave(2, 1)
    want = F.scaled_dot_product_attention(q.double(), k_true, v_deq, attn_mask=mask)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_a_centre_of_the_wrong_shape_or_for_a_plain_cache_is_refused():
    with pytest.raises(ValueError, match=r"k_centre must be .*\(1, 2, 16\)"):
        PagedKVCache(1, 4, 4, 2, 16, torch.float32, kv_dtype=torch.float8_e4m3fn, k_centre=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="for an fp8 KV cache"):
        PagedKVCache(1, 4, 4, 2, 16, torch.float32, k_centre=torch.zeros(1, 2, 16))


def offset_key_model(bias: float = 100.0):
    """CFG with a large key bias on KV head 0's slowest RoPE pair in layer 0: its keys
    carry a nearly constant offset there, as Qwen2's first layer does."""
    sd = synthetic_state_dict(CFG, 1, torch.float32)
    d, hq = CFG.head_dim, CFG.n_heads * CFG.head_dim
    sd["model.layers.0.self_attn.k_proj.bias"][d // 2 - 1] = bias
    model = build_model(CFG, sd, torch.float32)
    return model, hq + d // 2 - 1


def test_key_centres_find_a_constant_key_offset():
    model, _ = offset_key_model(100.0)
    centres = key_centres(model)
    d = CFG.head_dim
    assert centres.shape == (CFG.n_layers, CFG.n_kv_heads, d) and centres.dtype == torch.float32
    # The slowest pair turns by ~0.16 rad over the 256 calibration positions: the mean keeps ~99.9%.
    assert 95 < float(centres[0, 0, d // 2 - 1]) < 105
    others = centres[0].clone()
    others[0, d // 2 - 1] = 0
    assert others.abs().max() < 10
    assert key_centres(model) is centres  # once per model


OFFSETS = torch.zeros(16)
OFFSETS[3], OFFSETS[5], OFFSETS[7] = 300.0, 200.0, -150.0


def attention_error(centre) -> float:
    """Relative RMS error of fp8-cache attention against float64 attention over the
    true keys, where KV head 0's channels 3, 5 and 7 carry offsets of 300, 200 and
    -150 (+- 1 per position) and the queries weigh them as much as any other."""
    g = torch.Generator().manual_seed(3)
    B, T, H, Hkv, D = 1, 64, 4, 2, 16
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    q = q * 2
    k[:, 0] += OFFSETS
    cache = PagedKVCache(1, 16, 4, Hkv, D, torch.float32, kv_dtype=torch.float8_e4m3fn, k_centre=centre)
    positions = torch.arange(T)[None]
    cache.bind([list(range(16))], positions, torch.ones(B, T, dtype=torch.bool))
    mask = cache.attention_mask(positions)
    got = cache.layer(0).attend(q, k, v, mask).double()
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
    return float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())


def test_centred_keys_keep_an_offset_channel_from_costing_the_others_their_precision():
    """One scale per vector: the largest offset sets it, e4m3 rounds the other offset
    channels in steps of ~10 (3 mantissa bits), and their rounding noise swamps every
    score. Centred (the offsets taken out, as key_centres finds them), the error is
    the format's own."""
    centre = torch.zeros(1, 2, 16)
    centre[0, 0] = OFFSETS
    centred, plain = attention_error(centre), attention_error(None)
    assert centred < 0.1 < plain
    assert centred < plain / 5
