"""`wallperf audit`: the quantization gate, run as a sequential test on MMLU.

Reference and candidate (and a baseline) score the same MMLU questions, drawn
in a seeded random order from the pool (all 57 subjects, 14,042 questions by
default; subjects appear in proportion to their size). After every batch of
questions the audit looks at the paired drop in accuracy and stops as soon as
the verdict is decided (audit.verdict: PASS when the drop's confidence
interval lies wholly within --max-drop, FAIL when wholly above), or at
--max-questions, when it is INCONCLUSIVE. A clear case costs few questions.
The intervals are confidence sequences (audit.sequential), valid however
often the audit looks, so stopping early does not raise the error rate.

SPECs are described in audit.specs (NAME_OR_PATH[@DTYPE][+noiseSIGMA]); fp8
takes the variant of the --hardware profile (e4m3fnuz on MI300X, e4m3fn on
H100/H200 and, emulated, on CPUs). The same profile's memory wall sets the
speed side of --baseline (audit.baseline).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wallperf.audit.baseline import BaselineComparison, ModelCost
from wallperf.audit.mmlu import CHANCE, FORMATS, MMLUResult, Progress, prepare, score
from wallperf.audit.sequential import confidence_interval
from wallperf.harness.config.checks import positive
from wallperf.audit.specs import AuditInputError, load_spec, parse_spec, release_checkpoints, resolve_spec
from wallperf.audit.verdict import EXIT_BAD_INPUT, EXIT_CODES, Verdict, check_max_drop, decide
from wallperf.sut.quant.fp8 import kv_cache_dtype

DEFAULT_MAX_QUESTIONS = 2000
LOOK_EVERY = 32
SEED = 0
ROLES = ("reference", "candidate", "baseline")


def draw_order(n: int, seed: int = SEED) -> np.ndarray:
    """The audit's order over a pool of n questions: a seeded uniform permutation, so
    every prefix is a random sample of the pool (what the stopping rule assumes)."""
    return np.random.default_rng(seed).permutation(n)


@dataclass(frozen=True)
class AuditResult:
    """The verdict on the drop, what each model costs at the memory wall, and (with a
    baseline) whether quantizing beats running the small model."""

    verdict: Verdict
    costs: dict  # role -> ModelCost
    specs: dict  # role -> spec text
    hardware: str
    baseline: MMLUResult | None = None
    max_questions: int | None = None
    seconds: float = 0.0
    comparison: BaselineComparison | None = field(init=False)

    def __post_init__(self):
        comparison = None if self.baseline is None else BaselineComparison(
            self.verdict.candidate, self.baseline, self.costs["candidate"], self.costs["baseline"],
            self.hardware, self.verdict.population)
        object.__setattr__(self, "comparison", comparison)

    def to_json(self) -> dict:
        v = self.verdict
        accuracy = {"reference": (v.reference.accuracy, v.reference_accuracy_ci95),
                    "candidate": (v.candidate.accuracy, v.candidate_accuracy_ci95)}
        if self.comparison is not None:
            accuracy["baseline"] = (self.baseline.accuracy, self.comparison.baseline_ci95)
        return {**v.to_json(),
                "baseline_accuracy": None if self.baseline is None else self.baseline.accuracy,
                "baseline_comparison": None if self.comparison is None else self.comparison.to_json(),
                "max_questions": self.max_questions, "hardware": self.hardware, "specs": dict(self.specs),
                "models": {role: {**self.costs[role].to_json(), "accuracy": acc, "accuracy_ci95": list(ci)}
                           for role, (acc, ci) in accuracy.items()},
                "seconds": self.seconds}

    def summary(self) -> str:
        v = self.verdict
        ref = v.reference
        lo, hi = v.drop_ci95
        lines = [f"MMLU audit: {ref.fmt} format, {ref.k_shot}-shot, {v.questions} of {v.population} questions "
                 f"(seeded random order, {len(ref.per_subject)} subjects), chance {100 * CHANCE:.0f}%, "
                 f"{self.seconds:.0f} s"]
        rows = [("reference", ref), ("candidate", v.candidate)] + (
            [("baseline", self.baseline)] if self.baseline is not None else [])
        for role, result in rows:
            cost = self.costs[role]
            lines.append(f"  {role:<10} {self.specs[role]:<40} {100 * result.accuracy:5.1f}%  "
                         f"{cost.bytes_per_token / 1e9:6.2f} GB/token  "
                         f"{cost.memory_wall_tokens_per_second:7.1f} tok/s at the {self.hardware} wall")
        worst = [s for s in sorted(v.per_subject, key=lambda s: -s.drop_points)[:3] if s.drop_points > 0]
        lines += [f"  drop       {v.drop_points:.2f} points (95% CI {lo:.2f} to {hi:.2f}, valid at every look); "
                  f"allowed {v.max_drop:g}; point estimate alone (MLPerf's rule): {v.point_estimate_verdict}",
                  f"  agreement  {100 * v.agreement:.1f}% same answers; mean KL(reference||candidate) "
                  f"{v.kl:.4f} nats",
                  "  largest subject drops: " + (", ".join(
                      f"{s.subject} {s.drop_points:.0f} points ({s.questions} q)" for s in worst) or "none")]
        if self.comparison is not None:
            lines.append(f"  baseline   {self.comparison.verdict}: {self.comparison.reason}")
        lines.append(f"verdict: {v.verdict}: {v.reason}")
        return "\n".join(lines)


def question_pool(mmlu_path, subjects, per_subject, questions):
    """(every MMLU question, the pool drawn from): the pool is `questions` if given, else
    the first `per_subject` of each subject (all without it), only `subjects` if given."""
    from wallperf.harness.loadgen.qsl import load_mmlu, select_per_subject

    if questions is not None:
        if not questions:
            raise AuditInputError("the audit was given no questions")
        return list(questions), list(questions)
    if mmlu_path is None:
        from wallperf.harness.artifacts import resolve_dataset_file
        from wallperf.harness.config import load_dataset_config
        mmlu_path = resolve_dataset_file(load_dataset_config("mmlu"))
    everything = load_mmlu(mmlu_path)
    if subjects is not None:
        unknown = sorted(set(subjects) - {q.subject for q in everything})
        if unknown or not subjects:
            raise AuditInputError(f"unknown subjects {unknown}; MMLU's are: "
                                  f"{', '.join(sorted({q.subject for q in everything}))}")
    chosen = [q for q in select_per_subject(everything, per_subject) if subjects is None or q.subject in subjects]
    return everything, chosen


def check_draw(fmt: str, per_subject: int | None, max_questions: int | None, k_shot: int) -> None:
    """The prompt format and the draw's sizes, before any model is loaded."""
    if fmt not in FORMATS:
        raise AuditInputError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    for name, value in (("per_subject", per_subject), ("max_questions", max_questions)):
        if value is not None and value < 1:
            raise AuditInputError(f"{name} must be >= 1, got {value}")
    if k_shot < 0:
        raise AuditInputError(f"k_shot must be >= 0, got {k_shot}")


