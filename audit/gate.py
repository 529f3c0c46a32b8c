"""The quantization gate: is a candidate model still as accurate on MMLU as its reference?

Both models score the same questions (audit.mmlu). The gate reports the drop
in accuracy points with a paired 95% CI, per-subject drops, how often the two
pick the same answer, and the mean KL(reference || candidate) of their 4-way
answer distributions, then decides:

- FAIL: the drop (point estimate, as MLPerf's accuracy targets are) exceeds
  `max_drop` points, or, given a baseline, the candidate no longer beats it.
- INCONCLUSIVE: the reference is not significantly above chance (one-sided
  exact binomial test, 5%): no drop could then be told from noise, and the
  audit says plainly that it cannot detect damage.
- PASS otherwise.

The drop's CI is a paired bootstrap over questions (10,000 resamples, seed 0;
audit.stats.paired_bootstrap_ci), which keeps the strong correlation between
two versions of one model that unpaired intervals would throw away.

A model SPEC is a conf/models name or a checkpoint path (.gguf file or HF
folder), optionally followed by `@DTYPE` (bfloat16, float32, float16 or fp8;
default: the published dtype) and `+noiseSIGMA`. The noise suffix is a tool to
prove that the gate catches damage: it adds seeded gaussian noise of SIGMA
times each tensor's RMS to every projection weight of every block (e.g.
`smollm2-135m@bfloat16+noise0.2`).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from audit.mmlu import CHANCE, FORMATS, MMLUResult, evaluate
from audit.stats import kl_divergence, paired_bootstrap_ci

MAX_DROP_LIMIT = 2.0
DTYPES = ("bfloat16", "float32", "float16", "fp8")
NOISE_SEED = 0
EXIT_CODES = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}
EXIT_BAD_INPUT = 2
_SPEC = re.compile(r"(?P<target>.+?)(?:@(?P<dtype>[A-Za-z0-9_]+))?(?:\+noise(?P<noise>[^@+]+))?")


class AuditInputError(ValueError):
    """A bad spec, limit or option: the message says what is allowed."""


@dataclass(frozen=True)
class ModelSpec:
    target: str
    dtype: str | None = None
    noise: float = 0.0

    def __str__(self) -> str:
        dtype = f"@{self.dtype}" if self.dtype else ""
        return self.target + dtype + (f"+noise{self.noise:g}" if self.noise else "")


def parse_spec(text: str) -> ModelSpec:
    match = _SPEC.fullmatch(text.strip()) if text else None
    if match is None:
        raise AuditInputError(f"model spec {text!r} is empty; expected NAME_OR_PATH[@DTYPE][+noiseSIGMA]")
    dtype, noise = match["dtype"], 0.0
    if dtype is not None and dtype not in DTYPES:
        raise AuditInputError(f"model spec {text!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if match["noise"] is not None:
        try:
            noise = float(match["noise"])
        except ValueError:
            noise = math.nan
        if not 0 < noise < math.inf:
            raise AuditInputError(f"model spec {text!r}: noise {match['noise']!r} must be a number > 0 "
                                  "(the noise's std relative to each weight's RMS)")
    return ModelSpec(match["target"], dtype, noise)


def resolve_spec(spec: ModelSpec) -> tuple[Path, str]:
    """The checkpoint path and the dtype to run in (the published one unless the spec names one)."""
    from harness.artifacts import ArtifactError, resolve_model_file
    from harness.config import available, load_model_config

    path = Path(spec.target).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        # A GGUF's tensor types say how it is stored, not what it computes in: bf16, as the conf models.
        return path, spec.dtype or "bfloat16"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AuditInputError(f"{path} is a folder without config.json, not an HF checkpoint")
        hf_config = json.loads((path / "config.json").read_text())
        published = hf_config.get("dtype") or hf_config.get("torch_dtype")
        return path, spec.dtype or (published if published in DTYPES else "bfloat16")
    if spec.target not in available("models"):
        raise AuditInputError(f"{spec.target!r} is neither a model name from conf/models "
                              f"({', '.join(available('models'))}) nor an existing .gguf file or HF folder")
    model = load_model_config(spec.target)
    try:
        return resolve_model_file(model), spec.dtype or model.published_dtype
    except ArtifactError as e:
        raise AuditInputError(f"model {spec.target!r} cannot be audited: {e}") from None


@lru_cache(maxsize=1)
def _read_checkpoint(path: Path):
    """The last checkpoint read, so that reference and candidate of one file are read once.
    Models built from it never write into its tensors (noise and fp8 replace weights)."""
    from sut.tokenizer import Tokenizer
    from sut.weights import load_checkpoint

    cfg, sd, _ = load_checkpoint(path)
    tokenizer = Tokenizer.from_gguf(path) if path.is_file() else Tokenizer.from_tokenizer_json(
        path / "tokenizer.json")
    return cfg, sd, tokenizer


def add_weight_noise_(model: nn.Module, relative_std: float, seed: int = NOISE_SEED) -> None:
    """Replace every projection weight of every block by W + N(0, (relative_std * rms(W))^2)."""
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            w = module.weight.detach().float().cpu()
            noisy = w + torch.randn(w.shape, generator=g) * (relative_std * w.pow(2).mean().sqrt())
            module.weight = nn.Parameter(noisy.to(module.weight.device, module.weight.dtype), requires_grad=False)


def load_spec(spec: ModelSpec, device: str | None = None):
    """A sut.loading.LoadedModel as the spec describes it."""
    from sut.loading import DTYPES as TORCH_DTYPES, LoadedModel
    from sut.weights import build_model

    path, dtype = resolve_spec(spec)
    quantize = None
    if dtype == "fp8":
        try:
            from sut.quant import quantize_model_ as quantize
        except ImportError as e:
            raise AuditInputError(f"model spec {spec}: fp8 is unavailable in this checkout "
                                  f"(sut.quant.quantize_model_ cannot be imported: {e})") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, sd, tokenizer = _read_checkpoint(path)
    model = build_model(cfg, sd, TORCH_DTYPES["bfloat16" if quantize else dtype], device)
    if spec.noise:
        add_weight_noise_(model, spec.noise)
    if quantize:
        quantize(model, torch.float8_e4m3fn, per_channel=True)
    return LoadedModel(path, cfg, model, tokenizer, dtype)


def check_max_drop(max_drop) -> float:
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 < max_drop <= MAX_DROP_LIMIT:
        raise AuditInputError(f"max_drop must be a number of accuracy points in (0, {MAX_DROP_LIMIT}], "
                              f"got {max_drop!r}: the gate is for quantization, which must stay within "
                              "one to two MMLU points")
    return float(max_drop)


@dataclass(frozen=True)
class SubjectDrop:
    subject: str
    questions: int
    reference_accuracy: float
    candidate_accuracy: float

    @property
    def drop_points(self) -> float:
        return 100 * (self.reference_accuracy - self.candidate_accuracy)


def _same_questions(a: MMLUResult, b: MMLUResult, what: str) -> None:
    if (a.fmt, a.k_shot) != (b.fmt, b.k_shot) or [(q.subject, q.answer) for q in a.questions] != [
            (q.subject, q.answer) for q in b.questions]:
        raise AuditInputError(f"the {what} was not scored on the reference's questions and prompts")


@dataclass(frozen=True)
class AuditResult:
    """The gate's comparison and verdict; everything is computed from the per-question results."""

    reference: MMLUResult
    candidate: MMLUResult
    max_drop: float = 1.0
    baseline: MMLUResult | None = None
    specs: dict = field(default_factory=dict)
    drop_points: float = field(init=False)
    drop_ci95: tuple = field(init=False)
    agreement: float = field(init=False)
    kl: float = field(init=False)
    per_subject: tuple = field(init=False)
    beats_baseline: bool | None = field(init=False)
    verdict: str = field(init=False)
    reason: str = field(init=False)

    def __post_init__(self):
        check_max_drop(self.max_drop)
        ref, cand = self.reference, self.candidate
        _same_questions(ref, cand, "candidate")
        if self.baseline is not None:
            _same_questions(ref, self.baseline, "baseline")
        drop = 100 * (ref.accuracy - cand.accuracy)
        lo, hi = paired_bootstrap_ci(ref.correct_array(), cand.correct_array())
        beats = None if self.baseline is None else cand.accuracy > self.baseline.accuracy
        computed = {
            "drop_points": drop,
            "drop_ci95": (100 * lo, 100 * hi),
            "agreement": float(np.mean([a.predicted == b.predicted
                                        for a, b in zip(ref.questions, cand.questions)])),
            "kl": float(np.mean(kl_divergence(ref.scores_array(), cand.scores_array()))),
            "per_subject": tuple(SubjectDrop(s, r.total, r.accuracy, cand.per_subject[s].accuracy)
                                 for s, r in ref.per_subject.items()),
            "beats_baseline": beats,
            "verdict": ("FAIL" if drop > self.max_drop or beats is False else
                        "INCONCLUSIVE" if not ref.significantly_above_chance else "PASS"),
        }
        for key, value in computed.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "reason", self._reason())

    def _reason(self) -> str:
        ref, n = self.reference, len(self.reference.questions)
        lo, hi = self.drop_ci95
        lost = f"the candidate lost {self.drop_points:.2f} points (95% CI {lo:.2f} to {hi:.2f})"
        if self.drop_points > self.max_drop:
            note = "" if lo > self.max_drop else (
                f" Note: the CI reaches down to {lo:.2f}, so {n} questions do not prove a drop above the limit; "
                "more questions (--per-subject) would settle it.")
            return f"{lost}, more than the {self.max_drop:g} allowed.{note}"
        if self.beats_baseline is False:
            return (f"the candidate ({100 * self.candidate.accuracy:.1f}%) no longer beats the baseline "
                    f"({100 * self.baseline.accuracy:.1f}%).")
        if self.verdict == "INCONCLUSIVE":
            other = FORMATS[1 - FORMATS.index(ref.fmt)]
            return (f"this audit cannot detect damage: the reference scores {100 * ref.accuracy:.1f}% "
                    f"(95% CI {100 * ref.overall.ci95[0]:.1f}-{100 * ref.overall.ci95[1]:.1f}) on {n} questions, "
                    f"not significantly above chance ({100 * CHANCE:.0f}%, "
                    f"one-sided p={ref.overall.p_value:.3f}). "
                    f"Remedy: more questions via --per-subject (or leave it out for all of MMLU), "
                    f"or the other --format ({other}).")
        note = "" if hi <= self.max_drop else (
            f" Note: the CI reaches {hi:.2f}, so {n} questions cannot rule out a drop above the limit; "
            "more questions (--per-subject) would settle it.")
        return f"{lost}, within the {self.max_drop:g} allowed.{note}"

    def to_json(self) -> dict:
        """Accuracies and agreement as fractions, drops in points, KL in nats."""
        ref, cand, base = self.reference, self.candidate, self.baseline
        return {
            "reference_accuracy": ref.accuracy,
            "candidate_accuracy": cand.accuracy,
            "drop_points": self.drop_points,
            "drop_ci95": list(self.drop_ci95),
            "agreement": self.agreement,
            "kl": self.kl,
            "questions": len(ref.questions),
            "format": ref.fmt,
            "chance": ref.chance,
            "verdict": self.verdict,
            "baseline_accuracy": None if base is None else base.accuracy,
            "beats_baseline": self.beats_baseline,
            "reason": self.reason,
            "max_drop": self.max_drop,
            "k_shot": ref.k_shot,
            "drop_ci_method": "paired bootstrap over questions, 10000 resamples, seed 0",
            "reference_ci95": list(ref.overall.ci95),
            "candidate_ci95": list(cand.overall.ci95),
            "reference_p_value_vs_chance": ref.overall.p_value,
            "reference_significantly_above_chance": ref.significantly_above_chance,
            "specs": dict(self.specs),
            "seconds": {"reference": ref.seconds, "candidate": cand.seconds,
                        "baseline": None if base is None else base.seconds},
            "per_subject": {s.subject: {"questions": s.questions, "reference_accuracy": s.reference_accuracy,
                                        "candidate_accuracy": s.candidate_accuracy, "drop_points": s.drop_points}
                            for s in self.per_subject},
        }

    def summary(self) -> str:
        ref, cand, base = self.reference, self.candidate, self.baseline
        lo, hi = self.drop_ci95

        def row(role, r):
            c = r.overall.ci95
            return (f"  {role:<10} {self.specs.get(role, ''):<40} {100 * r.accuracy:5.1f}%  "
                    f"(95% CI {100 * c[0]:.1f}-{100 * c[1]:.1f})")

        lines = [f"MMLU audit: {ref.fmt} format, {ref.k_shot}-shot, {len(ref.questions)} questions in "
                 f"{len(ref.per_subject)} subjects, chance {100 * CHANCE:.0f}%",
                 row("reference", ref), row("candidate", cand)]
        if base is not None:
            lines.append(row("baseline", base))
        worst = [s for s in sorted(self.per_subject, key=lambda s: -s.drop_points)[:3] if s.drop_points > 0]
        lines += [f"  drop       {self.drop_points:.2f} points (95% CI {lo:.2f} to {hi:.2f}, paired bootstrap); "
                  f"allowed {self.max_drop:g}",
                  f"  agreement  {100 * self.agreement:.1f}% same answers; mean KL(reference||candidate) "
                  f"{self.kl:.4f} nats",
                  "  largest subject drops: " + (", ".join(
                      f"{s.subject} {s.drop_points:.0f} points ({s.questions} q)" for s in worst) or "none"),
                  f"verdict: {self.verdict}: {self.reason}"]
        return "\n".join(lines)


