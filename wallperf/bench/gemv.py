"""`wallperf bench gemv`: SmolLM2-135M's linear layers at batch 1 against the memory wall.

A decode step at batch 1 is a chain of matrix-vector products, each reading
its weight once: its speed is the speed of streaming the weights from DRAM.
This benchmark times one token's worth of them (SmolLM2-135M: 30 layers of
fused qkv, o, fused gate_up and down, then the LM head) with PyTorch's eager
F.linear and with kernels.cpu_linear, side by side in one process, and
measures STREAM's copy bandwidth in the same run, so that the fraction of the
wall each reaches is a ratio of figures taken together.

- Every layer has its own weight tensors, as in the real model: 269 MB in all,
  eight times the 32 MiB L3 here, so each pass streams them from DRAM.
- The two implementations alternate within each repeat, so drift in the
  machine's load affects both alike; figures are medians after warm-up.
- GB/s counts the weight bytes only (the activations are a few KiB).
- The wall is STREAM copy as `wallperf probe` measures it (best of N, bytes of
  the two arrays, write-allocate traffic not counted).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from wallperf.harness.config import positive
from wallperf.harness.hardware.probe import stream_bandwidth
from wallperf.kernels.cpu_linear import cpu_isa, cpu_linear, cpu_linear_available, cpu_linear_ref, why_unavailable


@dataclass(frozen=True)
class GemvShape:
    """One weight matrix of the model: x (1, in_features) @ W^T, W (out_features, in_features)."""

    name: str
    in_features: int
    out_features: int
    count: int  # how many separate matrices of this shape a token runs through

    @property
    def nbytes(self) -> int:
        return self.in_features * self.out_features * 2  # bf16


# SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64 (q 576 + k 192 + v 192),
# FFN 1536 (gate and up fused), vocab 49152 (the tied LM head, read once per token).
SMOLLM2_135M_SHAPES = (
    GemvShape("qkv", 576, 576 + 2 * 192, 30),
    GemvShape("o", 576, 576, 30),
    GemvShape("gate_up", 576, 2 * 1536, 30),
    GemvShape("down", 1536, 576, 30),
    GemvShape("lm_head", 576, 49152, 1),
)

IMPLEMENTATIONS = {"F.linear": cpu_linear_ref, "cpu_linear": cpu_linear}


def _token_weights(shapes) -> list[torch.Tensor]:
    """The weights in the order a token meets them: layer by layer, each shape while it has layers left."""
    generator = torch.Generator().manual_seed(0)
    layers = max(s.count for s in shapes)
    return [torch.randn(s.out_features, s.in_features, generator=generator).to(torch.bfloat16)
            for layer in range(layers) for s in shapes if layer < s.count]


def bench(shapes=SMOLLM2_135M_SHAPES, repeats: int = 10, warmup: int = 2, copy_mib: int = 256) -> dict:
    """Time one token's linear layers per implementation; GB/s and ms against copy bandwidth."""
    weights = _token_weights(shapes)
    inputs = {k: torch.randn(1, k).to(torch.bfloat16) for k in {s.in_features for s in shapes}}
    nbytes = sum(s.nbytes * s.count for s in shapes)
    # Resolve (build) the kernel before any timing.
    available = cpu_linear_available()

    def token(linear) -> float:
        start = time.perf_counter()
        for w in weights:
            linear(inputs[w.shape[1]], w)
        return time.perf_counter() - start

    seconds = {name: [] for name in IMPLEMENTATIONS}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, linear in IMPLEMENTATIONS.items():
                elapsed = token(linear)
                if i >= warmup:
                    seconds[name].append(elapsed)
        copy_gbps, triad_gbps = stream_bandwidth(torch.device("cpu"), copy_mib, repeats)

    results = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        gbps = nbytes / median / 1e9
        results[name] = {"ms_per_token": median * 1e3, "gbps": gbps, "fraction_of_copy": gbps / copy_gbps,
                         "best_gbps": nbytes / min(times) / 1e9}
    return {
        "shapes": [asdict(s) for s in shapes],
        "matrices": len(weights),
        "weight_bytes": nbytes,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "copy_gbps": copy_gbps,
        "triad_gbps": triad_gbps,
        "cpu_linear_available": available,
        "why_unavailable": why_unavailable(),
        "cpu_isa": cpu_isa(),
        "results": results,
    }


def format_report(report: dict) -> str:
    layers = ", ".join(f"{s['name']} {s['in_features']}->{s['out_features']} x{s['count']}"
                       for s in report["shapes"])
    lines = [
        f"one token at batch 1: {layers}",
        f"{report['matrices']} matrices, {report['weight_bytes'] / 1e6:.1f} MB of bf16 weights, "
        f"{report['threads']} threads, cpu_linear on the {report['cpu_isa']} path",
        f"wall: STREAM copy {report['copy_gbps']:.1f} GB/s (triad {report['triad_gbps']:.1f}), same run",
    ]
    if not report["cpu_linear_available"]:
        lines.append(f"cpu_linear fell back to F.linear: {report['why_unavailable']}")
    lines.append(f"{'':12s}{'ms/token':>10s}{'GB/s':>8s}{'of copy':>9s}{'best GB/s':>11s}")
    for name, r in report["results"].items():
        lines.append(f"{name:12s}{r['ms_per_token']:10.2f}{r['gbps']:8.1f}{r['fraction_of_copy']:9.0%}"
                     f"{r['best_gbps']:11.1f}")
    lines.append(f"medians (best: fastest pass) of {report['repeats']} repeats after warm-up")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wallperf bench gemv", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=positive(int), default=10, help="timed passes per implementation")
    p.add_argument("--warmup", type=positive(int, zero_ok=True), default=2, help="untimed passes first")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    report = bench(repeats=args.repeats, warmup=args.warmup)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
