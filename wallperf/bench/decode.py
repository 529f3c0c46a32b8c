"""`wallperf bench decode`: the native engine's decode step against the memory wall and the GEMM peak.

A decode step over R rows reads every weight once (plus each row's KV cache)
and does 2 FLOPs per weight per row (plus attention). At one row its speed is
the speed of streaming the weights: bytes per step / seconds per step is the
bandwidth it achieves, set against STREAM copy. With more rows each weight
loaded serves more FLOPs, and from some R on the step is bound by the
multiplier instead: FLOPs per step / seconds per step is set against the bf16
GEMM peak, measured by `wallperf probe`'s own GEMM (harness.hardware.probe).
This benchmark times the engine's decode steps with the fused C++ step
(kernels/cpu_decode.py) and with the eager PyTorch step, side by side in one
process, on the real model, from the thread that calls them in a run (the
SUT's worker thread) and from the main thread, and measures copy bandwidth and
the GEMM peak in the same run.

- Per row count, one engine per path prefills R prompts of --context tokens
  (untimed); then each pass times a window of --tokens decode steps per path
  and thread, in turn, and measures the GEMM peak once, so drift in the
  machine's load hits all alike. Figures are medians over passes after one
  warm-up pass. The context grows by a window's steps each window; the table
  gives the mean context the timed steps attended over.
- FLOPs per row: the roofline's count (harness.hardware.counts.flops_per_token:
  twice the weights a token multiplies through, plus attention at the context).
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
from wallperf.harness.hardware.probe import CPU_SETTINGS, gemm_tflops, stream_bandwidth
from wallperf.harness.hardware.counts import flops_per_token
from wallperf.kernels.cpu_decode import MAX_FUSED_ROWS
from wallperf.sut.engine.engine import Engine, SamplingParams

PATHS = ("fused", "eager")
THREADS = ("worker", "main")


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
    """An engine on `path` holding `rows` sequences that have all finished prefill."""
    os.environ["WALLPERF_FUSED_DECODE"] = "1" if path == "fused" else "0"
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

    def work():
        before = engine.stats
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        out["s"] = (time.perf_counter() - start) / steps
        after = engine.stats
        out["context"] = ((after.decode_context_tokens - before.decode_context_tokens)
                          / (after.decode_tokens - before.decode_tokens))

    if in_thread:
        t = threading.Thread(target=work)
        t.start()
        t.join()
    else:
        work()
    return out["s"], out["context"]


def gemm_peak_tflops() -> float:
    """bf16 GEMM TFLOP/s as `wallperf probe` measures it for the CPU profile."""
    s = CPU_SETTINGS
    return gemm_tflops(torch.device("cpu"), "bfloat16", s.gemm_n, s.gemm_repeats, s.gemm_warmup)


def bench(model, eos, shape, rows=(1,), context: int = 300, tokens: int = 64, repeats: int = 3,
          paths=PATHS, threads=THREADS, copy_mib: int = 256) -> dict:
    saved = os.environ.get("WALLPERF_FUSED_DECODE")
    prompt = [(i * 7919) % (model.cfg.vocab_size - 10) + 5 for i in range(context)]
    cases = [(r, p, t) for r in rows for p in paths for t in threads]
    seconds = {c: [] for c in cases}
    contexts = {c: [] for c in cases}
    peaks = []
    decode_steps = (repeats + 1) * len(threads) * tokens
    try:
        for r in rows:
            engines = {p: _engine(model, eos, p, r, prompt, decode_steps) for p in paths}
            for i in range(repeats + 1):
                for p in paths:
                    for t in threads:
                        s, ctx = _time_window(engines[p], tokens, t == "worker")
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
    peak = statistics.median(peaks)
    out = []
    for (r, p, t), times in seconds.items():
        median, ctx = statistics.median(times), statistics.mean(contexts[(r, p, t)])
        gbps = step_bytes(model, ctx, r) / median / 1e9
        tflops = r * flops_per_token(shape, ctx) / median / 1e12
        out.append({"rows": r, "path": p, "thread": t, "context": ctx, "ms_per_step": median * 1e3,
                    "tokens_per_second": r / median, "gbps": gbps, "fraction_of_copy": gbps / copy_gbps,
                    "tflops": tflops, "fraction_of_peak": tflops / peak, "best_ms_per_step": min(times) * 1e3})
    return {"context": context, "tokens": tokens, "repeats": repeats, "threads": torch.get_num_threads(),
            "weight_bytes": step_bytes(model, 0), "copy_gbps": copy_gbps, "triad_gbps": triad_gbps,
            "gemm_peak_tflops": peak, "gemm_peak_samples": peaks, "gemm_n": CPU_SETTINGS.gemm_n, "rows": out}


def format_report(report: dict, model_name: str) -> str:
    peaks = ", ".join(f"{p:.3f}" for p in report["gemm_peak_samples"])
    lines = [f"{model_name} bf16, windows of {report['tokens']} decode steps after a {report['context']}-token "
             f"prompt per row; {report['weight_bytes'] / 1e6:.1f} MB of weights read per step; "
             f"{report['threads']} threads",
             f"walls, same run: STREAM copy {report['copy_gbps']:.1f} GB/s (triad {report['triad_gbps']:.1f}); "
             f"bf16 GEMM peak {report['gemm_peak_tflops']:.3f} TFLOP/s (torch.matmul n={report['gemm_n']}, "
             f"median of passes: {peaks})",
             f"{'rows':>4s} {'path':6s}{'thread':>7s}{'context':>8s}{'ms/step':>9s}{'tok/s':>8s}{'GB/s':>7s}"
             f"{'of copy':>8s}{'TFLOP/s':>8s}{'of peak':>8s}{'best ms':>9s}"]
    for r in report["rows"]:
        lines.append(f"{r['rows']:4d} {r['path']:6s}{r['thread']:>7s}{r['context']:8.0f}{r['ms_per_step']:9.2f}"
                     f"{r['tokens_per_second']:8.1f}{r['gbps']:7.1f}{r['fraction_of_copy']:8.0%}"
                     f"{r['tflops']:8.3f}{r['fraction_of_peak']:8.0%}{r['best_ms_per_step']:9.2f}")
    lines.append(f"medians over {report['repeats']} passes after one warm-up pass; TFLOP/s counts the roofline's "
                 f"FLOPs (weights and attention at the context)")
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
    p.add_argument("--rows", default="1", help="decode batch sizes, comma-separated (default 1), e.g. 1,8,32,64")
    p.add_argument("--paths", default=",".join(PATHS), help="steps to time: fused, eager or both (default both)")
    p.add_argument("--threads", default=",".join(THREADS),
                   help="threads to step from: worker (as a run's SUT thread), main, or both (default both)")
    p.add_argument("--context", type=positive(int), default=300, help="prompt tokens per row before decoding "
                   "(default 300)")
    p.add_argument("--tokens", type=positive(int), default=64, help="decode steps per timed window (default 64)")
    p.add_argument("--repeats", type=positive(int), default=3, help="timed passes (default 3)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    rows = _rows(p, args.rows)
    paths, threads = _choices(p, "paths", args.paths, PATHS), _choices(p, "threads", args.threads, THREADS)
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
