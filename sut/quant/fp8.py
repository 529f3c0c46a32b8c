"""fp8 (e4m3) weight quantization: the offline pass, the runtime module, the
saved form, and the choice of format per hardware profile.

Weights are scaled by their absolute maximum so that it lands on the format's
largest finite value (448 for e4m3fn, 240 for e4m3fnuz), one fp32 scale per
output channel (or one per tensor), and stored as fp8. Activations stay in the
model's dtype. The math goes through one hook, `_fp8_matmul`: here it
dequantizes (emulated, exact, any device); on hardware with fp8 math it is
where an fp8 GEMM plugs in.

Which modules are quantized is a name rule: every `nn.Linear` except those
whose dotted name (with a trailing ".") contains one of `EXCLUDED_NAMES`.
The LM head is excluded because its error lands on the logits unsmoothed (and
a tied head is the embedding table, which is no Linear); MoE routers because
a small error flips which experts a token goes to. Embeddings and norms are
not Linear and so are never touched.

Mixture-of-experts weights are stacked Parameters, not Linears (sut.models.mixtral:
w13 (E, 2F, hidden), w2 (E, hidden, F)): they are quantized too, one scale per
expert row, as most of such a model's bytes are theirs (Mixtral 8x7B: 11.3B of
its 12.9B active parameters). `dequantize_experts` widens only the experts a
batch routes to. The saved form is in sut.quant_store.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wallperf.kernels import dispatch

FP8_DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}
# Matched against f"{module_name}." so that "moe.gate" matches "gate." but "gate_up_proj" does not.
EXCLUDED_NAMES = ("lm_head.", "router", "gate.")
FORCED_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}
REQUESTS = ("auto", "fp8", *FORCED_DTYPES)


def format_name(fp8_dtype: torch.dtype) -> str:
    """'fp8_e4m3fn' or 'fp8_e4m3fnuz': the name manifests and results.json use."""
    for name, dtype in FP8_DTYPES.items():
        if dtype == fp8_dtype:
            return f"fp8_{name}"
    raise ValueError(f"{fp8_dtype} is not a supported fp8 format; allowed: {', '.join(FP8_DTYPES)}")


def _quantize(t: torch.Tensor, fp8_dtype: torch.dtype, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    format_name(fp8_dtype)
    tf = t.float()
    amax = tf.abs().amax(dim=-1) if per_row else tf.abs().amax()
    if not torch.isfinite(amax).all():
        raise ValueError("cannot quantize a tensor with inf or nan values")
    fmax = torch.finfo(fp8_dtype).max
    # An all-zero row keeps scale 1: its values quantize to 0 exactly, and no 0/0 appears.
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    return _to_fp8(tf, scale, fp8_dtype), scale


def _to_fp8(tf: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Clamp before the cast: e4m3fnuz turns overflow into nan, and amax / scale may
    round a hair above the maximum."""
    fmax = torch.finfo(fp8_dtype).max
    return (tf / _rows(scale)).clamp_(-fmax, fmax).to(fp8_dtype)


def _rows(scale: torch.Tensor) -> torch.Tensor:
    """A per-row scale (N,) as (N, 1) so it multiplies rows; a scalar as is."""
    return scale.unsqueeze(-1) if scale.dim() else scale


