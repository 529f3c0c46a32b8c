"""`wallperf bench decode`: the native engine's decode step against its roofline.

A decode step over R rows reads every weight once plus each row's KV cache,
and does 2 FLOPs per weight per row plus attention. Its roofline time is the
larger of the two floors the machine allows, both measured in the same run:
(weights read once + the KV cache at the context) / the measured read-only
bandwidth (harness.hardware.probe.read_bandwidth), and all FLOPs, attention
included (harness.hardware.counts.flops_per_token), / the measured peak of the
kernel the engine runs (harness.hardware.probe.gemm_tflops: the compiled CPU
kernel on its instruction-set path, `cpu_isa()`). The report gives per row
count the step time, the roofline time and their ratio; the aim is a ratio of
at most 1.3 at 1, 8, 32 and 64 rows. GB/s against STREAM copy and TFLOP/s
against the peak stay beside them.

The fused C++ step (kernels/cpu_decode.py) and the eager PyTorch step can be
timed side by side in one process, on the real model, from the thread that
calls them in a run (the SUT's worker thread) and from the main thread.

- Per row count, one engine per path prefills R prompts of --context tokens
  (untimed); then each pass times a window of --tokens decode steps per path
  and thread, in turn, and measures the kernel peak once (the best of
  PEAK_CALLS calls), so drift in the machine's load hits all alike. Step
  figures are medians over passes after one warm-up pass; the peak is the best
  pass's, since a roof is what the kernel can do. The context grows by a window's steps each window; the table
  gives the mean context the timed steps attended over.
- Bytes per step: every weight a step reads (the tied LM head counts once, the
  embedding lookup one row per row) plus every row's K and V at the context.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import torch

from wallperf.harness.config import positive
from wallperf.harness.hardware.peak_kernels import best_peak
from wallperf.harness.hardware.probe import CPU_SETTINGS, read_bandwidth, stream_bandwidth
from wallperf.harness.hardware.counts import flops_per_token
from wallperf.kernels.cpu_decode import MAX_FUSED_ROWS, step_profile
from wallperf.kernels.cpu_linear import cpu_isa, forced_isa_problem
from wallperf.sut.engine.engine import Engine, SamplingParams

PATHS = ("fused", "eager")
THREADS = ("worker", "main")
ROWS = (1, 8, 32, 64)
# The aim for each row count: step time within this factor of its roofline time.
TARGET_RATIO = 1.3
# Timed calls of the kernel peak per pass, after the probe's warm-up.
PEAK_CALLS = 10


def step_bytes(model, context: float, rows: int = 1) -> float:
    """Bytes one decode step over `rows` rows reads at a given context length."""
    cfg = model.cfg
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    row = model.embed_tokens.weight[0]
    if model.lm_head is not None:  # untied: the embedding table is read one row at a time
        weights -= model.embed_tokens.weight.numel() * row.element_size() - rows * row.numel() * row.element_size()
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * row.element_size() * context
    return weights + rows * kv


def _engine(model, eos, path: str, rows: int, prompt: list[int], decode_steps: int) -> Engine:
    """An engine on `path` holding `rows` sequences that have all finished prefill, each
    with room for `decode_steps` more tokens. While some rows decode, the scheduler
    prefills one waiting prompt a step, so the first rows may decode up to `rows` steps
    before the last starts: their budget covers that, and no row finishes inside a timed
    window (_time_window checks it)."""
    os.environ["WALLPERF_FUSED_DECODE"] = "1" if path == "fused" else "0"
    decode_steps += rows
    max_seq_len = len(prompt) + decode_steps + 2
    blocks_per_row = -(-max_seq_len // 16)
    engine = Engine(model, eos, max_batch=rows, max_seq_len=max_seq_len, block_size=16,
                    num_blocks=rows * blocks_per_row)
    if path == "fused" and not engine.decode_path.startswith("fused"):
        raise RuntimeError(engine.decode_path)
    params = SamplingParams(max_new_tokens=decode_steps + 2, min_new_tokens=decode_steps + 2, ignore_eos=True)
    for r in range(rows):
        engine.add_request(r, prompt, params)
    while engine.waiting or not all(s.decoding for s in engine.running):
        engine.step()
    return engine


def _time_window(engine: Engine, steps: int, in_thread: bool) -> tuple[float, float]:
    """(seconds per decode step, mean context attended) over `steps` steps of every row."""
    out = {}
    rows = len(engine.running)

    def work():
        before = engine.stats
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        out["s"] = (time.perf_counter() - start) / steps
        after = engine.stats
        decoded = after.decode_tokens - before.decode_tokens
        out["context"] = (after.decode_context_tokens - before.decode_context_tokens) / decoded
        out["decoded"] = decoded

    if in_thread:
        t = threading.Thread(target=work)
        t.start()
        t.join()
    else:
        work()
    if out["decoded"] != rows * steps or len(engine.running) != rows or engine.waiting:
        raise RuntimeError(f"a timed window decoded {out['decoded']} tokens where {rows} rows x {steps} steps "
                           f"= {rows * steps} were due: rows started or finished inside it, so its time is not "
                           "one step over every row")
    return out["s"], out["context"]


# The fused step's phases, in the order wallperf::step_profile returns them
# (csrc/decode_step.h, StepPhase); "outside" is the rest of an engine step
# (Python: batching, the embedding lookup, sampling).
PHASES = ("norm", "qkv", "rope_cache", "attend", "o_proj", "residual", "gate_up", "swiglu", "down", "head")


def _phases_ms(profile: torch.Tensor, step_s: float) -> dict:
    """ms per step in each phase, from step_profile's sums over a window."""
    values = profile.tolist()
    calls = values[-1] or 1
    split = {name: v / calls * 1e3 for name, v in zip(PHASES, values[:-1])}
    split["outside"] = step_s * 1e3 - sum(split.values())
    return split


