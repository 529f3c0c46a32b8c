"""The roofline: the tokens/s that memory bandwidth and peak FLOP/s allow a
decode step, and a measured run set against them.

    memory-bound tokens/s  = batch * bandwidth / bytes_per_step
    compute-bound tokens/s = peak FLOP/s / FLOPs per generated token
    bound                  = the lower of the two

The step turns compute-bound once its arithmetic intensity (batch * FLOPs per
token / bytes_per_step) passes the ridge point, peak FLOP/s / bandwidth. The
memory wall is the memory-bound figure at batch 1. What a step reads and
computes is counted in harness.hardware.counts.

The compute roof is the peak of the dtype the math runs in (`compute_dtype`):
fp8 weights run as w8a16 (sut.quant, kernels/fp8_gemm.py: each fp8 tile is
widened to the activations' dtype), so their math is bf16 and so is the peak.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from wallperf.harness.config import DTYPE_ALIASES, ConfigError, HardwareConfig
from wallperf.sut.models.config import LlamaConfig
from wallperf.harness.hardware.counts import (BYTES_PER_ELEMENT, Embedding, WeightBytes, active_parameters,
                                     flops_per_token, kv_bytes_per_sequence, prefill_flops, shape_weight_bytes)

# What the command line and a run YAML accept for a dtype, and the dtype each name means.
DTYPE_NAMES = {**{name: name for name in BYTES_PER_ELEMENT}, **DTYPE_ALIASES}


@dataclass(frozen=True)
class RooflineRow:
    """One decode step's limits at one batch size."""

    batch: int
    bytes_per_step: float
    memory_bound_tokens_per_second: float
    compute_bound_tokens_per_second: float
    bound: Literal["memory", "compute"]
    ridge_point: float
    active_parameters: int


def activation_dtype(dtype: str, published: str = "bfloat16") -> str:
    """The dtype activations, unquantized weights and (by default) the KV cache are held in."""
    return published if dtype == "fp8" else dtype


def compute_dtype(dtype: str, published: str = "bfloat16") -> str:
    """The dtype of the math: w8a16 for fp8 weights, so the activations' dtype."""
    return activation_dtype(dtype, published)


def bytes_per_step(shape: LlamaConfig, dtype: str, batch: int = 1, context: float = 0,
                   embedding: Embedding = "table", weights: WeightBytes | None = None,
                   kv_bytes_per_element: float | None = None) -> float:
    """Weights and KV cache one decode step over `batch` sequences reads.

    `weights`: what the run's engine really holds (counts.held_weight_bytes, or a peer
    engine's own file); without it, the shape stored in `dtype` (counts.shape_weight_bytes).
    `kv_bytes_per_element`: the KV cache's storage per element (an fp8 cache passes its
    own, scales spread over the elements); without it, the activation dtype's size."""
    if weights is None:
        weights = shape_weight_bytes(shape, dtype, activation_dtype(dtype))
    if kv_bytes_per_element is None:
        kv_bytes_per_element = BYTES_PER_ELEMENT[activation_dtype(dtype)]
    return weights.per_step(shape, batch, embedding) + batch * kv_bytes_per_sequence(shape, context,
                                                                                     kv_bytes_per_element)


def bytes_per_token(shape: LlamaConfig, dtype: str, context: float = 0, **counts) -> float:
    """Bytes one token costs at batch 1: the baseline figure of the memory wall."""
    return bytes_per_step(shape, dtype, 1, context, **counts)


def peak_flops(hardware: HardwareConfig, dtype: str) -> float:
    """Dense peak FLOP/s of the math `dtype`'s weights run in (see compute_dtype)."""
    math_dtype = compute_dtype(dtype)
    tflops = hardware.peak_tflops.get(math_dtype)
    if tflops is None:
        known = ", ".join(k for k, v in hardware.peak_tflops.items() if v is not None) or "none"
        raise ConfigError(f"hardware profile '{hardware.name}'", f"peak_tflops.{math_dtype}",
                          f"no peak for {math_dtype}; this profile has: {known}")
    return tflops * 1e12


def ridge_point(hardware: HardwareConfig, dtype: str) -> float:
    """FLOP per byte above which a kernel is compute-bound on this hardware."""
    return peak_flops(hardware, dtype) / (hardware.bandwidth_gbps * 1e9)


def roofline_row(shape: LlamaConfig, hardware: HardwareConfig, dtype: str, batch: int, context: int = 0,
                 embedding: Embedding = "table") -> RooflineRow:
    step = bytes_per_step(shape, dtype, batch, context, embedding)
    memory = batch * hardware.bandwidth_gbps * 1e9 / step
    compute = peak_flops(hardware, dtype) / flops_per_token(shape, context)
    return RooflineRow(batch=batch, bytes_per_step=step, memory_bound_tokens_per_second=memory,
                       compute_bound_tokens_per_second=compute,
                       bound="memory" if memory < compute else "compute",
                       ridge_point=ridge_point(hardware, dtype), active_parameters=active_parameters(shape))


