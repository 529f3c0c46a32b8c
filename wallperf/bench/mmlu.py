"""`wallperf bench mmlu`: the audit's MMLU scoring against HF transformers on the same questions.

Both score the same requests (context ids and the four answers' ids, as the
audit prepares them) with the same weights (HF's model is built on the native
model's tensors, sut.backends.hf.build_hf_model), side by side in one process:

- native: audit.scoring, questions packed into rows of --max-tokens tokens,
  each context run once for its answers, logits only where an answer token is
  predicted;
- hf: transformers as lm-evaluation-harness drives it: one row per context and
  answer prefix (a context alone when every answer is one token, as lm-eval
  caches one-token continuations), rows sorted by length and batched up to the
  same token budget, left-padded, logits for the last positions only.

Each pass alternates the two, so drift in the machine's load hits both; the
figures are questions/s per pass and their median ratio. It also checks that
both pick the same answers and prints the largest log-likelihood difference.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from wallperf.harness.config import positive


def hf_loglikelihoods(hf_model, requests, max_tokens: int, pad_id: int = 0) -> list[tuple]:
    """Log-likelihoods of each request's continuations by HF transformers (see the module docstring)."""
    rows = []  # (request, which answers this row scores, token ids)
    for r, (ctx, conts) in enumerate(requests):
        if all(len(c) == 1 for c in conts):
            rows.append((r, tuple(range(len(conts))), ctx))
        else:
            rows += [(r, (a,), ctx + c[:-1]) for a, c in enumerate(conts)]
    out = [[0.0] * len(conts) for _, conts in requests]
    rows.sort(key=lambda row: -len(row[2]))
    start = 0
    while start < len(rows):
        width = len(rows[start][2])
        batch = rows[start: start + max(1, max_tokens // width)]
        start += len(batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (_, _, row_ids) in enumerate(batch):
            ids[i, width - len(row_ids):] = torch.tensor(row_ids)
            mask[i, width - len(row_ids):] = 1
        keep = max(max(len(requests[r][1][a]) for a in answers) for r, answers, _ in batch)
        with torch.inference_mode():
            logits = hf_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                              logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.double(), dim=-1)  # (B, keep, V): the last `keep` positions
        for i, (r, answers, _) in enumerate(batch):
            for a in answers:
                cont = requests[r][1][a]
                # The answer's tokens are predicted by the last len(cont) positions of the row.
                first = keep - len(cont)
                out[r][a] = float(sum(logp[i, first + k, t] for k, t in enumerate(cont)))
    return [tuple(lls) for lls in out]


def bench(loaded, questions, fmt: str, max_tokens: int, repeats: int) -> dict:
    from wallperf.audit.mmlu import decision_scores, prepare
    from wallperf.audit.scoring import score_requests
    from wallperf.sut.backends.hf import build_hf_model

    requests = prepare(loaded.tokenizer, questions, fmt, max_position=loaded.model.cfg.max_position)
    hf = build_hf_model(loaded.model)
    runs = {"native": lambda: score_requests(loaded.model, requests, max_tokens),
            "hf": lambda: hf_loglikelihoods(hf, requests, max_tokens)}
    rates, results = {name: [] for name in runs}, {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            rates[name].append(len(questions) / (time.perf_counter() - start))

    def picks(lls):
        return [max(range(4), key=decision_scores(ll, q, fmt).__getitem__) for ll, q in zip(lls, questions)]

    same = sum(a == b for a, b in zip(picks(results["native"]), picks(results["hf"])))
    gap = max(abs(a - b) for x, y in zip(results["native"], results["hf"]) for a, b in zip(x, y))
    return {"questions": len(questions), "format": fmt, "dtype": loaded.dtype, "max_tokens": max_tokens,
            "threads": torch.get_num_threads(),
            "tokens": sum(len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in requests),
            "native_questions_per_second": statistics.median(rates["native"]),
            "hf_questions_per_second": statistics.median(rates["hf"]),
            "speedup": statistics.median(n / h for n, h in zip(rates["native"], rates["hf"])),
            "same_answers": same, "max_loglikelihood_difference": gap}


def format_report(report: dict, model: str) -> str:
    r = report
    return "\n".join([
        f"MMLU scoring, {model} {r['dtype']}, {r['format']} format, {r['questions']} questions "
        f"({r['tokens']} tokens), {r['threads']} threads, rows of {r['max_tokens']} tokens",
        f"  native (packed prefill)   {r['native_questions_per_second']:7.2f} questions/s",
        f"  HF transformers (batched) {r['hf_questions_per_second']:7.2f} questions/s",
        f"  native / HF               {r['speedup']:7.2f}x (median of the passes' ratios)",
        f"  same answers {r['same_answers']}/{r['questions']}; largest log-likelihood difference "
        f"{r['max_loglikelihood_difference']:.3g} nats"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wallperf bench mmlu", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model name from conf/models (a checkpoint)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--format", default="letter", choices=("letter", "cloze"), dest="fmt")
    p.add_argument("--questions", type=positive(int), default=64, help="questions, drawn as the audit draws them")
    p.add_argument("--max-tokens", type=positive(int), default=1024, help="tokens per forward pass, both "
                   "(default 1024)")
    p.add_argument("--repeats", type=positive(int), default=3, help="timed passes of each (default 3)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    from wallperf.audit.gate import draw_order
    from wallperf.harness.artifacts import resolve_dataset_file, resolve_model_file
    from wallperf.harness.config import load_dataset_config, load_model_config
    from wallperf.harness.loadgen.qsl import load_mmlu
    from wallperf.sut.loading.load import load_model

    pool = load_mmlu(resolve_dataset_file(load_dataset_config("mmlu")))
    questions = [pool[i] for i in draw_order(len(pool))[: args.questions]]
    loaded = load_model(resolve_model_file(load_model_config(args.model)), args.dtype)
    report = bench(loaded, questions, args.fmt, args.max_tokens, args.repeats)
    print(json.dumps(report, indent=2) if args.json else format_report(report, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