def gemm_peak_tflops() -> float:
    """bf16 TFLOP/s of the kernel the engine runs, at `wallperf probe`'s CPU shape: the best of
    PEAK_CALLS calls. A roof is what the kernel can do; a median of a few calls on a shared
    machine understated it and flattered every compute-bound ratio."""
    s = CPU_SETTINGS
    return best_peak(torch.device("cpu"), "bfloat16", s.gemm_n, PEAK_CALLS, s.gemm_warmup)


def bench(model, eos, shape, rows=(1,), context: int = 300, tokens: int = 64, repeats: int = 3,
          paths=PATHS, threads=THREADS, copy_mib: int = 256) -> dict:
    load_before = os.getloadavg()[0]
    saved = os.environ.get("WALLPERF_FUSED_DECODE")
    prompt = [(i * 7919) % (model.cfg.vocab_size - 10) + 5 for i in range(context)]
    cases = [(r, p, t) for r in rows for p in paths for t in threads]
    seconds = {c: [] for c in cases}
    contexts = {c: [] for c in cases}
    peaks = []
    phases = {c: [] for c in cases}
    profiling = step_profile(False, True) is not None
    decode_steps = (repeats + 1) * len(threads) * tokens
    try:
        for r in rows:
            engines = {p: _engine(model, eos, p, r, prompt, decode_steps) for p in paths}
            for i in range(repeats + 1):
                for p in paths:
                    for t in threads:
                        profiled = bool(i) and p == "fused" and profiling
                        if profiled:
                            step_profile(True, True)
                        s, ctx = _time_window(engines[p], tokens, t == "worker")
                        if profiled:
                            phases[(r, p, t)].append(_phases_ms(step_profile(False, True), s))
                        if i:
                            seconds[(r, p, t)].append(s)
                            contexts[(r, p, t)].append(ctx)
                peak = gemm_peak_tflops()
                if i:
                    peaks.append(peak)
            del engines
    finally:
        if saved is None:
            os.environ.pop("WALLPERF_FUSED_DECODE", None)
        else:
            os.environ["WALLPERF_FUSED_DECODE"] = saved
    copy_gbps, triad_gbps = stream_bandwidth(torch.device("cpu"), copy_mib, 5)
    read_gbps = read_bandwidth(torch.device("cpu"), copy_mib, 5)
    peak = max(peaks)
    out = []
    for (r, p, t), times in seconds.items():
        median, ctx = statistics.median(times), statistics.mean(contexts[(r, p, t)])
        nbytes, flops = step_bytes(model, ctx, r), r * flops_per_token(shape, ctx)
        memory_s, compute_s = nbytes / (read_gbps * 1e9), flops / (peak * 1e12)
        roof = max(memory_s, compute_s)
        split = {name: statistics.median(x[name] for x in phases[(r, p, t)]) for name in PHASES + ("outside",)} \
            if phases[(r, p, t)] else None
        out.append({"rows": r, "path": p, "thread": t, "context": ctx, "ms_per_step": median * 1e3,
                    "phases_ms": split,
                    "tokens_per_second": r / median, "gbps": nbytes / median / 1e9,
                    "fraction_of_copy": nbytes / median / 1e9 / copy_gbps, "tflops": flops / median / 1e12,
                    "fraction_of_peak": flops / median / 1e12 / peak, "best_ms_per_step": min(times) * 1e3,
                    "roofline_ms": roof * 1e3, "bound": "memory" if memory_s >= compute_s else "compute",
                    "roofline_ratio": median / roof})
    # Other work on the cores stretches every step and every wall measurement
    # unevenly: the report says how busy the machine was.
    load = (load_before, os.getloadavg()[0])
    return {"context": context, "tokens": tokens, "repeats": repeats, "threads": torch.get_num_threads(),
            "load_average": load, "cores": os.cpu_count(),
            "cpu_isa": cpu_isa(), "weight_bytes": step_bytes(model, 0), "read_gbps": read_gbps,
            "copy_gbps": copy_gbps, "triad_gbps": triad_gbps, "gemm_peak_tflops": peak, "gemm_peak_samples": peaks,
            "gemm_n": CPU_SETTINGS.gemm_n, "target_ratio": TARGET_RATIO, "rows": out}


