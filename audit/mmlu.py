"""MMLU accuracy by log-likelihood: score every answer, generate nothing.

Two prompt formats:

- `letter`: lm-evaluation-harness's MMLU task (lm_eval/tasks/mmlu/default):
  "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
  then "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", scoring " A".." D".
  Small models answer one letter to almost every question here (SmolLM2-135M
  says "A" to 99%), which puts them at or below chance.
- `cloze`: "Question: {question}\\nAnswer:", scoring each answer's own text,
  divided by its length in characters (lm-eval's acc_norm), so long answers are
  not penalised for having more tokens. SmolLM2-135M is above chance only here
  (29.3% against the letter format's 23.5% on 570 questions, FACTS.md).

k-shot prompts put k solved questions of the same subject before the question,
as lm-eval does. audit.scoring runs the questions through the model by packed
prefill, the prompt up to "Answer:" once for its four answers.
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from wallperf.audit.stats import binomial_sf, log_softmax, wilson_interval
from wallperf.audit.scoring import encode_request, score_requests
from wallperf.harness.loadgen.qsl import LETTERS, MMLUQuestion

FORMATS = ("letter", "cloze")
CHANCE = 0.25
SIGNIFICANCE = 0.05
N_CHOICES = len(LETTERS)


@dataclass(frozen=True)
class QuestionScore:
    """One question's four answer scores. `scores` decide: the summed log-likelihoods
    in the letter format, per-character ones in the cloze format; `probs` is their
    softmax, the answer distribution that audits compare by KL divergence."""

    subject: str
    answer: int
    loglikelihoods: tuple
    scores: tuple
    predicted: int = field(init=False)
    correct: bool = field(init=False)
    probs: tuple = field(init=False)

    def __post_init__(self):
        if len(self.scores) != N_CHOICES or len(self.loglikelihoods) != N_CHOICES:
            raise ValueError(f"need {N_CHOICES} scores per question, got {len(self.scores)}")
        if not 0 <= self.answer < N_CHOICES:
            raise ValueError(f"answer index {self.answer} is not in 0..{N_CHOICES - 1}")
        predicted = int(np.argmax(self.scores))
        object.__setattr__(self, "predicted", predicted)
        object.__setattr__(self, "correct", predicted == self.answer)
        object.__setattr__(self, "probs", tuple(np.exp(log_softmax(self.scores)).tolist()))


@dataclass(frozen=True)
class Accuracy:
    """Accuracy with its 95% Wilson interval and the one-sided exact binomial test
    against chance (H0: accuracy <= 0.25)."""

    correct: int
    total: int
    accuracy: float = field(init=False)
    ci95: tuple = field(init=False)
    p_value: float = field(init=False)
    significantly_above_chance: bool = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "accuracy", self.correct / self.total)
        object.__setattr__(self, "ci95", wilson_interval(self.correct, self.total))
        p = binomial_sf(self.correct, self.total, CHANCE)
        object.__setattr__(self, "p_value", p)
        object.__setattr__(self, "significantly_above_chance", p < SIGNIFICANCE)


@dataclass(frozen=True)
class MMLUResult:
    fmt: str
    k_shot: int
    questions: tuple
    seconds: float = 0.0
    chance: float = CHANCE
    overall: Accuracy = field(init=False)
    per_subject: dict = field(init=False)

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"format {self.fmt!r} is not one of {', '.join(FORMATS)}")
        if not self.questions:
            raise ValueError("an MMLU result needs at least one question")
        object.__setattr__(self, "overall", Accuracy(sum(q.correct for q in self.questions), len(self.questions)))
        by_subject = defaultdict(list)
        for q in self.questions:
            by_subject[q.subject].append(q.correct)
        object.__setattr__(self, "per_subject",
                           {s: Accuracy(sum(c), len(c)) for s, c in sorted(by_subject.items())})

    @property
    def accuracy(self) -> float:
        return self.overall.accuracy

    @property
    def significantly_above_chance(self) -> bool:
        return self.overall.significantly_above_chance

    def correct_array(self) -> np.ndarray:
        return np.array([q.correct for q in self.questions], dtype=bool)

    def scores_array(self) -> np.ndarray:
        return np.array([q.scores for q in self.questions], dtype=np.float64)  # (N, 4)


# -- prompts -----------------------------------------------------------------

def _letter_body(q: MMLUQuestion) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.choices))
    return f"{q.question.strip()}{options}\nAnswer:"


def _cloze_body(q: MMLUQuestion) -> str:
    return f"Question: {q.question.strip()}\nAnswer:"


def answer_texts(q: MMLUQuestion, fmt: str) -> tuple:
    """The four scored continuations, each with the space that follows "Answer:"."""
    return tuple(f" {a}" for a in (LETTERS if fmt == "letter" else q.choices))


def build_context(q: MMLUQuestion, fmt: str, exemplars=()) -> str:
    """The prompt up to "Answer:"; exemplars are shown solved, as lm-eval's few-shot does."""
    body = _letter_body if fmt == "letter" else _cloze_body
    shots = "".join(f"{body(ex)}{answer_texts(ex, fmt)[LETTERS.index(ex.answer)]}\n\n" for ex in exemplars)
    if fmt == "letter":
        subject = q.subject.replace("_", " ")
        return f"The following are multiple choice questions (with answers) about {subject}.\n\n{shots}{body(q)}"
    return shots + body(q)