def hardware_profile_named(name: str):
    from wallperf.harness.config import load_hardware_config
    from wallperf.harness.hardware.profiles import hardware_profile

    return hardware_profile(load_hardware_config(name))[0]


def audit(reference_spec: str, candidate_spec: str, max_drop: float = 1.0, baseline_spec: str | None = None,
          per_subject: int | None = None, fmt: str = "letter", k_shot: int = 0, mmlu_path: Path | None = None,
          progress: bool = True, subjects=None, hardware: str = "cpu",
          max_questions: int | None = DEFAULT_MAX_QUESTIONS, look_every: int = LOOK_EVERY,
          seed: int = SEED, questions=None, kv_dtype: str = "auto") -> AuditResult:
    """Score reference and candidate (and baseline) on questions drawn in a seeded order until
    the verdict is decided or `max_questions` (None: the whole pool) are used.
    `per_subject`: the pool is the first N questions of each subject; `subjects`: only these;
    `questions`: these MMLUQuestions are the pool (and the k-shot exemplars) instead.
    `kv_dtype`: "fp8" runs the candidate over an fp8 KV cache in the hardware's variant."""
    started = time.monotonic()
    max_drop = check_max_drop(max_drop)
    check_draw(fmt, per_subject, max_questions, k_shot)
    texts = {"reference": reference_spec, "candidate": candidate_spec, "baseline": baseline_spec}
    specs = {role: parse_spec(text) for role, text in texts.items() if text is not None}
    for spec in specs.values():
        resolve_spec(spec)  # every spec is checked before minutes go into loading and scoring
    profile = hardware_profile_named(hardware)
    kv = {"candidate": kv_cache_dtype(profile, kv_dtype)}
    everything, pool = question_pool(mmlu_path, subjects, per_subject, questions)
    order = [pool[i] for i in draw_order(len(pool), seed)][:max_questions]
    models = {role: load_spec(spec, profile) for role, spec in specs.items()}
    release_checkpoints()
    costs = {role: ModelCost.of(str(specs[role]), m, profile) for role, m in models.items()}
    scored = {role: [] for role in models}
    shown = Progress(f"audit {fmt} {k_shot}-shot", len(order), progress)
    done, decided = 0, None
    while done < len(order) and decided is None:
        batch = order[done: done + look_every]
        for role, m in models.items():
            requests = prepare(m.tokenizer, batch, fmt, k_shot, everything, m.config.max_position)
            scored[role] += score(m, batch, requests, fmt, kv.get(role))
        done += len(batch)
        ref, cand = (np.array([q.correct for q in scored[role]], dtype=float) for role in ("reference", "candidate"))
        decided = decide(ref, cand, max_drop, len(pool))
        lo, hi = confidence_interval(ref - cand, len(pool))
        shown.update(done, f"; drop {100 * (ref - cand).mean():.2f} points, 95% CI {100 * lo:.2f} to "
                           f"{100 * hi:.2f} (limit {max_drop:g}){'; ' + decided if decided else ''}",
                     final=decided is not None)
    results = {role: MMLUResult(fmt, k_shot, tuple(s)) for role, s in scored.items()}
    verdict = Verdict(results["reference"], results["candidate"], max_drop, len(pool))
    names = {role: str(spec) + (" --kv-dtype fp8" if kv.get(role) is not None else "")
             for role, spec in specs.items()}
    return AuditResult(verdict, costs, names, profile.name, results.get("baseline"), max_questions,
                       time.monotonic() - started)


