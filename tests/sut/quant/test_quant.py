"""fp8 quantization against float64 references: the e4m3 grids are rebuilt here
from the formats' definitions (3 mantissa bits, smallest normal exponent, max),
not taken from torch's casts."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wallperf.harness.config import HardwareConfig, build
from wallperf.sut.engine.kv_cache import SlotKVCache
from wallperf.sut.models.llama import LlamaConfig, LlamaModel, rope_inv_freq
from wallperf.sut.quant.fp8 import (FP8Linear, choose_format, dequantize_kv, is_excluded, quantize_kv, quantize_model_,
                       quantize_weight)
from wallperf.sut.quant.store import load_quantized, save_quantized
from wallperf.sut.loading.weights import build_model
from wallperf.sut.models.llama import synthetic_state_dict

# (max, exponent of the smallest normal) from the OCP fp8 spec and AMD's FNUZ variant (bias 8).
FORMATS = {torch.float8_e4m3fn: (448.0, -6), torch.float8_e4m3fnuz: (240.0, -7)}
FP8 = list(FORMATS)


def fp8_round(v: np.ndarray, fp8_dtype) -> np.ndarray:
    """Round float64 values (|v| <= max) to the nearest e4m3 value, ties to even."""
    fmax, emin = FORMATS[fp8_dtype]
    exp = np.floor(np.log2(np.maximum(np.abs(v), 2.0 ** emin)))
    ulp = 2.0 ** (exp - 3)  # 3 mantissa bits; subnormals share the smallest normal's spacing
    return np.clip(np.round(v / ulp) * ulp, -fmax, fmax)  # np.round: half to even


def half_ulp_bound(w: np.ndarray, scale: np.ndarray, fp8_dtype) -> np.ndarray:
    """Largest rounding error of w on the grid scaled by `scale`: half a step."""
    _, emin = FORMATS[fp8_dtype]
    return np.maximum(np.abs(w) * 2.0 ** -4, scale * 2.0 ** (emin - 4))


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_values_land_on_the_float64_grid(fp8_dtype):
    # Each row's largest value is max * 2^-k: the scale is 2^-k exactly, so w / scale is
    # exact and every quantized value must equal the float64 grid rounding bit for bit.
    fmax, _ = FORMATS[fp8_dtype]
    g = torch.Generator().manual_seed(1)
    k = torch.randint(0, 12, (64,), generator=g).double()
    w = torch.rand(64, 96, generator=g, dtype=torch.float64) * 2 - 1
    w[:, 7] = fmax
    w = (w * 2.0 ** -k[:, None]).float()
    q, scale = quantize_weight(w, fp8_dtype)
    assert q.dtype == fp8_dtype and scale.dtype == torch.float32 and scale.shape == (64,)
    assert torch.equal(scale.double(), 2.0 ** -k)
    expected = fp8_round(w.double().numpy() / scale.double().numpy()[:, None], fp8_dtype)
    np.testing.assert_array_equal(q.double().numpy(), expected)


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("per_channel", [True, False])
def test_error_within_half_a_step(fp8_dtype, per_channel):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 200, generator=g) * torch.logspace(-3, 1, 48)[:, None]
    w[5, 11] = 40.0  # an outlier: per-tensor scaling pushes small rows into subnormals
    w = w.bfloat16()
    q, scale = quantize_weight(w, fp8_dtype, per_channel)
    w64 = w.double().numpy()
    amax = np.abs(w64).max(axis=1 if per_channel else None)
    fmax, _ = FORMATS[fp8_dtype]
    np.testing.assert_allclose(scale.double().numpy(), amax / fmax, rtol=2 ** -23)
    s = scale.double().numpy()
    s = s[:, None] if per_channel else s
    err = np.abs(q.double().numpy() * s - w64)
    # The fp32 division before rounding may move a value by a few fp32 ulps.
    assert (err <= half_ulp_bound(w64, s, fp8_dtype) * (1 + 1e-6)).all()
    assert np.abs(q.double().numpy()).max() == fmax


def test_formats_differ_in_max_and_scale():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    (q_fn, s_fn), (q_uz, s_uz) = (quantize_weight(w, d) for d in FP8)
    assert q_fn.float().abs().max() == 448 and q_uz.float().abs().max() == 240
    torch.testing.assert_close(s_uz / s_fn, torch.full_like(s_fn, 448 / 240))
    assert not torch.equal(q_fn.float(), q_uz.float())


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_zero_rows_tiny_negatives_and_bad_values(fp8_dtype):
    w = torch.randn(4, 8)
    w[1] = 0.0
    w[2] = -1e-30  # rounds to zero: e4m3fnuz has no -0 (its 0x80 is nan)
    w[2, 0] = 1.0
    q, scale = quantize_weight(w, fp8_dtype)
    assert scale[1] == 1.0 and (q[1].float() == 0).all()
    assert not torch.isnan(q.float()).any()
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_weight(torch.tensor([[1.0, float("inf")]]), fp8_dtype)
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.ones(3), fp8_dtype)


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_linear_is_f_linear_on_the_dequantized_weight(fp8_dtype, dtype, per_channel):
    g = torch.Generator().manual_seed(4)
    linear = nn.Linear(40, 24, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 40, generator=g))
    module = FP8Linear.from_linear(linear, fp8_dtype, per_channel)
    x = torch.randn(3, 5, 40, generator=g).to(dtype)
    s = module.weight_scale.double()
    # The product in float64 is exact (4 + 24 significant bits); rounded to fp32 it is
    # the fp32 product the spec names, then rounded once more to the math dtype.
    w = (module.weight.double() * (s[:, None] if per_channel else s)).float().to(dtype)
    assert torch.equal(module(x), F.linear(x, w))
    assert module(x).dtype == dtype


CFG = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=96, vocab_size=128)


def tiny_model(tie: bool, seed: int = 0):
    cfg = LlamaConfig(**{**CFG.__dict__, "tie_embeddings": tie, "head_dim": None})
    return build_model(cfg, synthetic_state_dict(cfg, seed=seed), torch.bfloat16)


def logits(model, ids):
    cfg = model.cfg
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    cache = SlotKVCache(cfg.n_layers, ids.shape[0], cfg.n_kv_heads, ids.shape[1], cfg.head_dim, torch.bfloat16)
    cache.bind(list(range(ids.shape[0])), positions)
    return model(ids, positions, cache)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_model_replaces_projections_only(tie, per_channel):
    model = tiny_model(tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = quantize_model_(model, torch.float8_e4m3fn, per_channel)
    projections = {f"layers.{i}.{p}" for i in range(CFG.n_layers)
                   for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert set(report.quantized_modules) == projections
    assert {n for n, m in model.named_modules() if isinstance(m, FP8Linear)} == projections
    assert tie == (model.lm_head is None) and (tie or type(model.lm_head) is nn.Linear)
    after = model.state_dict()
    for name, tensor in before.items():
        if name.rsplit(".", 1)[0] not in projections:
            assert torch.equal(after[name], tensor), name
    # Bytes from the shapes: out x in per projection, 2 bytes in bf16, 1 in fp8, plus fp32 scales.
    h, q, kv, f = CFG.hidden_size, CFG.n_heads * 16, CFG.n_kv_heads * 16, CFG.ffn_size
    shapes = [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)] * CFG.n_layers
    params = sum(o * i for o, i in shapes)
    scales = sum(o for o, _ in shapes) if per_channel else len(shapes)
    assert report.quantized_params == params
    assert (report.quantized_bytes_before, report.quantized_bytes_after) == (2 * params, params + 4 * scales)
    rest = (2 - tie) * CFG.vocab_size * h * 2 + (2 * CFG.n_layers + 1) * h * 2
    assert report.model_bytes_before == 2 * params + rest
    assert report.model_bytes_after == params + 4 * scales + rest
    assert report.source_dtype == "bfloat16" and report.fp8_format == "fp8_e4m3fn"
    assert json.loads(json.dumps(report.to_dict()))["quantized_modules"] == list(report.quantized_modules)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model_(model)


@pytest.mark.parametrize("bias", [False, True])
def test_quantized_model_is_the_model_on_dequantized_weights(bias):
    # An independent path: put the dequantized weights into a plain bf16 model under
    # HF names; both must compute the same logits bit for bit. With Qwen2's Q/K/V
    # biases, those stay bf16 and are added after the fp8 product.
    cfg = LlamaConfig(**{**CFG.__dict__, "tie_embeddings": not bias, "head_dim": None, "attention_bias": bias})
    sd = synthetic_state_dict(cfg, seed=5)
    model = build_model(cfg, sd, torch.bfloat16)
    quantize_model_(model)
    deq = dict(sd)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        for fused, parts in (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                             ("self_attn.o_proj", ("self_attn.o_proj",)),
                             ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
                             ("mlp.down_proj", ("mlp.down_proj",))):
            m = model.get_submodule(f"layers.{i}.{fused}")
            w = (m.weight.double() * m.weight_scale.double()[:, None]).float().bfloat16()
            rows = [sd[p + part + ".weight"].shape[0] for part in parts]
            for part, chunk in zip(parts, w.split(rows)):
                deq[p + part + ".weight"] = chunk
    reference = build_model(cfg, deq, torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    assert torch.equal(logits(model, ids), logits(reference, ids))


def test_exclusion_rule_keeps_heads_and_routers():
    assert is_excluded("lm_head") and is_excluded("layers.0.block_sparse_moe.gate")
    assert is_excluded("layers.3.mlp.router") and is_excluded("layers.3.mlp.router.proj")
    assert not is_excluded("layers.0.mlp.gate_up_proj") and not is_excluded("layers.0.mlp.down_proj")
    moe = nn.ModuleDict({"gate": nn.Linear(8, 4, bias=False), "router": nn.Linear(8, 4, bias=False),
                         "w1": nn.Linear(8, 16, bias=False), "lm_head": nn.Linear(8, 32, bias=False)})
    assert quantize_model_(moe).quantized_modules == ("w1",)


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("per_channel", [True, False])
def test_save_load_round_trip(tmp_path, fp8_dtype, per_channel):
    model = tiny_model(tie=True, seed=7)
    report = quantize_model_(model, fp8_dtype, per_channel)
    manifest = save_quantized(model, tmp_path)
    assert json.loads((tmp_path / "quant_manifest.json").read_text()) == manifest == {
        "format": report.fp8_format, "per_channel": per_channel,
        "quantized_modules": sorted(report.quantized_modules), "source_dtype": "bfloat16",
        "wallperf_quant_version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "quant_manifest.json"]
    with torch.device("meta"):
        skeleton = LlamaModel(model.cfg)
    load_quantized(skeleton, tmp_path)
    skeleton.inv_freq = rope_inv_freq(model.cfg)
    saved, loaded = model.state_dict(), skeleton.state_dict()
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert saved[name].dtype == loaded[name].dtype and torch.equal(saved[name], loaded[name]), name
    ids = torch.randint(0, CFG.vocab_size, (1, 6), generator=torch.Generator().manual_seed(8))
    assert torch.equal(logits(model, ids), logits(skeleton.eval(), ids))


def test_load_rejects_another_version(tmp_path):
    model = tiny_model(tie=True)
    quantize_model_(model)
    save_quantized(model, tmp_path)
    manifest = json.loads((tmp_path / "quant_manifest.json").read_text())
    (tmp_path / "quant_manifest.json").write_text(json.dumps({**manifest, "wallperf_quant_version": 2}))
    with pytest.raises(ValueError, match="wallperf_quant_version"):
        load_quantized(tiny_model(tie=True), tmp_path)
    with pytest.raises(ValueError, match="quantize it first"):
        save_quantized(tiny_model(tie=True), tmp_path / "plain")


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_kv_round_trip(fp8_dtype):
    g = torch.Generator().manual_seed(9)
    k = (torch.randn(2, 3, 17, 64, generator=g) * 3).bfloat16()  # (B, H_kv, T, D)
    q, scale = quantize_kv(k, fp8_dtype)
    assert scale.shape == () and q.dtype == fp8_dtype
    back = dequantize_kv(q, scale, torch.bfloat16)
    assert back.dtype == torch.bfloat16
    k64, s = k.double().numpy(), scale.double().item()
    # The exact dequantized value is within half a step; its bf16 rounding adds 2^-9.
    bound = half_ulp_bound(k64, s, fp8_dtype) + np.abs(k64) * 2.0 ** -8
    assert (np.abs(back.double().numpy() - k64) <= bound).all()
    assert math.isclose(s, np.abs(k64).max() / FORMATS[fp8_dtype][0], rel_tol=2 ** -23)


@pytest.mark.parametrize("fp8_dtype", FP8)
def test_kv_fixed_scale_saturates(fp8_dtype):
    fmax, _ = FORMATS[fp8_dtype]
    v = torch.tensor([-1000.0, -1.0, 0.5, 1000.0])
    q, scale = quantize_kv(v, fp8_dtype, scale=torch.tensor(1.0))
    assert q.float().tolist() == [-fmax, -1.0, 0.5, fmax]
    with pytest.raises(ValueError, match="one value per tensor"):
        dequantize_kv(q, torch.ones(4), torch.float32)


def hardware(name, fp8=None, fp8_format=None):
    return build(HardwareConfig, {"name": name, "description": name, "memory_gb": 80, "bandwidth_gbps": 3000,
                                  "peak_tflops": {"bfloat16": 100, "fp8": fp8}, "fp8_format": fp8_format})


CPU = hardware("cpu")
MI250 = hardware("mi250-like")
H100 = hardware("h100-like", 1978.9, "e4m3fn")
MI300X = hardware("mi300x-like", 2614.9, "e4m3fnuz")


@pytest.mark.parametrize("hw, fp8_dtype, weight_format", [
    (CPU, None, "bfloat16"), (MI250, None, "bfloat16"), (H100, torch.float8_e4m3fn, "fp8_e4m3fn"),
    (MI300X, torch.float8_e4m3fnuz, "fp8_e4m3fnuz")])
def test_auto_uses_fp8_only_with_fp8_math(hw, fp8_dtype, weight_format):
    choice = choose_format(hw, "auto", "bfloat16")
    assert (choice.dtype, choice.fp8_dtype, choice.emulated) == ("bfloat16", fp8_dtype, False)
    assert hw.name in choice.reason
    assert choice.weight_format == weight_format


def test_forced_fp8_without_fp8_math_is_emulated():
    choice = choose_format(CPU, "fp8", "bfloat16")
    assert (choice.dtype, choice.fp8_dtype, choice.emulated) == ("bfloat16", torch.float8_e4m3fn, True)
    assert "no fp8 math" in choice.reason and "emulated" in choice.reason
    assert json.loads(json.dumps(choice.to_dict())) == {
        "dtype": "bfloat16", "weight_format": "fp8_e4m3fn", "fp8_emulated": True, "format_reason": choice.reason}
    native = choose_format(MI300X, "fp8", "bfloat16")
    assert (native.fp8_dtype, native.emulated) == (torch.float8_e4m3fnuz, False)


@pytest.mark.parametrize("requested, dtype", [("bf16", "bfloat16"), ("bfloat16", "bfloat16"),
                                              ("float32", "float32"), ("float16", "float16")])
def test_forced_dtype_wins_over_fp8_math(requested, dtype):
    choice = choose_format(H100, requested, "bfloat16")
    assert (choice.dtype, choice.fp8_dtype, choice.emulated) == (dtype, None, False)


def test_bad_requests():
    with pytest.raises(ValueError, match="allowed"):
        choose_format(CPU, "int4", "bfloat16")
    with pytest.raises(ValueError, match="published dtype"):
        choose_format(CPU, "auto", "fp8")


@pytest.mark.parametrize("profile,weight_format", [("cpu", "bfloat16"), ("mi250", "bfloat16"),
                                                    ("h100-sxm", "fp8_e4m3fn"), ("h200", "fp8_e4m3fn"),
                                                    ("mi300x", "fp8_e4m3fnuz")])
def test_auto_format_on_the_shipped_hardware_profiles(profile, weight_format):
    from wallperf.harness.config import load_hardware_config

    choice = choose_format(load_hardware_config(profile), "auto", "bfloat16")
    assert choice.weight_format == weight_format and not choice.emulated