def format_report(report: dict, model_name: str) -> str:
    peaks = ", ".join(f"{p:.3f}" for p in report["gemm_peak_samples"])
    lines = [f"{model_name} bf16, windows of {report['tokens']} decode steps after a {report['context']}-token "
             f"prompt per row; {report['weight_bytes'] / 1e6:.1f} MB of weights read per step; "
             f"{report['threads']} threads; CPU kernels: {report['cpu_isa']}; load average "
             f"{report['load_average'][0]:.1f} before, {report['load_average'][1]:.1f} after, on {report['cores']} cores",
             f"walls, same run: read-only {report['read_gbps']:.1f} GB/s, STREAM copy {report['copy_gbps']:.1f} GB/s "
             f"(triad {report['triad_gbps']:.1f}); kernel peak {report['gemm_peak_tflops']:.3f} TFLOP/s "
             f"(n={report['gemm_n']}, the best of passes: {peaks})",
             f"{'rows':>4s} {'path':6s}{'thread':>7s}{'context':>8s}{'ms/step':>9s}{'roof ms':>8s}{'ratio':>6s}"
             f"{'bound':>8s}{'tok/s':>8s}{'GB/s':>7s}{'of copy':>8s}{'TFLOP/s':>8s}{'of peak':>8s}{'best ms':>9s}"]
    for r in report["rows"]:
        lines.append(f"{r['rows']:4d} {r['path']:6s}{r['thread']:>7s}{r['context']:8.0f}{r['ms_per_step']:9.2f}"
                     f"{r['roofline_ms']:8.2f}{r['roofline_ratio']:6.2f}{r['bound']:>8s}"
                     f"{r['tokens_per_second']:8.1f}{r['gbps']:7.1f}{r['fraction_of_copy']:8.0%}"
                     f"{r['tflops']:8.3f}{r['fraction_of_peak']:8.0%}{r['best_ms_per_step']:9.2f}")
    split = [r for r in report["rows"] if r.get("phases_ms")]
    if split:
        lines.append("where a fused step's time goes, ms (medians over the passes):")
        names = PHASES + ("outside",)
        lines.append(f"{'rows':>4s} {'thread':>7s}" + "".join(f"{n:>11s}" for n in names))
        for r in split:
            lines.append(f"{r['rows']:4d} {r['thread']:>7s}" + "".join(f"{r['phases_ms'][n]:11.2f}" for n in names))
    lines.append(f"medians over {report['repeats']} passes after one warm-up pass; roof ms = max(bytes / read-only "
                 f"bandwidth, FLOPs / kernel peak), FLOPs counting weights and attention at the context; "
                 f"aim: ratio <= {report['target_ratio']}")
    return "\n".join(lines)


def _rows(p: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        rows = [int(v) for v in text.split(",")]
    except ValueError:
        p.error(f"--rows takes comma-separated integers, got {text!r}")
    bad = [r for r in rows if not 1 <= r <= MAX_FUSED_ROWS]
    if bad:
        p.error(f"--rows must be between 1 and {MAX_FUSED_ROWS} (the fused step's largest batch), got {bad[0]}")
    return rows


def _choices(p: argparse.ArgumentParser, flag: str, text: str, allowed) -> list[str]:
    chosen = text.split(",")
    if any(c not in allowed for c in chosen) or len(set(chosen)) != len(chosen):
        p.error(f"--{flag} takes {' and/or '.join(allowed)}, comma-separated, got {text!r}")
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wallperf bench decode", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model name from conf/models (a checkpoint)")
    p.add_argument("--rows", default=",".join(map(str, ROWS)),
                   help=f"decode batch sizes, comma-separated (default {','.join(map(str, ROWS))})")
    p.add_argument("--paths", default="fused", help="steps to time: fused, eager or both (default fused)")
    p.add_argument("--threads", default="worker",
                   help="threads to step from: worker (as a run's SUT thread), main, or both (default worker)")
    p.add_argument("--context", type=positive(int), default=300, help="prompt tokens per row before decoding "
                   "(default 300)")
    p.add_argument("--tokens", type=positive(int), default=64, help="decode steps per timed window (default 64)")
    p.add_argument("--repeats", type=positive(int), default=3, help="timed passes (default 3)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    rows = _rows(p, args.rows)
    paths, threads = _choices(p, "paths", args.paths, PATHS), _choices(p, "threads", args.threads, THREADS)
    if forced_isa_problem():
        p.error(forced_isa_problem())
    from wallperf.harness.artifacts import resolve_model_file
    from wallperf.harness.config import load_model_config
    from wallperf.sut.loading.load import load_model

    model_config = load_model_config(args.model)
    if model_config.shape is None:
        p.error(f"conf/models/{args.model}.yaml has no 'shape': the FLOP count needs the published shape")
    loaded = load_model(resolve_model_file(model_config), "bfloat16")
    eos = [loaded.tokenizer.eos_token_id]
    report = bench(loaded.model, eos, model_config.shape, rows, args.context, args.tokens, args.repeats, paths,
                   threads)
    print(json.dumps(report, indent=2) if args.json else format_report(report, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
