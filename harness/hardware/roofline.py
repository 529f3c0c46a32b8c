"""The memory wall: what a model's decode step costs in bytes and FLOPs.

A decode step produces one token for each sequence in the batch. It must read
the weights once (shared by the batch) and each sequence's KV cache, so

    memory-bound tokens/s  = batch * bandwidth / bytes_per_step
    compute-bound tokens/s = peak FLOP/s / FLOPs per token
    bound                  = the lower of the two

and the step turns compute-bound once its arithmetic intensity
(batch * FLOPs per token / bytes_per_step) passes the ridge point,
peak FLOP/s / bandwidth. The memory wall is the memory-bound figure at batch 1.

How the weights are counted (`weight_parameters`):

- Every parameter of the model, the input embedding table included. A step
  only gathers `batch` rows of that table, but the memory wall as published
  (and in FACTS.md: Llama 3.1 8B bf16 = 16.06e9 bytes, ~331 tok/s on MI300X)
  is parameter count x bytes per parameter. `embedding="rows"` counts the rows
  a step gathers instead; for Llama 3.1 8B that is 6.5% fewer bytes.
- An untied LM head is read whole once per step whatever the batch; a tied one
  is the embedding table, counted once.
- Mixture of experts: each token runs `experts_per_token` (k) of `n_experts`
  expert FFNs. A step over a batch touches at most min(n_experts, batch * k)
  distinct experts, and this is the count used: an upper bound, reached when
  the batch's tokens route to distinct experts.
- Every weight at the dtype's size (`BYTES_PER_ELEMENT`: float32 4,
  bfloat16/float16 2, fp8 1); per-channel fp8 scales are under 0.1% and left
  out. A quantizer that keeps the LM head or embeddings in bf16 reads more.

The KV cache read per step is 2 (K and V) * n_layers * n_kv_heads * head_dim *
context * bytes per element, for each sequence. It is held in the weight dtype,
except with fp8 weights: the fp8 pass quantizes weights only, so it stays bf16.

An engine with its own weight format (llama.cpp's Q4_1 blocks, say) passes
`weight_bytes`, the bytes its weights occupy as it stores them, and
`kv_bytes_per_element` for its KV cache; the parameter count is then not used
for the bytes, only for the FLOPs.

FLOPs per token are 2 per multiply-accumulate of every weight matrix the token
runs through (attention projections, its k experts, the router, the LM head;
the embedding gather and the norms do no matmul), plus attention over the
context: QK^T and AV are each 2 * n_heads * head_dim * context per layer.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from harness.config import ConfigError, HardwareConfig, ModelShape

BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
# What the command line accepts for --dtype, and the dtype each name means.
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp8": "fp8", "fp32": "float32", "float32": "float32"}
# Scenarios that batch requests, where the compute roof may bind and MFU means
# something; Interactive is LoadGen's Server scenario with tighter limits.
BATCHED_SCENARIOS = ("Server", "Interactive", "Offline")

Embedding = Literal["table", "rows"]


@dataclass(frozen=True)
class ParameterCount:
    """Parameters by part of the model; experts counted all, as stored."""

    embedding: int
    attention: int
    ffn: int
    experts: int
    router: int
    norms: int
    lm_head: int

    @property
    def total(self) -> int:
        return (self.embedding + self.attention + self.ffn + self.experts + self.router + self.norms
                + self.lm_head)


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


def head_dim(shape: ModelShape) -> int:
    return shape.head_dim or shape.hidden_size // shape.n_heads


def count_parameters(shape: ModelShape) -> ParameterCount:
    """Llama-family parameters: GQA attention, SwiGLU FFN (dense or experts), RMSNorm, no biases."""
    h, d, L = shape.hidden_size, head_dim(shape), shape.n_layers
    q_and_o = 2 * h * shape.n_heads * d
    k_and_v = 2 * h * shape.n_kv_heads * d
    swiglu = 3 * h * shape.ffn_size  # gate, up and down projections
    moe = shape.n_experts > 1
    return ParameterCount(
        embedding=shape.vocab_size * h,
        attention=L * (q_and_o + k_and_v),
        ffn=0 if moe else L * swiglu,
        experts=L * shape.n_experts * swiglu if moe else 0,
        router=L * h * shape.n_experts if moe else 0,
        norms=(2 * L + 1) * h,
        lm_head=0 if shape.tie_embeddings else shape.vocab_size * h,
    )


def experts_touched(shape: ModelShape, batch: int) -> int:
    """Distinct experts a step over `batch` tokens reads, at most (see the module docstring)."""
    return min(shape.n_experts, batch * shape.experts_per_token)


def weight_parameters(shape: ModelShape, batch: int = 1, embedding: Embedding = "table") -> float:
    """Parameters one decode step over `batch` sequences reads from memory."""
    p = count_parameters(shape)
    experts = p.experts * experts_touched(shape, batch) / shape.n_experts
    if embedding == "rows" and not shape.tie_embeddings:
        table = min(batch, shape.vocab_size) * shape.hidden_size
    else:
        table = p.embedding
    return table + p.attention + p.ffn + experts + p.router + p.norms + p.lm_head


def active_parameters(shape: ModelShape) -> int:
    """Weights one token multiplies through: its FLOPs are twice this (without attention)."""
    p = count_parameters(shape)
    lm_head = p.lm_head or p.embedding
    active_experts = p.experts * shape.experts_per_token // shape.n_experts
    return p.attention + p.ffn + active_experts + p.router + lm_head


def kv_dtype(dtype: str) -> str:
    return "bfloat16" if dtype == "fp8" else dtype


def kv_bytes_per_sequence(shape: ModelShape, dtype: str, context: int) -> int:
    """K and V of every layer for `context` positions of one sequence."""
    return 2 * shape.n_layers * shape.n_kv_heads * head_dim(shape) * context * BYTES_PER_ELEMENT[kv_dtype(dtype)]


def bytes_per_step(shape: ModelShape, dtype: str, batch: int = 1, context: int = 0,
                   embedding: Embedding = "table", weight_bytes: float | None = None,
                   kv_bytes_per_element: int | None = None) -> float:
    """Weights (`weight_bytes` when the engine's own format says so) and KV read by one step."""
    if weight_bytes is None:
        weight_bytes = weight_parameters(shape, batch, embedding) * BYTES_PER_ELEMENT[dtype]
    if kv_bytes_per_element is None:
        kv = kv_bytes_per_sequence(shape, dtype, context)
    else:
        kv = 2 * shape.n_layers * shape.n_kv_heads * head_dim(shape) * context * kv_bytes_per_element
    return weight_bytes + batch * kv


def flops_per_token(shape: ModelShape, context: int = 0) -> float:
    attention = 4 * shape.n_layers * shape.n_heads * head_dim(shape) * context
    return 2 * active_parameters(shape) + attention


def compute_dtype(hardware: HardwareConfig, dtype: str) -> str:
    """The dtype whose peak applies: fp8 weights on hardware without fp8 math are
    emulated, dequantized to bfloat16 for the matmul."""
    if dtype == "fp8" and hardware.peak_tflops.get("fp8") is None:
        return "bfloat16"
    return dtype


def peak_flops(hardware: HardwareConfig, dtype: str) -> float:
    """Dense peak FLOP/s for `dtype` (fp8 falling back to bfloat16, see compute_dtype)."""
    math_dtype = compute_dtype(hardware, dtype)
    tflops = hardware.peak_tflops.get(math_dtype)
    if tflops is None:
        known = ", ".join(k for k, v in hardware.peak_tflops.items() if v is not None) or "none"
        raise ConfigError(f"hardware profile '{hardware.name}'", f"peak_tflops.{math_dtype}",
                          f"no peak for {math_dtype}; this profile has: {known}")
    return tflops * 1e12


def ridge_point(hardware: HardwareConfig, dtype: str) -> float:
    """FLOP per byte above which a kernel is compute-bound on this hardware."""
    return peak_flops(hardware, dtype) / (hardware.bandwidth_gbps * 1e9)


def roofline_row(shape: ModelShape, hardware: HardwareConfig, dtype: str, batch: int, context: int = 0,
                 embedding: Embedding = "table") -> RooflineRow:
    step = bytes_per_step(shape, dtype, batch, context, embedding)
    memory = batch * hardware.bandwidth_gbps * 1e9 / step
    compute = peak_flops(hardware, dtype) / flops_per_token(shape, context)
    return RooflineRow(batch=batch, bytes_per_step=step, memory_bound_tokens_per_second=memory,
                       compute_bound_tokens_per_second=compute,
                       bound="memory" if memory < compute else "compute",
                       ridge_point=ridge_point(hardware, dtype), active_parameters=active_parameters(shape))


def roofline_rows(shape: ModelShape, hardware: HardwareConfig, dtype: str, batches, context: int = 0,
                  embedding: Embedding = "table") -> list[RooflineRow]:
    return [roofline_row(shape, hardware, dtype, b, context, embedding) for b in batches]


def memory_wall(shape: ModelShape, hardware: HardwareConfig, dtype: str, context: int = 0,
                weight_bytes: float | None = None, kv_bytes_per_element: int | None = None) -> float:
    """Tokens/s at batch 1 when every step streams its bytes at the peak bandwidth."""
    step = bytes_per_step(shape, dtype, 1, context, weight_bytes=weight_bytes,
                          kv_bytes_per_element=kv_bytes_per_element)
    return hardware.bandwidth_gbps * 1e9 / step


def arithmetic_intensity(shape: ModelShape, dtype: str, batch: int, context: int = 0,
                         weight_bytes: float | None = None, kv_bytes_per_element: int | None = None) -> float:
    """FLOP per byte of one decode step: compare with ridge_point."""
    step = bytes_per_step(shape, dtype, batch, context, weight_bytes=weight_bytes,
                          kv_bytes_per_element=kv_bytes_per_element)
    return batch * flops_per_token(shape, context) / step


def run_roofline(shape: ModelShape, hardware: HardwareConfig, dtype: str, tokens_per_second: float,
                 batch: int, context: int, scenario: str, weight_bytes: float | None = None,
                 kv_bytes_per_element: int | None = None) -> dict:
    """A measured run set against the roofline.

    `batch` is the decode batch the run held (1 for SingleStream) and `context`
    the mean context a step attended over. Achieved bandwidth is steps/s x
    bytes per step, with steps/s = tokens/s / batch. LoadGen's tokens/s
    includes prefill time, so achieved bandwidth and MBU are lower bounds on
    decode's. MBU above 1 means the bytes were not all read from memory (a
    model small enough for the caches) or `batch` is wrong. `weight_bytes` and
    `kv_bytes_per_element` count an engine's own storage format (see the module
    docstring); `dtype` then names the math's dtype, for the compute roof.
    """
    own = {"weight_bytes": weight_bytes, "kv_bytes_per_element": kv_bytes_per_element}
    step = bytes_per_step(shape, dtype, batch, context, **own)
    achieved_bytes_per_second = tokens_per_second / batch * step
    record = {
        "dtype": dtype,
        "compute_dtype": compute_dtype(hardware, dtype),
        "batch": batch,
        "context": context,
        "bytes_per_step": step,
        "memory_wall_tokens_per_second": memory_wall(shape, hardware, dtype, context, **own),
        "memory_bound_tokens_per_second": batch * hardware.bandwidth_gbps * 1e9 / step,
        "achieved_bandwidth_gbps": achieved_bytes_per_second / 1e9,
        "mbu": achieved_bytes_per_second / (hardware.bandwidth_gbps * 1e9),
        "arithmetic_intensity": arithmetic_intensity(shape, dtype, batch, context, **own),
        "achieved_tflops": tokens_per_second * flops_per_token(shape, context) / 1e12,
    }
    if scenario in BATCHED_SCENARIOS:
        peak = peak_flops(hardware, dtype)
        record["compute_bound_tokens_per_second"] = peak / flops_per_token(shape, context)
        record["mfu"] = tokens_per_second * flops_per_token(shape, context) / peak
    return record


def measured_points(results: Path) -> list[tuple[str, float, float]]:
    """(label, FLOP/byte, achieved TFLOP/s) of each run in a results.json that has roofline figures."""
    path = results / "results.json" if results.is_dir() else results
    if not path.is_file():
        raise ConfigError(path, None, "file not found; --results takes a results folder or its results.json")
    try:
        runs = json.loads(path.read_text()).get("runs", [])
    except (ValueError, AttributeError):
        raise ConfigError(path, "runs", "not a wallperf results.json") from None
    return [(f"{run.get('scenario', '?')} (batch {run['roofline']['batch']})",
             run["roofline"]["arithmetic_intensity"], run["roofline"]["achieved_tflops"])
            for run in runs if isinstance(run.get("roofline"), dict)]


def plot_roofline(path: Path, shape: ModelShape, hardware: HardwareConfig, dtype: str, rows: list[RooflineRow],
                  context: int, title: str, measured: list[tuple[str, float, float]]) -> None:
    """Draw the roof (min of peak and bandwidth x intensity), the decode steps of `rows` on it,
    and measured runs beneath it, on log-log axes."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt
    import numpy as np

    peak = peak_flops(hardware, dtype) / 1e12
    tb_per_s = hardware.bandwidth_gbps / 1e3
    ridge = ridge_point(hardware, dtype)
    steps = [(r.batch, r.batch * flops_per_token(shape, context) / r.bytes_per_step) for r in rows]
    xs = [x for _, x in steps] + [x for _, x, _ in measured] + [ridge]
    lo, hi = min(xs) / 4, max(xs) * 4
    grid = np.geomspace(lo, hi, 256)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(grid, np.minimum(peak, tb_per_s * grid), color="black",
              label=f"roof: {hardware.bandwidth_gbps:g} GB/s, {peak:g} TFLOP/s")
    ax.axvline(ridge, color="grey", linestyle=":", label=f"ridge point {ridge:.0f} FLOP/B")
    ax.scatter([x for _, x in steps], [min(peak, tb_per_s * x) for _, x in steps], marker="o",
               label="decode step bound")
    for b, x in steps:
        ax.annotate(f"batch {b}", (x, min(peak, tb_per_s * x)), textcoords="offset points", xytext=(4, -10),
                    fontsize=8)
    for label, x, y in measured:
        ax.scatter([x], [y], marker="x", label=f"measured: {label}")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _batches(text: str) -> list[int]:
    try:
        batches = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of integers, e.g. 1,8,64") from None
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be >= 1")
    return batches


def _context(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def add_roofline_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "roofline", help="memory wall and compute roof of a model on a hardware profile",
        description="Bytes and FLOPs of one decode step, and the tokens/s that memory bandwidth "
                    "and peak FLOP/s allow, per batch size. See harness/hardware/roofline.py for how bytes "
                    "are counted.")
    p.add_argument("--model", required=True, help="model name from conf/models (needs a shape)")
    p.add_argument("--hardware", required=True, help="hardware name from conf/hardware")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES), help="weight dtype (default bf16)")
    p.add_argument("--batch", type=_batches, default=[1, 8, 64], help="comma list of batch sizes (default 1,8,64)")
    p.add_argument("--context", type=_context, default=0, help="KV cache positions per sequence (default 0)")
    p.add_argument("--embedding", choices=("table", "rows"), default="table",
                   help="count the input embedding table whole (the published convention, default) "
                        "or only the rows a step gathers")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per batch size")
    p.add_argument("--plot", type=Path, help="draw the roofline to this .svg or .png file")
    p.add_argument("--results", type=Path, help="with --plot: a results folder (or its results.json) whose "
                   "runs' roofline figures are drawn as measured points")
    return p


def cmd_roofline(args) -> int:
    from harness.config import load_hardware_config, load_model_config

    model = load_model_config(args.model, "command line", "--model")
    if model.shape is None:
        raise ConfigError(f"conf/models/{args.model}.yaml", "shape",
                          "the roofline needs the model's shape; add a 'shape' mapping")
    hardware = load_hardware_config(args.hardware, "command line", "--hardware")
    dtype = DTYPE_NAMES[args.dtype]
    if args.plot is not None and args.plot.suffix.lower() not in (".svg", ".png"):
        raise ConfigError("command line", "--plot", f"{args.plot}: allowed file types: .svg, .png")
    if args.results is not None and args.plot is None:
        raise ConfigError("command line", "--results", "only used with --plot")
    measured = measured_points(args.results) if args.results is not None else []
    rows = roofline_rows(model.shape, hardware, dtype, args.batch, args.context, args.embedding)
    if compute_dtype(hardware, dtype) != dtype:
        print(f"wallperf: note: {hardware.name} has no fp8 math; fp8 is emulated (fp8 weights, "
              f"bfloat16 matmuls), so the compute roof is the bfloat16 peak", file=sys.stderr)
    weights_gb = count_parameters(model.shape).total * BYTES_PER_ELEMENT[dtype] / 1e9
    if weights_gb > hardware.memory_gb:
        print(f"wallperf: note: the weights ({weights_gb:.0f} GB) do not fit in {hardware.name}'s "
              f"{hardware.memory_gb:g} GB: the figures assume one device that could hold them "
              f"(at least {math.ceil(weights_gb / hardware.memory_gb)} are needed)",
              file=sys.stderr)
    title = f"{model.name} on {hardware.name}, {dtype}, context {args.context}"
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_table(rows, title))
    if args.plot is not None:
        plot_roofline(args.plot, model.shape, hardware, dtype, rows, args.context, title, measured)
        print(f"wallperf: wrote {args.plot}", file=sys.stderr)
    return 0


def format_table(rows: list[RooflineRow], title: str) -> str:
    header = ("batch", "bytes/step GB", "memory-bound tok/s", "compute-bound tok/s", "bound",
              "ridge FLOP/B", "active params")
    cells = [(str(r.batch), f"{r.bytes_per_step / 1e9:.3f}", f"{r.memory_bound_tokens_per_second:.1f}",
              f"{r.compute_bound_tokens_per_second:.1f}", r.bound, f"{r.ridge_point:.1f}",
              f"{r.active_parameters / 1e9:.3f}B") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = [title] + ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in (header, *cells)]
    return "\n".join(lines)
