"""MMLU scoring as `wallperf run` does it, against hand-labelled answers: the answer
parser on generated texts, and end to end, texts answered through the LoadGen adapter
in an AccuracyOnly test, read back from LoadGen's own accuracy log and scored.

The labels were written by hand from the texts (what a reader takes the model to have
answered), never from the parser's output."""
import mlperf_loadgen as lg
import numpy as np
import pytest

from wallperf.harness.loadgen.qsl import LoadGenQSL, MMLUQuestion, parse_answer_letter
from wallperf.harness.loadgen.results import score_mmlu
from wallperf.harness.loadgen.settings import log_settings
from wallperf.sut.adapter import LoadGenSUT
from wallperf.sut.engine.engine import SamplingParams
from wallperf.sut.queues import queue_for

# (generated text, the letter a reader takes it to answer; None: no answer given)
LABELLED = [
    ("B", "B"),
    ("B.", "B"),
    ("(C) Because the ratio is fixed.", "C"),
    ("D) 42", "D"),
    ("A: the mitochondria.", "A"),
    ("A. A whale is a mammal.", "A"),
    ("A whale is a mammal, so B.", None),
    ("Answer: C", "C"),
    ("The answer is (D).", "D"),
    ("After weighing both, the answer is B because of X.", "B"),
    ("A good question. Answer: D", "D"),
    ("**C** is right.", "C"),
    ("**C**: it is right.", "C"),
    ("C\nBecause the others are wrong.", "C"),
    ("A", "A"),
    ("All of these could be true.", None),
    ("I am not sure.", None),
    ("Both A and B look right.", None),
]


@pytest.mark.parametrize("text, letter", LABELLED)
def test_parser_against_hand_labels(text, letter):
    assert parse_answer_letter(text) == letter


class ByteTokenizer:
    """Token ids are the text's UTF-8 bytes."""

    eos_token_id = 0

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode())

    @staticmethod
    def decode(ids) -> str:
        return bytes(ids).decode()


def answering(step_backend, texts):
    """A backend that answers the sample whose prompt is [i] with texts[i], one byte per step."""
    answers = [ByteTokenizer.encode(t) for t in texts]
    return step_backend(4, length=lambda prompt, params: len(answers[int(prompt[0])]),
                        token=lambda prompt, k: answers[int(prompt[0])][k - 1])


def test_scored_end_to_end_from_loadgens_accuracy_log(tmp_path, step_backend):
    # Each text answered with at least two tokens (LoadGen needs n_tokens > 1).
    texts = [t if len(t) > 1 else t + "." for t, _ in LABELLED]
    labels = [letter for _, letter in LABELLED]
    # Questions' correct answers, hand-chosen: right for the first eight labelled answers, wrong after.
    truth = [letter if i < 8 and letter else "A" if letter != "A" else "B" for i, letter in enumerate(labels)]
    questions = [MMLUQuestion("subject", f"q{i}", ("a", "b", "c", "d"), t) for i, t in enumerate(truth)]
    n = len(texts)
    prompts = [np.array([i], dtype=np.int32) for i in range(n)]
    settings = lg.TestSettings()
    settings.scenario = lg.TestScenario.Offline
    settings.mode = lg.TestMode.AccuracyOnly
    settings.offline_expected_qps = 100
    params = SamplingParams(max_new_tokens=64, min_new_tokens=2)
    with LoadGenQSL(n, n) as qsl, \
            LoadGenSUT(answering(step_backend, texts), queue_for("Offline", [1] * n), prompts, params,
                       report_first_token=False) as sut:
        sut.run_test(lambda: lg.StartTestWithLogSettings(sut.handle, qsl.handle, settings, log_settings(tmp_path)))
    score = score_mmlu(tmp_path / "mlperf_log_accuracy.json", questions, ByteTokenizer())
    # By hand: the first eight labels are A-D except "A whale is a mammal, so B." (None): 7 right.
    # After that, every labelled answer differs from its truth: 0 right. Unanswered: 4 of 18.
    assert score == {"accuracy": 7 / 18, "correct": 7, "total": 18, "unparsed": 4}
