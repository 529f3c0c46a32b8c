"""`wallperf audit speculative`: is a backend's speculative decoding greedy decoding,
token for token?

MLPerf admits speculative decoding only where the output equals greedy decoding's.
The audit runs a reference (the same backend without speculation, or a file of
saved outputs) and a candidate (with speculation) greedily on the same prompts,
one request at a time (SingleStream) and alternating between the two so that
both see the same machine load, and reports:

- the share of outputs identical token for token, and the verdict: PASS only at
  100% (or at `--min-identical`, printed beside the verdict when set);
- per divergent output, the first divergent position, the tokens on both sides
  and, where the backend exposes logits (native), the margin between the top two
  logits there: a tiny margin is a numerics difference, a large one a logic bug;
- tokens/s of both, and for the native engine the drafter's acceptance figures
  and the roofline's prediction of the speedup from them (`predicted_speedup`).

Exit status: 0 PASS, 1 FAIL, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from wallperf.audit.speculative_prompts import audit_prompts, parse_prompt_sets

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


@dataclass(frozen=True)
class Divergence:
    prompt: str
    position: int
    reference_token: int | None
    candidate_token: int | None
    # Top-1 minus top-2 logit at that position, on each side, where known.
    reference_margin: float | None = None
    candidate_margin: float | None = None


@dataclass
class SpecAudit:
    prompts: int
    identical: int
    divergences: list
    min_identical: float | None = None
    figures: dict = field(default_factory=dict)

    @property
    def share_identical(self) -> float:
        return self.identical / self.prompts if self.prompts else 0.0

    @property
    def verdict(self) -> str:
        return "PASS" if self.prompts and self.share_identical >= (self.min_identical or 1.0) else "FAIL"

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "prompts": self.prompts, "identical": self.identical,
                "share_identical": self.share_identical, "min_identical": self.min_identical,
                "divergences": [d.__dict__ for d in self.divergences], "figures": self.figures}

    def summary(self) -> str:
        rule = f" (--min-identical {self.min_identical:.4f})" if self.min_identical is not None else \
            " (MLPerf: 100% identical)"
        lines = [f"speculative exactness: {self.identical}/{self.prompts} outputs identical "
                 f"({100 * self.share_identical:.2f}%) -> {self.verdict}{rule}"]
        if self.divergences:
            lines.append("prompt | first divergent position | reference token | candidate token | margins (ref, cand)")
            for d in self.divergences:
                margins = ", ".join("-" if m is None else f"{m:.4g}" for m in (d.reference_margin, d.candidate_margin))
                lines.append(f"{d.prompt} | {d.position} | {d.reference_token} | {d.candidate_token} | {margins}")
        for key, value in self.figures.items():
            lines.append(f"{key}: {json.dumps(value)}")
        return "\n".join(lines)


def results_record(result: SpecAudit, args) -> dict:
    """The audit as a results.json with one SingleStream run: its tokens/s, and a
    `speculative` section with the figures and the exactness verdict that
    audit.perf_audit checks (a speedup above the prediction, or without exactness)."""
    f = result.figures
    return {"complete": True, "runs": [{
        "scenario": "SingleStream", "mode": "performance", "model": args.model, "backend": args.backend,
        "dtype": args.dtype, "metrics": {"tokens_per_second": f.get("candidate_tokens_per_s")},
        "speculative": {**f, "tokens_per_second": f.get("candidate_tokens_per_s"),
                        "baseline_tokens_per_second": f.get("reference_tokens_per_s"),
                        "exactness": {"verdict": result.verdict, "share_identical": result.share_identical,
                                      "identical": result.identical, "prompts": result.prompts,
                                      "prompt_sets": args.prompts, "max_new_tokens": args.max_new_tokens}}}]}


def compare(reference: dict, candidate: dict, ref_margins: dict | None = None, cand_margins: dict | None = None,
            min_identical: float | None = None) -> SpecAudit:
    """Token lists per prompt id on both sides (the same ids) -> the audit."""
    if set(reference) != set(candidate):
        missing = sorted(set(reference) ^ set(candidate))[:3]
        raise ValueError(f"reference and candidate cover different prompts (e.g. {missing})")
    divergences, identical = [], 0
    for pid in reference:
        ref, cand = list(reference[pid]), list(candidate[pid])
        if ref == cand:
            identical += 1
            continue
        pos = next((i for i, (a, b) in enumerate(zip(ref, cand)) if a != b), min(len(ref), len(cand)))
        at = lambda seq, i: seq[i] if i < len(seq) else None  # noqa: E731
        margin = lambda m: (m or {}).get(pid, [])[pos] if pos < len((m or {}).get(pid, [])) else None  # noqa: E731
        divergences.append(Divergence(str(pid), pos, at(ref, pos), at(cand, pos), margin(ref_margins),
                                      margin(cand_margins)))
    return SpecAudit(len(reference), identical, divergences, min_identical)


def top2_margin(logits) -> float:
    top = logits.topk(2).values
    return float(top[0] - top[1])


def run_greedy(backend, prompts: dict, max_new_tokens: int) -> tuple[dict, dict, float]:
    """Tokens and per-token margins (native only) per prompt, one request at a time,
    and the seconds spent generating."""
    from wallperf.sut.engine.sequence import SamplingParams

    tokens, margins, seconds = {}, {}, 0.0
    for rid, (pid, ids) in enumerate(prompts.items()):
        m = []
        if hasattr(backend, "on_logits"):
            backend.on_logits = lambda _rid, row: m.append(top2_margin(row))
        out = []
        t0 = time.perf_counter()
        backend.add_request(rid, ids, SamplingParams(max_new_tokens=max_new_tokens))
        while backend.has_unfinished():
            out.extend(ev.token_id for ev in backend.step())
        seconds += time.perf_counter() - t0
        tokens[pid], margins[pid] = out, m
    return tokens, margins, seconds


def weight_bytes(model) -> int:
    """Bytes a decode step reads of `model`'s weights: all but the embedding table,
    which a step gathers one row of (unless it is also the head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def draft_step_bytes(drafter) -> int:
    """Weight bytes one step of a draft model reads: its weights, less the head rows
    a limited draft vocabulary skips (sut.engine.speculative.DraftModelDrafter)."""
    return weight_bytes(drafter.model) - drafter.head_bytes_skipped


def predicted_speedup(target_bytes: int, draft_bytes: int, k: float, mean_acceptance_length: float) -> float:
    """The memory wall's speedup: without speculation a token costs one read of the
    target's weights; with it, a verify step reads them once and the drafter's k
    times, and emits `mean_acceptance_length` tokens."""
    return target_bytes * mean_acceptance_length / (target_bytes + k * draft_bytes)


def add_parser(subparsers=None) -> argparse.ArgumentParser:
    kw = dict(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
              epilog="exit status: 0 PASS, 1 FAIL, 2 bad input")
    a = subparsers.add_parser("speculative", **kw) if subparsers else argparse.ArgumentParser(
        prog="wallperf audit speculative", **kw)
    a.add_argument("--backend", choices=("native", "openai"), default="native",
                   help="native: this engine with and without speculation; openai: two servers (e.g. vLLM "
                        "with and without --speculative-config), or one against --reference-file")
    a.add_argument("--model", required=True, help="target model (conf/models name, or a GGUF file or HF folder): "
                   "the native engine's weights, or the tokenizer that makes an openai backend's token ids")
    a.add_argument("--reference-endpoint", metavar="URL", help="openai: the server without speculation")
    a.add_argument("--candidate-endpoint", metavar="URL", help="openai: the server with speculation")
    a.add_argument("--served-model", metavar="NAME", help="openai: the model name the servers serve (default --model)")
    a.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    a.add_argument("--draft-model", metavar="NAME", help="draft model (conf/models name), same tokenizer")
    a.add_argument("--draft", choices=("model", "ngram"), help="drafter (default: model with --draft-model)")
    a.add_argument("--num-draft-tokens", type=int, default=4, metavar="K")
    a.add_argument("--adaptive", action="store_true", help="adapt k per sequence within 1..K")
    a.add_argument("--draft-vocab", type=int, metavar="N", help="the draft model proposes only the first N token "
                   "ids (its head reads only those rows); the output must stay identical")
    a.add_argument("--reference-file", type=Path, help="saved outputs ({\"outputs\": {id: [tokens]}}) as the "
                   "reference instead of the engine without speculation")
    a.add_argument("--save", type=Path, help="write the candidate's outputs here (a later --reference-file)")
    a.add_argument("--prompts", default="humaneval", metavar="SETS",
                   help="humaneval, mmlu, sharegpt, or several comma-separated (taken in turn, prompt by "
                        "prompt): audit/speculative_prompts.py")
    a.add_argument("--num-prompts", type=int, default=200, help="this many prompts (HumanEval has 164, and each "
                   "again as a chat turn: 328; MMLU 14,042; ShareGPT thousands)")
    a.add_argument("--max-new-tokens", type=int, default=64)
    a.add_argument("--max-seconds", type=float, metavar="S", help="start no prompt after S seconds: the audit "
                   "covers the prompts done by then (its count is printed) instead of all --num-prompts")
    a.add_argument("--min-identical", type=float, help="pass at this share in [0, 1] (MLPerf: 1)")
    a.add_argument("--json", action="store_true")
    a.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines on stderr")
    a.add_argument("--out", type=Path, help="also write the figures and verdict as a results.json here "
                   "(a SingleStream run record with a 'speculative' section, for the perf audit)")
    return a


def _model_path(name: str) -> Path:
    """A conf/models name's verified file, or a GGUF file or HF folder given as a path."""
    from wallperf.harness.artifacts import resolve_model_file
    from wallperf.harness.config.load import load_model_config

    path = Path(name)
    return path if path.exists() else resolve_model_file(load_model_config(name))


def _native(args, max_len_of):
    """The native engine's reference (no speculation) and candidate, and what the figures need."""
    from wallperf.sut.engine.engine import Engine
    from wallperf.sut.engine.speculative import DraftModelDrafter, NgramDrafter, Speculation
    from wallperf.sut.loading.load import load_model

    drafter_kind = args.draft or ("model" if args.draft_model else None)
    if drafter_kind is None or (drafter_kind == "model" and not args.draft_model):
        raise ValueError("the native candidate needs --draft-model NAME or --draft ngram")
    target = load_model(_model_path(args.model), args.dtype)
    prompts = audit_prompts(target.tokenizer, parse_prompt_sets(args.prompts), args.num_prompts)
    max_len = max_len_of(prompts)
    draft_bytes, drafter, name = 0, NgramDrafter(), "ngram (prompt lookup)"
    if drafter_kind == "model":
        draft = load_model(_model_path(args.draft_model), args.dtype)
        drafter = DraftModelDrafter(draft.model, 1, max_len, args.num_draft_tokens, "cpu", vocab=args.draft_vocab)
        draft_bytes, name = draft_step_bytes(drafter), f"draft model {args.draft_model}"
        if drafter.vocab is not None:
            name += f", first {drafter.vocab} token ids"
    eos = target.tokenizer.eos_token_ids
    cand = Engine(target.model, eos, 1, max_len, speculation=Speculation(drafter, args.num_draft_tokens, args.adaptive))
    ref = None if args.reference_file else Engine(target.model, eos, 1, max_len)
    figures = {"drafter": name, "verify_path": cand.runner.verify_path,
               "target_bytes_per_verify_step": weight_bytes(target.model), "draft_bytes_per_step": draft_bytes}
    return prompts, ref, cand, figures


def _openai(args):
    """Two servers (or one and a saved file) behind the OpenAI completions API; the
    model's own tokenizer makes the token ids they are sent."""
    from wallperf.sut.backends.openai import OpenAIBackend
    from wallperf.sut.loading.load import load_tokenizer

    if not args.candidate_endpoint or not (args.reference_endpoint or args.reference_file):
        raise ValueError("--backend openai needs --candidate-endpoint URL and --reference-endpoint URL "
                         "(or --reference-file)")
    tokenizer = load_tokenizer(_model_path(args.model))
    served = args.served_model or args.model
    make = lambda url: OpenAIBackend([url], served, max_concurrency=1, tokenizer=tokenizer)  # noqa: E731
    ref = make(args.reference_endpoint) if args.reference_endpoint and not args.reference_file else None
    return (audit_prompts(tokenizer, parse_prompt_sets(args.prompts), args.num_prompts), ref,
            make(args.candidate_endpoint), {})


def run(args) -> SpecAudit:
    if args.num_draft_tokens < 1 or args.max_new_tokens < 1 or args.num_prompts < 1:
        raise ValueError("--num-draft-tokens, --max-new-tokens and --num-prompts must be >= 1")
    parse_prompt_sets(args.prompts)
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise ValueError(f"--max-seconds {args.max_seconds}: give a positive number of seconds")
    if args.min_identical is not None and not 0 <= args.min_identical <= 1:
        raise ValueError(f"--min-identical {args.min_identical}: give a share in [0, 1]")
    if args.draft_vocab is not None and (args.backend != "native" or args.draft == "ngram" or not args.draft_model):
        raise ValueError("--draft-vocab limits the native engine's draft model (--draft-model NAME)")
    if args.draft_vocab is not None and args.draft_vocab < 16:
        raise ValueError(f"--draft-vocab {args.draft_vocab}: give at least 16 token ids")
    if args.backend == "native":
        prompts, ref_backend, cand_backend, figures = _native(
            args, lambda ps: max(len(p) for p in ps.values()) + args.max_new_tokens)
    else:
        prompts, ref_backend, cand_backend, figures = _openai(args)
    # One untimed request on each side first: one-time costs (a kernel's first build
    # or weight packing, first-touch pages) would otherwise land on whichever runs first.
    first = dict([next(iter(prompts.items()))])
    for backend in (ref_backend, cand_backend):
        if backend is not None:
            run_greedy(backend, first, min(4, args.max_new_tokens))
    if getattr(cand_backend, "spec_stats", None) is not None:
        cand_backend.spec_stats = type(cand_backend.spec_stats)(cand_backend.spec_stats.k)
    ref, cand, ref_m, cand_m, ref_s, cand_s = {}, {}, {}, {}, 0.0, 0.0
    started, asked = time.monotonic(), len(prompts)
    # Alternate prompt by prompt, so both sides see the same load on a shared machine.
    for n, (pid, ids) in enumerate(prompts.items(), 1):
        if n > 1 and args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
            # The audit covers the prompts both sides finished; the count says how many.
            prompts = dict(list(prompts.items())[:n - 1])
            break
        if ref_backend is not None:
            t, m, s = run_greedy(ref_backend, {pid: ids}, args.max_new_tokens)
            ref.update(t), ref_m.update(m)
            ref_s += s
        t, m, s = run_greedy(cand_backend, {pid: ids}, args.max_new_tokens)
        cand.update(t), cand_m.update(m)
        cand_s += s
        if args.progress:
            same = "identical" if pid not in ref or ref[pid] == cand[pid] else "DIVERGES"
            print(f"audit speculative: {n}/{len(prompts)} {pid}: {len(cand[pid])} tokens, {same}; "
                  f"so far {sum(map(len, cand.values())) / cand_s:.3g} tokens/s with speculation"
                  + (f", {sum(map(len, ref.values())) / ref_s:.3g} without" if ref_s else ""),
                  file=sys.stderr, flush=True)
    if ref_backend is None:
        ref = _read_reference(args.reference_file, prompts)
    if args.save:
        args.save.write_text(json.dumps({"model": args.model, "outputs": cand}))
    result = compare(ref, cand, ref_m, cand_m, args.min_identical)
    figures["prompts_asked"], figures["prompt_sets"] = asked, args.prompts
    if len(prompts) < asked:
        figures["stopped_by_max_seconds"] = args.max_seconds
    figures["candidate_tokens_per_s"] = sum(map(len, cand.values())) / cand_s if cand_s else None
    if ref_backend is not None and ref_s:
        figures["reference_tokens_per_s"] = sum(map(len, ref.values())) / ref_s
        figures["measured_speedup"] = figures["candidate_tokens_per_s"] / figures["reference_tokens_per_s"]
    stats = getattr(cand_backend, "spec_stats", None)
    if stats is not None:
        figures.update(stats.summary())
        if stats.verifies:
            # k as drafted: a sequence's last steps draft fewer, and prompt lookup may find none.
            k_mean = stats.drafted / stats.verifies
            figures["mean_drafted_per_verify"] = k_mean
            figures["predicted_speedup"] = predicted_speedup(
                figures["target_bytes_per_verify_step"], figures["draft_bytes_per_step"], k_mean,
                figures["mean_acceptance_length"])
            figures["bytes_per_emitted_token"] = (figures["target_bytes_per_verify_step"] + k_mean *
                                                  figures["draft_bytes_per_step"]) / figures["mean_acceptance_length"]
    result.figures = figures
    return result


def _read_reference(path: Path, prompts: dict) -> dict:
    try:
        outputs = json.loads(path.read_text())["outputs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--reference-file {path}: not a saved output file ({e}); write one with --save") from None
    missing = [pid for pid in prompts if pid not in outputs]
    if missing:
        raise ValueError(f"--reference-file {path}: no output for prompt {missing[0]} ({len(missing)} missing)")
    return {pid: outputs[pid] for pid in prompts}


def main(argv=None) -> int:
    args = add_parser().parse_args(argv)
    from wallperf.harness.artifacts import ArtifactError
    from wallperf.harness.config import ConfigError
    from wallperf.harness.loadgen.qsl import DatasetError

    try:
        result = run(args)
    except (ValueError, ConfigError, ArtifactError, DatasetError) as e:
        print(f"wallperf audit speculative: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.out:
        from wallperf.sut.atomic import atomic_file

        with atomic_file(args.out) as f:
            f.write(json.dumps(results_record(result, args), indent=2).encode())
    print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
    return EXIT_PASS if result.verdict == "PASS" else EXIT_FAIL
