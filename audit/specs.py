"""Model specs for the audit: which checkpoint, in which format, damaged or not.

A SPEC is a conf/models name or a checkpoint path (.gguf file or HF folder),
optionally followed by `@DTYPE` and `+noiseSIGMA`:

- DTYPE: bfloat16 (bf16), float16 (fp16), float32 (fp32), or fp8: e4m3
  weights with per-channel scales, in the variant of the hardware profile the
  audit names (`audit --hardware`: e4m3fnuz on MI300X, e4m3fn on H100/H200
  and, emulated, on CPUs), or a variant named outright (`fp8_e4m3fn`,
  `fp8_e4m3fnuz`). Default: the model's published dtype.
- `+noiseSIGMA` damages a model on purpose, to prove that the gate catches
  damage: seeded gaussian noise of SIGMA times each tensor's RMS is added to
  every projection weight of every block (`smollm2-135m@bf16+noise0.2`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from wallperf.harness.hardware.roofline import DTYPE_NAMES

FP8_VARIANTS = ("fp8_e4m3fn", "fp8_e4m3fnuz")
DTYPES = tuple(DTYPE_NAMES) + FP8_VARIANTS
NOISE_SEED = 0
_SPEC = re.compile(r"(?P<target>.+?)(?:@(?P<dtype>[A-Za-z0-9_]+))?(?:\+noise(?P<noise>[^@+]+))?")


class AuditInputError(ValueError):
    """A bad spec, limit or option: the message says what is allowed."""


@dataclass(frozen=True)
class ModelSpec:
    target: str
    dtype: str | None = None  # canonical: bfloat16, float16, float32, fp8 or an fp8 variant
    noise: float = 0.0

    def __str__(self) -> str:
        dtype = f"@{self.dtype}" if self.dtype else ""
        return self.target + dtype + (f"+noise{self.noise:g}" if self.noise else "")


def parse_spec(text: str) -> ModelSpec:
    match = _SPEC.fullmatch(text.strip()) if text else None
    if match is None:
        raise AuditInputError(f"model spec {text!r} is empty; expected NAME_OR_PATH[@DTYPE][+noiseSIGMA]")
    dtype, noise = match["dtype"], 0.0
    if dtype is not None:
        if dtype not in DTYPES:
            raise AuditInputError(f"model spec {text!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPE_NAMES.get(dtype, dtype)
    if match["noise"] is not None:
        try:
            noise = float(match["noise"])
        except ValueError:
            noise = math.nan
        if not 0 < noise < math.inf:
            raise AuditInputError(f"model spec {text!r}: noise {match['noise']!r} must be a number > 0 "
                                  "(the noise's std relative to each weight's RMS)")
    return ModelSpec(match["target"], dtype, noise)


def resolve_spec(spec: ModelSpec) -> tuple[Path, str]:
    """The checkpoint path and the dtype to run in (the published one unless the spec names one)."""
    from wallperf.harness.artifacts import ArtifactError, resolve_model_file
    from wallperf.harness.config import available, load_model_config

    path = Path(spec.target).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        # A GGUF's tensor types say how it is stored, not what it computes in: bf16, as the conf models.
        return path, spec.dtype or "bfloat16"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AuditInputError(f"{path} is a folder without config.json, not an HF checkpoint")
        hf_config = json.loads((path / "config.json").read_text())
        published = hf_config.get("dtype") or hf_config.get("torch_dtype")
        return path, spec.dtype or (published if published in DTYPES else "bfloat16")
    if spec.target not in available("models"):
        raise AuditInputError(f"{spec.target!r} is neither a model name from conf/models "
                              f"({', '.join(available('models'))}) nor an existing .gguf file or HF folder")
    model = load_model_config(spec.target)
    try:
        return resolve_model_file(model), spec.dtype or model.published_dtype
    except ArtifactError as e:
        raise AuditInputError(f"model {spec.target!r} cannot be audited: {e}") from None


def fp8_format(dtype: str, hardware) -> tuple[torch.dtype | None, str]:
    """The fp8 variant a dtype means on `hardware` (a harness.config.HardwareConfig),
    and the dtype of the math; (None, dtype) for a dtype that is not fp8."""
    from wallperf.sut.quant.fp8 import FP8_DTYPES, choose_format

    if dtype in FP8_VARIANTS:
        return FP8_DTYPES[dtype.removeprefix("fp8_")], "bfloat16"
    if dtype != "fp8":
        return None, dtype
    choice = choose_format(hardware, "fp8", "bfloat16")
    return choice.fp8_dtype, choice.dtype


@lru_cache(maxsize=1)
def _read_checkpoint(path: Path):
    """The last checkpoint read, so that reference and candidate of one file are read once.
    Models built from it never write into its tensors (noise and fp8 replace weights).
    The audit clears it once every model is built."""
    from wallperf.sut.loading.load import read_checkpoint

    return read_checkpoint(path)


def release_checkpoints() -> None:
    _read_checkpoint.cache_clear()


def add_weight_noise_(model: nn.Module, relative_std: float, seed: int = NOISE_SEED) -> None:
    """Replace every projection weight of every block by W + N(0, (relative_std * rms(W))^2)."""
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            w = module.weight.detach().float().cpu()
            noisy = w + torch.randn(w.shape, generator=g) * (relative_std * w.pow(2).mean().sqrt())
            module.weight = nn.Parameter(noisy.to(module.weight.device, module.weight.dtype), requires_grad=False)


def load_spec(spec: ModelSpec, hardware, device: str | None = None):
    """A sut.loading.LoadedModel as the spec describes it, fp8 in `hardware`'s variant."""
    from wallperf.sut.loading.load import LoadedModel, torch_dtype
    from wallperf.sut.quant.fp8 import quantize_model_
    from wallperf.sut.loading.weights import build_model

    path, dtype = resolve_spec(spec)
    fp8_dtype, math_dtype = fp8_format(dtype, hardware)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, sd, tokenizer = _read_checkpoint(path)
    model = build_model(cfg, sd, torch_dtype(math_dtype), device)
    if spec.noise:
        add_weight_noise_(model, spec.noise)
    report = None if fp8_dtype is None else quantize_model_(model, fp8_dtype, per_channel=True).to_dict()
    return LoadedModel(path, cfg, model, tokenizer, dtype, device, report)