def add_audit_parser(subparsers) -> argparse.ArgumentParser:
    a = subparsers.add_parser(
        "audit", help="MMLU accuracy gate: does a candidate (e.g. fp8) stay within max-drop of its reference?",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 PASS, 1 FAIL, 2 bad input, 3 INCONCLUSIVE")
    a.add_argument("--reference", required=True, metavar="SPEC", help="model the candidate is judged against")
    a.add_argument("--candidate", required=True, metavar="SPEC", help="model under audit")
    a.add_argument("--max-drop", type=float, default=1.0,
                   help="allowed accuracy drop in points, in (0, 2] (default 1)")
    a.add_argument("--baseline", metavar="SPEC", help="a smaller model: is quantizing better than running it?")
    a.add_argument("--hardware", default="cpu", metavar="NAME",
                   help="hardware profile (conf/hardware): the fp8 variant and the memory wall (default cpu)")
    a.add_argument("--kv-dtype", choices=("auto", "fp8"), default="auto",
                   help="the candidate's KV cache: auto (its weights' dtype) or fp8 (e4m3 in the --hardware "
                        "profile's variant, one scale per token and KV head; emulated where it has no fp8)")
    a.add_argument("--max-questions", type=positive(int), default=DEFAULT_MAX_QUESTIONS, metavar="N",
                   help=f"stop undecided (INCONCLUSIVE) after N questions (default {DEFAULT_MAX_QUESTIONS})")
    a.add_argument("--per-subject", type=positive(int), metavar="N", help="draw only from the first N questions of each "
                   "of the 57 subjects (default: all 14,042)")
    a.add_argument("--subjects", type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
                   help="comma list of MMLU subjects to audit (default: all 57)")
    a.add_argument("--format", choices=FORMATS, default="letter", dest="fmt",
                   help="letter: lm-eval's prompt, score ' A'..' D' (default); cloze: score each answer's text")
    a.add_argument("--k-shot", type=positive(int, zero_ok=True), default=0,
                   help="solved questions of the same subject before each one")
    a.add_argument("--seed", type=int, default=SEED, help=f"seed of the question order (default {SEED})")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return a


def cmd_audit(args) -> int:
    from wallperf.harness.artifacts import ArtifactError
    from wallperf.harness.config import ConfigError
    from wallperf.harness.loadgen.qsl import DatasetError

    try:
        result = audit(args.reference, args.candidate, args.max_drop, args.baseline, args.per_subject, args.fmt,
                       args.k_shot, progress=not args.no_progress, subjects=args.subjects, hardware=args.hardware,
                       max_questions=args.max_questions, seed=args.seed, kv_dtype=args.kv_dtype)
    # ValueError covers what only the questions reveal (too few exemplars for --k-shot, too long a prompt).
    except (ValueError, ConfigError, ArtifactError, DatasetError) as e:
        print(f"wallperf audit: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
    return EXIT_CODES[result.verdict.verdict]
