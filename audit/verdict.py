"""The gate's verdict: is a candidate model still within `max_drop` MMLU points of its reference?

Decided from the confidence interval of the paired drop (reference accuracy
minus candidate accuracy, on the same questions), never from its point
estimate alone:

- PASS: the whole interval lies below `max_drop`, and the reference is shown
  to score above chance (otherwise no drop could be told from noise);
- FAIL: the whole interval lies above `max_drop`;
- otherwise undecided: the audit draws more questions, and when it may draw no
  more (--max-questions, or the pool is used up) the verdict is INCONCLUSIVE,
  with the reason.

The intervals are audit.sequential's confidence sequences, valid however
often the audit looked: wrongly passing a candidate whose true drop is at or
above the limit happens at most 2.5% of the time, and so does wrongly failing
one below it. MLPerf's rule, the point estimate against the limit, is reported
beside it (`point_estimate_verdict`) and decides nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wallperf.audit.mmlu import CHANCE, FORMATS, MMLUResult
from wallperf.audit.sequential import ALPHA, HORIZON, confidence_interval, side_of
from wallperf.audit.stats import kl_divergence, paired_bootstrap_ci
from wallperf.audit.specs import AuditInputError

MAX_DROP_LIMIT = 2.0
EXIT_CODES = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}
EXIT_BAD_INPUT = 2
CI_METHOD = (f"betting confidence sequence (Waudby-Smith & Ramdas), {100 * (1 - ALPHA):g}% at every look, "
             f"sampling without replacement, bets tuned for {HORIZON} questions")


def check_max_drop(max_drop) -> float:
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 < max_drop <= MAX_DROP_LIMIT:
        raise AuditInputError(f"max_drop must be a number of accuracy points in (0, {MAX_DROP_LIMIT}], "
                              f"got {max_drop!r}: the gate is for quantization, which must stay within "
                              "one to two MMLU points")
    return float(max_drop)


def decide(reference_correct, candidate_correct, max_drop: float, population: int | None) -> str | None:
    """PASS, FAIL, or None while undecided, from the questions scored so far (in draw order)."""
    ref = np.asarray(reference_correct, dtype=np.float64)
    side = side_of(ref - np.asarray(candidate_correct, dtype=np.float64), max_drop / 100, population)
    if side == "above":
        return "FAIL"
    if side == "below" and side_of(ref, CHANCE, population) == "above":
        return "PASS"
    return None


@dataclass(frozen=True)
class SubjectDrop:
    subject: str
    questions: int
    reference_accuracy: float
    candidate_accuracy: float

    @property
    def drop_points(self) -> float:
        return 100 * (self.reference_accuracy - self.candidate_accuracy)


def same_questions(a: MMLUResult, b: MMLUResult, what: str) -> None:
    if (a.fmt, a.k_shot) != (b.fmt, b.k_shot) or [(q.subject, q.answer) for q in a.questions] != [
            (q.subject, q.answer) for q in b.questions]:
        raise AuditInputError(f"the {what} was not scored on the reference's questions and prompts")


def points(interval) -> tuple:
    return tuple(100 * x for x in interval)


@dataclass(frozen=True)
class Verdict:
    """The drop of `candidate` against `reference` on the questions both scored, in draw order.
    `population`: the pool they were drawn from without replacement (None: with replacement).
    The audit draws no more questions after this verdict: undecided is INCONCLUSIVE."""

    reference: MMLUResult
    candidate: MMLUResult
    max_drop: float = 1.0
    population: int | None = None
    drop_points: float = field(init=False)
    drop_ci95: tuple = field(init=False)
    drop_ci95_fixed_n: tuple = field(init=False)
    reference_accuracy_ci95: tuple = field(init=False)
    candidate_accuracy_ci95: tuple = field(init=False)
    agreement: float = field(init=False)
    kl: float = field(init=False)
    per_subject: tuple = field(init=False)
    verdict: str = field(init=False)
    point_estimate_verdict: str = field(init=False)
    reason: str = field(init=False)

    def __post_init__(self):
        check_max_drop(self.max_drop)
        ref, cand = self.reference, self.candidate
        same_questions(ref, cand, "candidate")
        a, b = ref.correct_array(), cand.correct_array()
        drop = 100 * (ref.accuracy - cand.accuracy)
        decided = decide(a, b, self.max_drop, self.population)
        computed = {
            "drop_points": drop,
            "drop_ci95": points(confidence_interval(a.astype(float) - b, self.population)),
            "drop_ci95_fixed_n": points(paired_bootstrap_ci(a, b)),
            "reference_accuracy_ci95": confidence_interval(a.astype(float), self.population),
            "candidate_accuracy_ci95": confidence_interval(b.astype(float), self.population),
            "agreement": float(np.mean([x.predicted == y.predicted for x, y in zip(ref.questions, cand.questions)])),
            "kl": float(np.mean(kl_divergence(ref.scores_array(), cand.scores_array()))),
            "per_subject": tuple(SubjectDrop(s, r.total, r.accuracy, cand.per_subject[s].accuracy)
                                 for s, r in ref.per_subject.items()),
            "verdict": decided or "INCONCLUSIVE",
            "point_estimate_verdict": "PASS" if drop <= self.max_drop else "FAIL",
        }
        for key, value in computed.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "reason", self._reason())

    @property
    def questions(self) -> int:
        return len(self.reference.questions)

    def _reason(self) -> str:
        ref, n = self.reference, self.questions
        lo, hi = self.drop_ci95
        lost = (f"the candidate lost {self.drop_points:.2f} points on {n} questions "
                f"(95% CI {lo:.2f} to {hi:.2f}, valid at every look)")
        if self.verdict == "FAIL":
            return f"{lost}: the whole CI lies above the {self.max_drop:g} allowed."
        if self.verdict == "PASS":
            return f"{lost}: the whole CI lies within the {self.max_drop:g} allowed."
        more = ("the whole pool is used" if self.questions == self.population else
                "more questions (--max-questions) may settle it")
        if hi < self.max_drop:
            rlo, rhi = self.reference_accuracy_ci95
            other = FORMATS[1 - FORMATS.index(ref.fmt)]
            return (f"{lost}, within the {self.max_drop:g} allowed, but this audit cannot detect damage: the "
                    f"reference scores {100 * ref.accuracy:.1f}% (95% CI {100 * rlo:.1f}-{100 * rhi:.1f}), "
                    f"not shown above chance ({100 * CHANCE:.0f}%). Remedy: a model above chance, more "
                    f"questions, or the other --format ({other}).")
        return (f"{lost}: the CI holds the {self.max_drop:g}-point limit, so the {n} questions neither prove the "
                f"drop within it nor above it; {more}.")

    def to_json(self) -> dict:
        """Accuracies and agreement as fractions, drops in points, KL in nats."""
        ref, cand = self.reference, self.candidate
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "point_estimate_verdict": self.point_estimate_verdict,
            "reference_accuracy": ref.accuracy,
            "candidate_accuracy": cand.accuracy,
            "drop_points": self.drop_points,
            "drop_ci95": list(self.drop_ci95),
            "drop_ci_method": CI_METHOD,
            "drop_ci95_fixed_n": list(self.drop_ci95_fixed_n),
            "drop_ci95_fixed_n_method": "paired bootstrap over questions, 10000 resamples, seed 0 "
                                        "(valid for one look at a fixed number of questions only)",
            "max_drop": self.max_drop,
            "agreement": self.agreement,
            "flip_rate": 1 - self.agreement,
            "kl": self.kl,
            "questions": self.questions,
            "population": self.population,
            "subjects": len(ref.per_subject),
            "format": ref.fmt,
            "k_shot": ref.k_shot,
            "chance": ref.chance,
            "reference_ci95": list(self.reference_accuracy_ci95),
            "candidate_ci95": list(self.candidate_accuracy_ci95),
            "per_subject": {s.subject: {"questions": s.questions, "reference_accuracy": s.reference_accuracy,
                                        "candidate_accuracy": s.candidate_accuracy, "drop_points": s.drop_points}
                            for s in self.per_subject},
        }
