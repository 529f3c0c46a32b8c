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
as lm-eval does. The prompt up to "Answer:" is shared by the four answers: it
is run once, its KV cache is copied to four slots, and the four continuations
run as one right-padded batch.
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from audit.stats import binomial_sf, log_softmax, wilson_interval
from harness.loadgen.qsl import LETTERS, MMLUQuestion
from sut.kv_cache import SlotKVCache

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


def encode_request(tokenizer, context: str, continuations) -> tuple[list, list]:
    """Token ids of the context and of each continuation as it tokenizes after it.

    As lm-eval does: the continuation's tokens are those of context+continuation
    past the context's tokens, so the answer is scored as the model would read it.
    """
    ctx = tokenizer.encode(context, add_special_tokens=True)
    plain_len = len(tokenizer.encode(context))
    conts = []
    for text in continuations:
        ids = tokenizer.encode(context + text)[plain_len:]
        if not ids:
            raise ValueError(f"continuation {text!r} adds no tokens after the context")
        conts.append(ids)
    return ctx, conts


# -- scoring -----------------------------------------------------------------

class ChoiceScorer:
    """Log-likelihoods of N_CHOICES continuations of one context, sharing its prefill."""

    def __init__(self, model, max_len: int):
        cfg = model.cfg
        if max_len > cfg.max_position:
            raise ValueError(f"a prompt of {max_len} tokens exceeds the model's {cfg.max_position} positions; "
                             "use fewer shots (--k-shot)")
        weight = model.embed_tokens.weight
        self.model, self.device = model, weight.device
        self.cache = SlotKVCache(cfg.n_layers, N_CHOICES, cfg.n_kv_heads, max_len, cfg.head_dim,
                                 weight.dtype, weight.device)

    def loglikelihoods(self, context: list, continuations: list) -> tuple:
        n = len(context)
        ids = torch.tensor([context], device=self.device)
        positions = torch.arange(n, device=self.device).unsqueeze(0)
        self.cache.bind([0], positions)
        last = self.model(ids, positions, self.cache, logits_at=torch.tensor([[n - 1]], device=self.device))
        first = torch.log_softmax(last[0, -1], dim=-1)  # (V,)
        totals = [float(first[c[0]]) for c in continuations]
        # Only the continuations' own tokens but the last need a forward pass:
        # each predicts the next one. Single-token answers (letters) need none.
        width = max(len(c) for c in continuations) - 1
        if width == 0:
            return tuple(totals)
        for cache in (self.cache.k, self.cache.v):  # (L, slots, H_kv, S, D)
            cache[:, 1:, :, :n] = cache[:, :1, :, :n]
        ids = torch.zeros(N_CHOICES, width, dtype=torch.long)
        for row, c in enumerate(continuations):
            ids[row, : len(c) - 1] = torch.tensor(c[:-1])
        # Right padding: pad positions lie past each row's tokens, so no real token attends to them.
        positions = (n + torch.arange(width)).expand(N_CHOICES, -1).to(self.device)
        self.cache.bind(list(range(N_CHOICES)), positions)
        logp = torch.log_softmax(self.model(ids.to(self.device), positions, self.cache), dim=-1)  # (4, W, V)
        for row, c in enumerate(continuations):
            targets = torch.tensor(c[1:], dtype=torch.long, device=self.device)
            totals[row] += float(logp[row, torch.arange(len(c) - 1, device=self.device), targets].double().sum())
        return tuple(totals)


def decision_scores(loglikelihoods, q: MMLUQuestion, fmt: str) -> tuple:
    """Letter: the log-likelihoods. Cloze: divided by each answer's length in characters
    (the answer text without the space before it, as lm-eval's acc_norm counts)."""
    if fmt == "letter":
        return tuple(loglikelihoods)
    return tuple(ll / max(1, len(text)) for ll, text in zip(loglikelihoods, q.choices))


class _Progress:
    """Questions done / total and rate on stderr: redrawn on a terminal, a line every 10 s otherwise."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = sys.stderr.isatty()
        self.interval = 0.5 if self.tty else 10.0
        self.started = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        final = done == self.total
        if not self.enabled or (now - self.last < self.interval and not final):
            return
        self.last = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        line = f"[{self.label}] {done}/{self.total} questions, {rate:.2f} q/s, {elapsed:.0f} s, eta {eta:.0f} s"
        sys.stderr.write(("\r\033[K" + line + ("\n" if final else "")) if self.tty else line + "\n")
        sys.stderr.flush()


def evaluate(loaded_model, questions, fmt: str = "cloze", k_shot: int = 0, exemplar_pool=None,
             progress: bool = True, label: str = "mmlu") -> MMLUResult:
    """Score every question of `questions` with `loaded_model` (a sut.loading.LoadedModel).

    Exemplars for k-shot prompts come from `exemplar_pool` (default: `questions`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if k_shot < 0:
        raise ValueError(f"k_shot must be >= 0, got {k_shot}")
    if not questions:
        raise ValueError("no questions to evaluate")
    started = time.monotonic()
    tokenizer = loaded_model.tokenizer
    exemplars = choose_exemplars(questions, questions if exemplar_pool is None else exemplar_pool, k_shot)
    requests = []
    for q, shots in zip(questions, exemplars):
        requests.append(encode_request(tokenizer, build_context(q, fmt, shots), answer_texts(q, fmt)))
    scorer = ChoiceScorer(loaded_model.model, max(len(ctx) + max(map(len, conts)) for ctx, conts in requests))
    shown = _Progress(f"{label} {fmt} {k_shot}-shot", len(questions), progress)
    scored = []
    for done, (q, (ctx, conts)) in enumerate(zip(questions, requests), 1):
        ll = scorer.loglikelihoods(ctx, conts)
        scored.append(QuestionScore(q.subject, LETTERS.index(q.answer), ll, decision_scores(ll, q, fmt)))
        shown.update(done)
    return MMLUResult(fmt, k_shot, tuple(scored), seconds=time.monotonic() - started)
