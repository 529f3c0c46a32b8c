"""The data set as LoadGen samples: MMLU questions as tokenized chat prompts.

Every prompt asks for the answer's letter first and then a one-sentence
explanation, so that performance runs decode more than one token and accuracy
runs can score the first letter of the answer.
"""
from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")


class DatasetError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class MMLUQuestion:
    subject: str
    question: str
    choices: tuple
    answer: str  # "A".."D"


def load_mmlu(path: Path) -> list[MMLUQuestion]:
    """All well-formed questions of an MMLU jsonl file, in file order.

    Lines whose answer is not one of A-D are rejected and counted in a warning;
    a line that is not JSON, or lacks a field, is an error naming the line.
    """
    questions, rejected = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                fields = [row["question"], row["answer_a"], row["answer_b"], row["answer_c"],
                          row["answer_d"], row["correct_answer"], row["topic"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(f"{path}:{lineno}: not an MMLU record ({type(e).__name__}: {e})") from None
            question, a, b, c, d, answer, topic = fields
            if answer not in LETTERS:
                rejected.append(lineno)
                continue
            questions.append(MMLUQuestion(topic, question, (a, b, c, d), answer))
    if rejected:
        log.warning("%s: rejected %d malformed line(s) whose correct_answer is not A-D (lines %s)",
                    path, len(rejected), ", ".join(map(str, rejected[:10])))
    if not questions:
        raise DatasetError(f"{path}: no well-formed MMLU questions")
    return questions


def select_per_subject(questions: list[MMLUQuestion], per_subject: int | None) -> list[MMLUQuestion]:
    """The first `per_subject` questions of each subject (all when None), subjects sorted."""
    if per_subject is None:
        return list(questions)
    by_subject = defaultdict(list)
    for q in questions:
        by_subject[q.subject].append(q)
    return [q for subject in sorted(by_subject) for q in by_subject[subject][:per_subject]]


def user_message(q: MMLUQuestion) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, q.choices))
    subject = q.subject.replace("_", " ")
    return (f"The following is a multiple choice question about {subject}.\n\n{q.question}\n\n{options}\n\n"
            "Reply with the letter of the correct answer (A, B, C or D) first, "
            "then explain your choice in one short sentence.")


def build_prompts(questions: list[MMLUQuestion], tokenizer) -> list[np.ndarray]:
    """Chat-formatted prompts as int32 token ids, one per question."""
    prompts = []
    for q in questions:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_message(q)}])
        prompts.append(np.asarray(tokenizer.encode(text), dtype=np.int32))
    return prompts


# "Answer: B", "the answer is (B)", "Correct answer - B.": an explicit statement wins wherever it is.
_EXPLICIT = re.compile(r"\b(?i:answer)\s*(?:is\s*)?[:\-]?\s*[(\[*]*([ABCD])(?![A-Za-z'])")
# "B", "B.", "(B)", "B) ...", "**B:** ...", "**B** ...": a letter standing alone where the answer starts,
# followed by ".", ")", ":" or the end of the line, or set in bold. "A whale is ..." is the article.
_LEADING = re.compile(r"\s*(?:\*\*([ABCD])\*\*|[(\[*]*([ABCD])\**(?:[.):\]]|\s*$|\s*\n))")


def parse_answer_letter(text: str) -> str | None:
    """The answer letter of a generated answer, or None (see _EXPLICIT and _LEADING)."""
    m = _EXPLICIT.search(text) or _LEADING.match(text)
    return m.group(m.lastindex) if m else None


class LoadGenQSL:
    """LoadGen's query sample library over samples already in memory."""

    def __init__(self, n_samples: int, performance_count: int):
        import mlperf_loadgen as lg

        self._lg = lg
        self.handle = lg.ConstructQSL(n_samples, min(performance_count, n_samples),
                                      self._load, self._unload)

    def _load(self, indices) -> None:
        """Samples are tokenized up front; nothing to load."""

    def _unload(self, indices) -> None:
        """Nothing was loaded."""

    def __enter__(self) -> "LoadGenQSL":
        return self

    def __exit__(self, *exc) -> None:
        self._lg.DestroyQSL(self.handle)
