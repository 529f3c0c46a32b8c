"""`wallperf mmlu`: one model's MMLU accuracy, with its confidence interval.

The model is a SPEC as for `wallperf audit` (NAME_OR_PATH[@DTYPE][+noiseSIGMA]);
questions come from the same pool (`--per-subject`, `--subjects`) in the same
seeded order, scored the same way (audit.mmlu, by packed prefill), so a figure
from here and an audit's reference score are the same measurement. The interval
is Wilson's at 95% for the questions scored, and the exact binomial test says
whether the model is above chance (25%).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from wallperf.audit.gate import SEED, check_draw, draw_order, hardware_profile_named, question_pool
from wallperf.audit.mmlu import CHANCE, FORMATS, MMLUResult, evaluate
from wallperf.harness.config.checks import positive
from wallperf.audit.specs import load_spec, parse_spec, release_checkpoints, resolve_spec
from wallperf.audit.verdict import EXIT_BAD_INPUT


def score_model(spec_text: str, fmt: str = "letter", per_subject: int | None = None, subjects=None,
                k_shot: int = 0, max_questions: int | None = None, seed: int = SEED, hardware: str = "cpu",
                progress: bool = True, mmlu_path=None) -> tuple[MMLUResult, int]:
    """The model's MMLUResult on the first `max_questions` (None: all) of the pool in the
    seeded order, and the pool's size."""
    check_draw(fmt, per_subject, max_questions, k_shot)
    spec = parse_spec(spec_text)
    resolve_spec(spec)
    everything, pool = question_pool(mmlu_path, subjects, per_subject, None)
    order = [pool[i] for i in draw_order(len(pool), seed)][:max_questions]
    started = time.monotonic()
    model = load_spec(spec, hardware_profile_named(hardware))
    release_checkpoints()
    result = evaluate(model, order, fmt, k_shot, everything, progress, label="mmlu")
    # The time with the model's loading, as the audit counts it.
    return dataclasses.replace(result, seconds=time.monotonic() - started), len(pool)


def to_json(spec: str, result: MMLUResult, population: int) -> dict:
    overall = result.overall
    return {"spec": spec, "format": result.fmt, "k_shot": result.k_shot, "questions": overall.total,
            "population": population, "correct": overall.correct, "accuracy": overall.accuracy,
            "accuracy_ci95": list(overall.ci95), "chance": CHANCE, "p_value_vs_chance": overall.p_value,
            "significantly_above_chance": overall.significantly_above_chance, "seconds": result.seconds,
            "per_subject": {s: {"correct": a.correct, "questions": a.total, "accuracy": a.accuracy}
                            for s, a in result.per_subject.items()}}


def summary(spec: str, result: MMLUResult, population: int) -> str:
    o = result.overall
    lo, hi = o.ci95
    return (f"MMLU {result.fmt} {result.k_shot}-shot: {spec}: {100 * o.accuracy:.1f}% (95% CI {100 * lo:.1f} to "
            f"{100 * hi:.1f}), {o.correct} of {o.total} questions (of {population}, seeded order, "
            f"{len(result.per_subject)} subjects); chance {100 * CHANCE:.0f}%, "
            f"{'above' if o.significantly_above_chance else 'not shown above'} chance (p = {o.p_value:.2g}); "
            f"{result.seconds:.0f} s")


def add_mmlu_parser(subparsers) -> argparse.ArgumentParser:
    m = subparsers.add_parser("mmlu", help="one model's MMLU accuracy with its 95%% CI",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--model", required=True, metavar="SPEC",
                   help="NAME_OR_PATH[@DTYPE][+noiseSIGMA], as for `wallperf audit`")
    m.add_argument("--format", choices=FORMATS, default="letter", dest="fmt",
                   help="letter: lm-eval's prompt, score ' A'..' D' (default); cloze: score each answer's text")
    m.add_argument("--per-subject", type=positive(int), metavar="N",
                   help="the first N questions of each of the 57 subjects (default: all 14,042)")
    m.add_argument("--subjects", type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
                   help="comma list of MMLU subjects (default: all 57)")
    m.add_argument("--k-shot", type=positive(int, zero_ok=True), default=0,
                   help="solved questions of the same subject before each one")
    m.add_argument("--max-questions", type=positive(int), metavar="N",
                   help="score only the first N of the seeded order")
    m.add_argument("--seed", type=int, default=SEED, help=f"seed of the question order (default {SEED})")
    m.add_argument("--hardware", default="cpu", metavar="NAME", help="hardware profile: the fp8 variant")
    m.add_argument("--json", action="store_true", help="print the result as JSON (with per-subject scores)")
    m.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return m


def cmd_mmlu(args) -> int:
    from wallperf.harness.artifacts import ArtifactError
    from wallperf.harness.config import ConfigError
    from wallperf.harness.loadgen.qsl import DatasetError

    try:
        result, population = score_model(args.model, args.fmt, args.per_subject, args.subjects, args.k_shot,
                                         args.max_questions, args.seed, args.hardware, not args.no_progress)
    except (ValueError, ConfigError, ArtifactError, DatasetError) as e:
        print(f"wallperf mmlu: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    spec = str(parse_spec(args.model))
    print(json.dumps(to_json(spec, result, population), indent=2) if args.json
          else summary(spec, result, population))
    return 0
