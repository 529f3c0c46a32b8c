"""`wallperf bench decode`: the native engine's batch-1 decode step against the memory wall.

SingleStream's figure of merit is the time per output token at batch 1, and a
decode step at batch 1 must read every weight once (plus the KV cache so far):
bytes per token / seconds per token is the bandwidth the step achieves, and
its ratio to the machine's streaming bandwidth is the MBU. This benchmark
times the engine's decode steps with the fused C++ step (kernels/cpu_decode.py)
and with the eager PyTorch step, side by side in one process, on the real
model, from the thread that calls them in a run (the SUT's worker thread) and
from the main thread, and measures STREAM copy bandwidth in the same run.

- Each pass prefills a prompt of --context tokens (untimed), then times
  --tokens decode steps; figures are medians over passes after one warm-up.
- Paths alternate within each pass, so drift in the machine's load hits all.
- Bytes per token: every weight a step reads (the tied LM head counts once,
  the embedding lookup one row) plus the K and V read at the mean context.
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

from harness.hardware.probe import stream_bandwidth
from sut.engine import Engine, SamplingParams

PATHS = ("fused", "eager")


def step_bytes(model, context: float) -> float:
    """Bytes one batch-1 decode step reads at a given context length."""
    cfg = model.cfg
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    row = model.embed_tokens.weight[0]
    if model.lm_head is not None:  # untied: the embedding table is read one row at a time
        weights -= model.embed_tokens.weight.numel() * row.element_size() - row.numel() * row.element_size()
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * row.element_size() * context
    return weights + kv


def _time_decode(model, eos, prompt, tokens: int, path: str, in_thread: bool) -> float:
    """Seconds per decode step of one request, prefill excluded."""
    os.environ["WALLPERF_FUSED_DECODE"] = "1" if path == "fused" else "0"
    engine = Engine(model, eos, max_batch=1, max_seq_len=len(prompt) + tokens + 1, num_blocks=None,
                    kv_memory_fraction=0.05)
    if path == "fused" and not engine.decode_path.startswith("fused"):
        raise RuntimeError(engine.decode_path)
    engine.add_request(0, prompt, SamplingParams(max_new_tokens=tokens + 1, min_new_tokens=tokens + 1,
                                                 ignore_eos=True))
    out = {}

    def work():
        engine.step()  # prefill and the first token
        start = time.perf_counter()
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        out["s"] = (time.perf_counter() - start) / steps

    if in_thread:
        t = threading.Thread(target=work)
        t.start()
        t.join()
    else:
        work()
    return out["s"]


def bench(model, eos, context: int = 300, tokens: int = 64, repeats: int = 3, copy_mib: int = 256) -> dict:
    saved = os.environ.get("WALLPERF_FUSED_DECODE")
    prompt = [(i * 7919) % (model.cfg.vocab_size - 10) + 5 for i in range(context)]
    cases = [(p, thread) for p in PATHS for thread in (True, False)]
    seconds = {c: [] for c in cases}
    try:
        for i in range(repeats + 1):
            for path, thread in cases:
                s = _time_decode(model, eos, prompt, tokens, path, thread)
                if i:
                    seconds[(path, thread)].append(s)
    finally:
        if saved is None:
            os.environ.pop("WALLPERF_FUSED_DECODE", None)
        else:
            os.environ["WALLPERF_FUSED_DECODE"] = saved
    copy_gbps, triad_gbps = stream_bandwidth(torch.device("cpu"), copy_mib, 5)
    nbytes = step_bytes(model, context + tokens / 2)
    rows = []
    for (path, thread), times in seconds.items():
        median = statistics.median(times)
        gbps = nbytes / median / 1e9
        rows.append({"path": path, "thread": "worker" if thread else "main", "ms_per_token": median * 1e3,
                     "tokens_per_second": 1 / median, "gbps": gbps, "fraction_of_copy": gbps / copy_gbps,
                     "best_ms_per_token": min(times) * 1e3})
    return {"context": context, "tokens": tokens, "repeats": repeats, "threads": torch.get_num_threads(),
            "bytes_per_token": nbytes, "copy_gbps": copy_gbps, "triad_gbps": triad_gbps, "rows": rows}


def format_report(report: dict, model_name: str) -> str:
    lines = [f"{model_name} bf16, batch 1, {report['tokens']} decode steps after a {report['context']}-token "
             f"prompt; {report['bytes_per_token'] / 1e6:.1f} MB read per step; {report['threads']} threads",
             f"wall: STREAM copy {report['copy_gbps']:.1f} GB/s (triad {report['triad_gbps']:.1f}), same run",
             f"{'path':8s}{'thread':>8s}{'ms/token':>10s}{'tok/s':>8s}{'GB/s':>7s}{'of copy':>9s}{'best ms':>9s}"]
    for r in report["rows"]:
        lines.append(f"{r['path']:8s}{r['thread']:>8s}{r['ms_per_token']:10.2f}{r['tokens_per_second']:8.1f}"
                     f"{r['gbps']:7.1f}{r['fraction_of_copy']:9.0%}{r['best_ms_per_token']:9.2f}")
    lines.append(f"medians over {report['repeats']} passes after one warm-up pass")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wallperf bench decode", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model name from conf/models (a checkpoint)")
    p.add_argument("--context", type=int, default=300, help="prompt tokens before decoding (default 300)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps timed per pass (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per path (default 3)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    for name in ("context", "tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    from harness.artifacts import resolve_model_file
    from harness.config import load_model_config
    from sut.loading import load_model

    loaded = load_model(resolve_model_file(load_model_config(args.model)), "bfloat16")
    eos = [loaded.tokenizer.eos_token_id]
    report = bench(loaded.model, eos, args.context, args.tokens, args.repeats)
    print(json.dumps(report, indent=2) if args.json else format_report(report, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