def audit(reference_spec: str, candidate_spec: str, max_drop: float = 1.0, baseline_spec: str | None = None,
          per_subject: int | None = None, fmt: str = "cloze", k_shot: int = 0, mmlu_path: Path | None = None,
          progress: bool = True, subjects=None) -> AuditResult:
    """Score reference, candidate (and baseline) on the same MMLU questions and judge the candidate.
    `per_subject`: the first N questions of each subject (stratified); None takes all 14,042.
    `subjects`: only these subjects (all 57 when None)."""
    from harness.loadgen.qsl import load_mmlu, select_per_subject

    max_drop = check_max_drop(max_drop)
    if fmt not in FORMATS:
        raise AuditInputError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if per_subject is not None and per_subject < 1:
        raise AuditInputError(f"per_subject must be >= 1, got {per_subject}")
    if k_shot < 0:
        raise AuditInputError(f"k_shot must be >= 0, got {k_shot}")
    roles = {"reference": reference_spec, "candidate": candidate_spec, "baseline": baseline_spec}
    specs = {role: parse_spec(text) for role, text in roles.items() if text is not None}
    for spec in specs.values():
        resolve_spec(spec)  # every spec is checked before minutes go into the first evaluation
    if mmlu_path is None:
        from harness.artifacts import resolve_dataset_file
        from harness.config import load_dataset_config
        mmlu_path = resolve_dataset_file(load_dataset_config("mmlu"))
    pool = load_mmlu(mmlu_path)
    if subjects is not None:
        unknown = sorted(set(subjects) - {q.subject for q in pool})
        if unknown or not subjects:
            raise AuditInputError(f"unknown subjects {unknown}; MMLU's are: "
                                  f"{', '.join(sorted({q.subject for q in pool}))}")
    questions = [q for q in select_per_subject(pool, per_subject) if subjects is None or q.subject in subjects]
    results = {role: evaluate(load_spec(spec), questions, fmt, k_shot, pool, progress, label=role)
               for role, spec in specs.items()}
    return AuditResult(results["reference"], results["candidate"], max_drop, results.get("baseline"),
                       {role: str(spec) for role, spec in specs.items()})