def quantize_weight(w: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                    per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with w ~= q * scale: q fp8 (N, K), scale fp32 (N,) or () per tensor."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    return _quantize(w, fp8_dtype, per_row=per_channel)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale in fp32, rounded once to `dtype` (fp8 values are exact in bf16 and fp32)."""
    return q.float().mul_(_rows(scale)).to(dtype)


def _fp8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale).T in x's dtype. The emulated path, exact on any device: where the
    hardware has fp8 math this is the one place to call an fp8 GEMM instead."""
    if dispatch.uses_triton(x):
        return dispatch.fp8_linear(x.reshape(-1, x.shape[-1]), q, scale).view(*x.shape[:-1], q.shape[0])
    return F.linear(x, dequantize(q, scale, x.dtype))


class FP8Linear(nn.Module):
    """A Linear whose weight is stored as fp8 with fp32 scales; its bias, if any
    (Qwen2's Q/K/V), stays in the unquantized dtype."""

    def __init__(self, in_features: int, out_features: int, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                 per_channel: bool = True, device=None, bias: bool = False):
        super().__init__()
        format_name(fp8_dtype)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=fp8_dtype, device=device))
        scale_shape = (out_features,) if per_channel else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fp8_dtype: torch.dtype, per_channel: bool) -> "FP8Linear":
        module = cls(linear.in_features, linear.out_features, fp8_dtype, per_channel, device="meta",
                     bias=linear.bias is not None)
        module.weight, module.weight_scale = quantize_weight(linear.weight.detach(), fp8_dtype, per_channel)
        if linear.bias is not None:
            module.bias = linear.bias
        return module

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.dim() == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _fp8_matmul(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={format_name(self.weight.dtype)}, per_channel={self.per_channel}")


def is_excluded(module_name: str) -> bool:
    return any(part in f"{module_name}." for part in EXCLUDED_NAMES)


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclass(frozen=True)
class QuantReport:
    """What a quantization pass changed, in parameters and bytes."""

    fp8_format: str
    per_channel: bool
    source_dtype: str
    quantized_modules: tuple
    quantized_params: int
    # The quantized weights alone: in the source dtype, then as fp8 plus their scales.
    quantized_bytes_before: int
    quantized_bytes_after: int
    # Everything in the state dict (a tied embedding counted once).
    model_bytes_before: int
    model_bytes_after: int
    # Modules whose stacked MoE experts were quantized (their weights are in the counts above).
    quantized_experts: tuple = ()

    def to_dict(self) -> dict:
        """For results.json."""
        return {**dataclasses.asdict(self), "quantized_modules": list(self.quantized_modules),
                "quantized_experts": list(self.quantized_experts)}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model_(model: nn.Module, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                    per_channel: bool = True) -> QuantReport:
    """Replace every non-excluded nn.Linear of `model` by an FP8Linear, and turn its
    stacked MoE experts into fp8 with per-row scales, in place."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not is_excluded(name)]
    expert_modules = [(name, m) for name, m in model.named_modules() if is_expert_module(m)]
    if not targets:
        raise ValueError("no nn.Linear modules to quantize (already quantized?)")
    weights = [m.weight for _, m in targets] + [getattr(m, w) for _, m in expert_modules for w in EXPERT_WEIGHTS]
    dtypes = {str(w.dtype).removeprefix("torch.") for w in weights}
    if len(dtypes) != 1:
        raise ValueError(f"projections in mixed dtypes {sorted(dtypes)}: quantize from one source dtype")
    bytes_before = _state_bytes(model)
    params = q_before = q_after = 0
    for name, linear in targets:
        fp8 = FP8Linear.from_linear(linear, fp8_dtype, per_channel)
        params += linear.weight.numel()
        q_before += linear.weight.numel() * linear.weight.element_size()
        q_after += fp8.weight.numel() + fp8.weight_scale.numel() * fp8.weight_scale.element_size()
        _replace(model, name, fp8)
    for _, module in expert_modules:
        for w in EXPERT_WEIGHTS:
            stacked = getattr(module, w)
            params += stacked.numel()
            q_before += stacked.numel() * stacked.element_size()
        q_after += quantize_experts_(module, fp8_dtype)
    return QuantReport(format_name(fp8_dtype), per_channel, dtypes.pop(), tuple(n for n, _ in targets),
                       params, q_before, q_after, bytes_before, _state_bytes(model),
                       tuple(n for n, _ in expert_modules))


EXPERT_WEIGHTS = ("w13", "w2")


def is_expert_module(module: nn.Module) -> bool:
    """A module holding stacked MoE experts as Parameters (not yet quantized)."""
    return all(isinstance(getattr(module, w, None), nn.Parameter) for w in EXPERT_WEIGHTS)


def quantize_experts_(module: nn.Module, fp8_dtype: torch.dtype) -> int:
    """Turn `module`'s stacked experts into fp8 buffers with one fp32 scale per expert
    row (`w13_scale` (E, 2F), `w2_scale` (E, hidden)); returns their bytes."""
    nbytes = 0
    for w in EXPERT_WEIGHTS:
        stacked = getattr(module, w).detach()
        q, scale = _quantize(stacked, fp8_dtype, per_row=True)
        delattr(module, w)
        module.register_buffer(w, q)
        module.register_buffer(f"{w}_scale", scale)
        nbytes += q.numel() + scale.numel() * scale.element_size()
    return nbytes


def mark_experts_quantized_(module: nn.Module, fp8_dtype: torch.dtype) -> None:
    """Give a skeleton's expert module fp8 buffers of the right shapes to load into."""
    for w in EXPERT_WEIGHTS:
        shape = getattr(module, w).shape
        delattr(module, w)
        module.register_buffer(w, torch.empty(shape, dtype=fp8_dtype, device="meta"))
        module.register_buffer(f"{w}_scale", torch.empty(shape[:2], dtype=torch.float32, device="meta"))


def dequantize_experts(module: nn.Module, expert_ids: torch.Tensor,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w13, w2, ids) for a batch routed to `expert_ids` (N, k): the experts it touches,
    widened to `dtype`, and the ids renumbered into them. Unquantized experts come back
    as they are, ids unchanged."""
    if getattr(module, "w13_scale", None) is None:
        return module.w13, module.w2, expert_ids
    used, ids = expert_ids.unique(return_inverse=True)
    w13 = dequantize(module.w13[used], module.w13_scale[used], dtype)
    w2 = dequantize(module.w2[used], module.w2_scale[used], dtype)
    return w13, w2, ids


def quantize_kv(t: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) for a K or V tensor with one scale for the whole tensor (one layer).

    A cache written step by step holds one scale per layer fixed in advance (from
    calibration): pass it as `scale`, and values beyond scale * max saturate.
    """
    if scale is None:
        return _quantize(t, fp8_dtype, per_row=False)
    if scale.dim() != 0:
        raise ValueError(f"a KV scale is one value per tensor, got shape {tuple(scale.shape)}")
    return _to_fp8(t.float(), scale.float(), fp8_dtype), scale.float()


def quantize_kv_vectors(t: torch.Tensor, fp8_dtype: torch.dtype,
                        centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) for K or V vectors (..., head_dim) with one fp32 scale per vector
    (per token and KV head): each vector's largest value maps to the format's
    maximum when it is written. `centre` (float32, broadcast over the vectors, e.g.
    (H_kv, D)) is subtracted first, in float32: keys are stored centred
    (sut.kv_calibration), which attention's softmax does not see."""
    if centre is not None:
        t = t.float() - centre
    return _quantize(t, fp8_dtype, per_row=True)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if scale.dim() != 0:
        raise ValueError(f"a KV scale is one value per tensor, got shape {tuple(scale.shape)}")
    return dequantize(q, scale, dtype)


@dataclass(frozen=True)
class FormatChoice:
    """The format a run uses: `dtype` for activations and unquantized tensors,
    `fp8_dtype` for the projections' weights (None: no quantization)."""

    dtype: str
    fp8_dtype: torch.dtype | None
    emulated: bool
    reason: str

    @property
    def weight_format(self) -> str:
        return format_name(self.fp8_dtype) if self.fp8_dtype is not None else self.dtype

    def to_dict(self) -> dict:
        """The fields results.json records."""
        return {"dtype": self.dtype, "weight_format": self.weight_format, "fp8_emulated": self.emulated,
                "format_reason": self.reason}


def kv_cache_dtype(hardware, requested: str) -> torch.dtype | None:
    """The KV cache's storage dtype for a run: None (the model's dtype) for "auto",
    the hardware's fp8 variant for "fp8" (e4m3fn where it has none: emulated)."""
    if requested not in ("auto", "fp8"):
        raise ValueError(f"KV cache dtype {requested!r}; allowed: auto, fp8")
    return None if requested == "auto" else FP8_DTYPES[hardware.fp8_format or "e4m3fn"]


def choose_format(hardware, requested: str, published_dtype: str) -> FormatChoice:
    """The published format, unless the hardware has fp8 math ("auto") or a format is forced.

    `hardware` is a harness.config.HardwareConfig: `peak_tflops["fp8"]` not null
    means fp8 math, in the variant `fp8_format` names.
    """
    if requested not in REQUESTS:
        raise ValueError(f"requested format {requested!r}; allowed: {', '.join(REQUESTS)}")
    if published_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"published dtype {published_dtype!r} is not float32, bfloat16 or float16")
    has_fp8 = hardware.peak_tflops.get("fp8") is not None
    if requested in FORCED_DTYPES:
        dtype = FORCED_DTYPES[requested]
        return FormatChoice(dtype, None, False, f"{dtype} requested")
    if has_fp8:
        fp8_dtype = FP8_DTYPES[hardware.fp8_format]
        why = "requested" if requested == "fp8" else "auto: the hardware has fp8 math"
        return FormatChoice(published_dtype, fp8_dtype, False,
                            f"{format_name(fp8_dtype)} weights ({why} on {hardware.name}), "
                            f"{published_dtype} activations")
    if requested == "fp8":
        return FormatChoice(published_dtype, torch.float8_e4m3fn, True,
                            f"fp8_e4m3fn requested on {hardware.name}, which has no fp8 math: emulated "
                            f"(fp8 storage, weights upcast to {published_dtype} for the math)")
    return FormatChoice(published_dtype, None, False,
                        f"auto: {hardware.name} has no fp8 math, so the published format {published_dtype}")
