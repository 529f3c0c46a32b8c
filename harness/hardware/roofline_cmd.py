"""`wallperf roofline`: a model's decode step on a hardware profile, per batch
size, as a table, JSON or a plot with measured runs drawn beneath the roof."""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from wallperf.harness.config import ConfigError, HardwareConfig
from wallperf.sut.models.config import LlamaConfig
from wallperf.harness.hardware.counts import flops_per_token, shape_weight_bytes
from wallperf.harness.hardware.roofline import (DTYPE_NAMES, RooflineRow, activation_dtype, peak_flops, ridge_point,
                                       roofline_rows)
from wallperf.harness.loadgen.results import write_figure_atomic


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


def plot_roofline(path: Path, shape: LlamaConfig, hardware: HardwareConfig, dtype: str, rows: list[RooflineRow],
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
    try:
        write_figure_atomic(path, fig)
    finally:
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
                    "and peak FLOP/s allow, per batch size. See harness/hardware/counts.py for how bytes "
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
    from wallperf.harness.config import load_hardware_config, load_model_config

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
    if dtype == "fp8":
        emulated = "" if hardware.peak_tflops.get("fp8") else f" ({hardware.name} has no fp8 math: emulated)"
        print(f"wallperf: note: fp8 weights run as w8a16, each weight widened to bfloat16 for the matmul, so "
              f"the compute roof is the bfloat16 peak{emulated}; embeddings, norms, MoE routers and the LM head "
              f"stay bfloat16, and each fp8 row has an fp32 scale", file=sys.stderr)
    weights_gb = shape_weight_bytes(model.shape, dtype, activation_dtype(dtype)).total / 1e9
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
