"""The saved form of an fp8 model: `model.safetensors` (the model's own state dict:
fp8 weights, scales and unquantized tensors) and `quant_manifest.json`, which names
the quantized modules so that a skeleton can be turned into their fp8 form first."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from wallperf.sut.atomic import atomic_path

from wallperf.sut.quant.fp8 import (FP8_DTYPES, FP8Linear, _replace, format_name, is_expert_module,
                       mark_experts_quantized_)

MANIFEST = "quant_manifest.json"
WEIGHTS = "model.safetensors"
QUANT_VERSION = 1


def _fp8_modules(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}


def save_quantized(model: nn.Module, folder: Path) -> dict:
    """Write `model.safetensors` (the model's own state dict: fp8 weights, scales and
    unquantized tensors) and then `quant_manifest.json`; returns the manifest."""
    from safetensors.torch import save_file

    modules = _fp8_modules(model)
    if not modules:
        raise ValueError("the model holds no FP8Linear modules: quantize it first")
    formats = {format_name(m.weight.dtype) for m in modules.values()}
    per_channel = {m.per_channel for m in modules.values()}
    source = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    if len(formats) != 1 or len(per_channel) != 1 or len(source) != 1:
        raise ValueError(f"mixed quantization: formats {sorted(formats)}, per_channel {sorted(per_channel)}, "
                         f"unquantized dtypes {sorted(source)}")
    manifest = {"format": formats.pop(), "per_channel": per_channel.pop(), "quantized_modules": sorted(modules),
                "source_dtype": source.pop(), "wallperf_quant_version": QUANT_VERSION}
    experts = sorted(name for name, m in model.named_modules() if getattr(m, "w13_scale", None) is not None)
    if experts:
        manifest["quantized_experts"] = experts
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_quantized(model_skeleton: nn.Module, folder: Path, device="cpu") -> dict:
    """Turn the manifest's modules of `model_skeleton` (built on any device, `meta`
    included) into FP8Linear (and its experts into fp8 buffers) and assign the saved tensors; returns the manifest.
    Non-persistent buffers (a RoPE table) are not saved: a meta skeleton must
    compute them, as sut.weights.build_model does."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("wallperf_quant_version") != QUANT_VERSION:
        raise ValueError(f"{folder / MANIFEST}: wallperf_quant_version {manifest.get('wallperf_quant_version')!r}"
                         f" is not {QUANT_VERSION}")
    fp8_dtype = FP8_DTYPES[manifest["format"].removeprefix("fp8_")]
    for name in manifest["quantized_modules"]:
        linear = model_skeleton.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{folder}: {name} is a {type(linear).__name__} in the skeleton, not an nn.Linear")
        _replace(model_skeleton, name, FP8Linear(linear.in_features, linear.out_features, fp8_dtype,
                                                 manifest["per_channel"], device="meta",
                                                 bias=linear.bias is not None))
    for name in manifest.get("quantized_experts", []):
        module = model_skeleton.get_submodule(name)
        if not is_expert_module(module):
            raise ValueError(f"{folder}: {name} holds no stacked experts in the skeleton")
        mark_experts_quantized_(module, fp8_dtype)
    tensors = load_file(str(folder / WEIGHTS), device=str(device))
    wrong = [k for k in (f"{n}.weight" for n in manifest["quantized_modules"])
             if k in tensors and tensors[k].dtype != fp8_dtype]
    if wrong:
        raise ValueError(f"{folder / WEIGHTS}: {wrong[0]} is {tensors[wrong[0]].dtype}, "
                         f"the manifest says {manifest['format']}")
    model_skeleton.load_state_dict(tensors, strict=True, assign=True)
    return manifest