def roofline_rows(shape: LlamaConfig, hardware: HardwareConfig, dtype: str, batches, context: int = 0,
                  embedding: Embedding = "table") -> list[RooflineRow]:
    return [roofline_row(shape, hardware, dtype, b, context, embedding) for b in batches]


def memory_wall(shape: LlamaConfig, hardware: HardwareConfig, dtype: str, context: float = 0, **counts) -> float:
    """Tokens/s at batch 1 when every step streams its bytes at the peak bandwidth."""
    return hardware.bandwidth_gbps * 1e9 / bytes_per_token(shape, dtype, context, **counts)


# Utilizations a figure can have, and what each is a share of.
UTILIZATIONS = {"mbu": "the wall's bandwidth", "decode_mbu": "the wall's bandwidth (decode steps)",
                "mfu": "the peak of the kernel in use", "decode_mfu": "the peak of the kernel in use (decode steps)"}


def utilization_problems(figures: dict) -> list[str]:
    """Why `figures` (a roofline record, a sweep point) cannot be trusted: every utilization
    above 1, which no machine reaches. An MFU above 1 means the peak was not that of the
    kernel that ran (torch's emulated bf16 matmul on a CPU without bf16 math once gave 897%)
    or the FLOP count is wrong; an MBU above 1, the bandwidth or the byte count."""
    found = []
    for key, of in UTILIZATIONS.items():
        value = figures.get(key)
        if isinstance(value, (int, float)) and value > 1:
            cause = "the peak or the FLOP count" if "mfu" in key else "the bandwidth or the byte count"
            found.append(f"{key} {value:.2f} is above 1 ({of}): {cause} is wrong")
    return found


def run_roofline(shape: LlamaConfig, hardware: HardwareConfig, dtype: str, tokens_per_second: float,
                 batch: int, context: float, prompt_tokens: float = 0.0, output_tokens: float = 1.0,
                 **counts) -> dict:
    """A measured run set against its real bound.

    `batch` is the decode batch the run held (1 for SingleStream) and `context`
    the mean context a step attended over. The memory bound is the batch's
    decode steps streaming their bytes; the compute bound counts all the work
    behind each generated token: its decode FLOPs, and its share of prefilling
    the prompts (`prompt_tokens` per sample over `output_tokens` per sample).
    `bound` names the lower one; `utilization` is tokens/s over it, which is
    MBU when memory-bound and MFU when compute-bound. LoadGen's tokens/s includes
    prefill time, so MBU is a lower bound on decode's. MBU or MFU above 1 means a
    figure is wrong: the bandwidth or peak, the byte count, or the batch.
    `counts` (weights, kv_bytes_per_element) are passed to bytes_per_step.
    """
    step = bytes_per_step(shape, dtype, batch, context, **counts)
    bandwidth = hardware.bandwidth_gbps * 1e9
    peak = peak_flops(hardware, dtype)
    flops_per_output = flops_per_token(shape, context) + prefill_flops(shape, prompt_tokens) / max(output_tokens, 1)
    memory_bound = batch * bandwidth / step
    compute_bound = peak / flops_per_output
    achieved_bytes_per_second = tokens_per_second / batch * step
    bound = "memory" if memory_bound <= compute_bound else "compute"
    return {
        "dtype": dtype,
        "compute_dtype": compute_dtype(dtype),
        "batch": batch,
        "context": context,
        "embedding_counted": counts.get("embedding", "table"),
        "bytes_per_step": step,
        "bytes_per_token": bytes_per_token(shape, dtype, context, **counts),
        "memory_wall_tokens_per_second": memory_wall(shape, hardware, dtype, context, **counts),
        "memory_bound_tokens_per_second": memory_bound,
        "achieved_bandwidth_gbps": achieved_bytes_per_second / 1e9,
        "mbu": achieved_bytes_per_second / bandwidth,
        "arithmetic_intensity": batch * flops_per_token(shape, context) / step,
        "prompt_tokens_per_sample": prompt_tokens,
        "output_tokens_per_sample": output_tokens,
        "flops_per_output_token": flops_per_output,
        "achieved_tflops": tokens_per_second * flops_per_output / 1e12,
        "compute_bound_tokens_per_second": compute_bound,
        "peak_tflops": peak / 1e12,
        "mfu": tokens_per_second * flops_per_output / peak,
        "bound": bound,
        "bound_tokens_per_second": min(memory_bound, compute_bound),
        "utilization": tokens_per_second / min(memory_bound, compute_bound),
    }