def choose_exemplars(questions, pool, k_shot: int) -> list:
    """k solved questions of each question's subject, never the question itself.

    Deterministic: the last k of the subject in pool order whose text differs
    from the question's (MMLU repeats some questions verbatim, and a repeat
    would hand over the answer). The stratified subsets take the first
    questions of each subject, so exemplars from the end are rarely evaluated
    themselves.
    """
    if k_shot == 0:
        return [()] * len(questions)
    by_subject = defaultdict(list)
    for ex in pool:
        by_subject[ex.subject].append(ex)
    chosen = []
    for q in questions:
        picked = []
        for ex in reversed(by_subject[q.subject]):
            if ex.question.strip() != q.question.strip():
                picked.append(ex)
                if len(picked) == k_shot:
                    break
        if len(picked) < k_shot:
            raise ValueError(f"subject {q.subject!r} has {len(picked)} other questions in the exemplar pool; "
                             f"{k_shot}-shot needs {k_shot}")
        chosen.append(tuple(reversed(picked)))
    return chosen


# -- scoring -----------------------------------------------------------------

def decision_scores(loglikelihoods, q: MMLUQuestion, fmt: str) -> tuple:
    """Letter: the log-likelihoods. Cloze: divided by each answer's length in characters
    (the answer text without the space before it, as lm-eval's acc_norm counts)."""
    if fmt == "letter":
        return tuple(loglikelihoods)
    return tuple(ll / max(1, len(text)) for ll, text in zip(loglikelihoods, q.choices))


class Progress:
    """Questions done / total and rate on stderr: redrawn on a terminal, a line every 10 s otherwise."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = sys.stderr.isatty()
        self.interval = 0.5 if self.tty else 10.0
        self.started = self.last = time.monotonic()

    def update(self, done: int, note: str = "", final: bool = False) -> None:
        """`final`: the last update (also when the work stops before `total`)."""
        now = time.monotonic()
        final = final or done == self.total
        if not self.enabled or (now - self.last < self.interval and not final):
            return
        self.last = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        line = (f"[{self.label}] {done}/{self.total} questions, {rate:.2f} q/s, {elapsed:.0f} s, "
                f"eta {eta:.0f} s{note}")
        sys.stderr.write(("\r\033[K" + line + ("\n" if final else "")) if self.tty else line + "\n")
        sys.stderr.flush()


def prepare(tokenizer, questions, fmt: str, k_shot: int = 0, exemplar_pool=None, max_position=None) -> list:
    """Each question's request for audit.scoring: context ids and the four answers' ids.
    Exemplars for k-shot prompts come from `exemplar_pool` (default: `questions`)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if k_shot < 0:
        raise ValueError(f"k_shot must be >= 0, got {k_shot}")
    exemplars = choose_exemplars(questions, questions if exemplar_pool is None else exemplar_pool, k_shot)
    requests = [encode_request(tokenizer, build_context(q, fmt, shots), answer_texts(q, fmt))
                for q, shots in zip(questions, exemplars)]
    for ctx, conts in requests:
        if max_position is not None and len(ctx) + max(map(len, conts)) > max_position:
            raise ValueError(f"a prompt of {len(ctx) + max(map(len, conts))} tokens exceeds the model's "
                             f"{max_position} positions; use fewer shots (--k-shot)")
    return requests


def score(loaded_model, questions, requests, fmt: str, kv_dtype=None) -> list:
    """QuestionScores of `questions` from their prepared requests, by packed prefill
    (with an fp8 `kv_dtype`, through an emulated fp8 KV cache)."""
    lls = score_requests(loaded_model.model, requests, kv_dtype=kv_dtype)
    return [QuestionScore(q.subject, LETTERS.index(q.answer), ll, decision_scores(ll, q, fmt))
            for q, ll in zip(questions, lls)]


def evaluate(loaded_model, questions, fmt: str = "cloze", k_shot: int = 0, exemplar_pool=None,
             progress: bool = True, label: str = "mmlu", chunk: int = 64) -> MMLUResult:
    """Score every question of `questions` with `loaded_model` (a sut.loading.LoadedModel),
    `chunk` questions per progress update."""
    if not questions:
        raise ValueError("no questions to evaluate")
    started = time.monotonic()
    requests = prepare(loaded_model.tokenizer, questions, fmt, k_shot, exemplar_pool,
                       loaded_model.model.cfg.max_position)
    shown = Progress(f"{label} {fmt} {k_shot}-shot", len(questions), progress)
    scored = []
    for start in range(0, len(questions), chunk):
        part = slice(start, start + chunk)
        scored += score(loaded_model, questions[part], requests[part], fmt)
        shown.update(len(scored))
    return MMLUResult(fmt, k_shot, tuple(scored), seconds=time.monotonic() - started)