def add_audit_parser(subparsers) -> argparse.ArgumentParser:
    a = subparsers.add_parser(
        "audit", help="MMLU accuracy gate: does a candidate (e.g. fp8) stay within max-drop of its reference?",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 PASS, 1 FAIL, 2 bad input, 3 INCONCLUSIVE")
    a.add_argument("--reference", required=True, metavar="SPEC", help="model the candidate is judged against")
    a.add_argument("--candidate", required=True, metavar="SPEC", help="model under audit")
    a.add_argument("--max-drop", type=float, default=1.0,
                   help="allowed accuracy drop in points, in (0, 2] (default 1)")
    a.add_argument("--baseline", metavar="SPEC", help="a smaller model the candidate must still beat")
    a.add_argument("--per-subject", type=int, metavar="N", help="first N questions of each of the 57 subjects "
                   "(default: all 14,042)")
    a.add_argument("--subjects", type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
                   help="comma list of MMLU subjects to audit (default: all 57)")
    a.add_argument("--format", choices=FORMATS, default="cloze", dest="fmt",
                   help="cloze: score each answer's text (default); letter: lm-eval's prompt, score ' A'..' D'")
    a.add_argument("--k-shot", type=int, default=0, help="solved questions of the same subject before each one")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return a


def cmd_audit(args) -> int:
    from harness.artifacts import ArtifactError
    from harness.config import ConfigError
    from harness.loadgen.qsl import DatasetError

    try:
        result = audit(args.reference, args.candidate, args.max_drop, args.baseline, args.per_subject, args.fmt,
                       args.k_shot, progress=not args.no_progress, subjects=args.subjects)
    # ValueError covers what only the questions reveal (too few exemplars for --k-shot, too long a prompt).
    except (ValueError, ConfigError, ArtifactError, DatasetError) as e:
        print(f"wallperf audit: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
    return EXIT_CODES[result.verdict]
