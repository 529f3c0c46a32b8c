"""The gate's verdict on synthetic per-question results: decided by the drop's confidence
interval, never by its point estimate; MLPerf's point-estimate rule reported beside it."""
import json
import math

import numpy as np
import pytest

from wallperf.audit.mmlu import MMLUResult, QuestionScore
from wallperf.audit.sequential import confidence_interval
from wallperf.audit.specs import AuditInputError
from wallperf.audit.verdict import Verdict, check_max_drop, decide


def _result(correct, answers=None, subjects=None, fmt="letter"):
    """Per-question scores whose argmax is the answer where `correct`, the next choice elsewhere."""
    n = len(correct)
    answers = [i % 4 for i in range(n)] if answers is None else answers
    subjects = [f"subject {i % 3}" for i in range(n)] if subjects is None else subjects
    questions = []
    for ok, answer, subject in zip(correct, answers, subjects):
        pick = answer if ok else (answer + 1) % 4
        scores = tuple(-1.0 if i == pick else -2.0 - 0.1 * i for i in range(4))
        questions.append(QuestionScore(subject, answer, scores, scores))
    return MMLUResult(fmt, 0, tuple(questions))


def _flags(n, n_correct, flip=()):
    flags = [i < n_correct for i in range(n)]
    for i in flip:
        flags[i] = not flags[i]
    return flags


def _spread(n, n_correct, flips, seed=0):
    """Reference flags (n_correct right, shuffled) and the candidate's with `flips` of the
    reference's right answers made wrong, as a random draw order would interleave them."""
    rng = np.random.default_rng(seed)
    ref = rng.permutation(_flags(n, n_correct))
    cand = ref.copy()
    cand[rng.choice(np.flatnonzero(ref), flips, replace=False)] = False
    return list(ref), list(cand)


def test_pass_when_the_whole_ci_lies_within_the_limit():
    ref, cand = _spread(1500, 900, 2)
    v = Verdict(_result(ref), _result(cand), max_drop=1.0, population=14042)
    lo, hi = v.drop_ci95
    assert v.verdict == "PASS" and hi < 1.0 and lo <= v.drop_points <= hi
    assert v.drop_points == pytest.approx(100 * 2 / 1500)
    assert v.agreement == pytest.approx(1 - 2 / 1500)
    assert "whole CI lies within" in v.reason and v.to_json()["verdict"] == "PASS"


def test_fail_when_the_whole_ci_lies_above_the_limit():
    ref, cand = _spread(400, 240, 40)  # 10 points
    v = Verdict(_result(ref), _result(cand), max_drop=2.0, population=14042)
    assert v.verdict == "FAIL" and v.drop_ci95[0] > 2.0
    assert "whole CI lies above" in v.reason


def test_the_point_estimate_decides_nothing():
    """A drop of 1.5 points on 200 questions: MLPerf's rule fails it at a 1-point limit,
    but the CI holds the limit, so the audit does not decide; a small drop with a wide CI
    is not a PASS either."""
    ref, cand = _spread(200, 120, 3)
    over = Verdict(_result(ref), _result(cand), max_drop=1.0, population=14042)
    assert over.point_estimate_verdict == "FAIL" and over.verdict == "INCONCLUSIVE"
    assert "neither prove" in over.reason and "--max-questions" in over.reason
    ref, cand = _spread(200, 120, 1)
    under = Verdict(_result(ref), _result(cand), max_drop=1.0, population=14042)
    assert under.point_estimate_verdict == "PASS" and under.verdict == "INCONCLUSIVE"
    assert under.drop_ci95[1] > 1.0


def test_no_pass_from_a_reference_at_chance():
    ref = list(np.random.default_rng(1).permutation(_flags(1500, 390)))  # 26%
    v = Verdict(_result(ref), _result(ref), max_drop=2.0, population=14042)
    assert v.drop_ci95[1] < 2.0 and v.reference_accuracy_ci95[0] < 0.25
    assert v.verdict == "INCONCLUSIVE" and "cannot detect damage" in v.reason and "--format (cloze)" in v.reason


def test_a_large_drop_fails_even_from_a_reference_at_chance():
    ref, cand = _spread(300, 80, 40)
    assert Verdict(_result(ref), _result(cand), max_drop=1.0, population=14042).verdict == "FAIL"


def test_decide_matches_the_intervals():
    """decide() (used after every batch) agrees with the intervals the verdict reports."""
    for seed in range(20):
        ref, cand = _spread(600, 350, seed % 10, seed)
        v = Verdict(_result(ref), _result(cand), max_drop=1.0, population=14042)
        lo, hi = v.drop_ci95
        above_chance = v.reference_accuracy_ci95[0] > 0.25
        expected = "FAIL" if lo > 1.0 else "PASS" if hi < 1.0 and above_chance else None
        assert decide(ref, cand, 1.0, 14042) == expected
        assert v.verdict == (expected or "INCONCLUSIVE")


def test_json_has_the_contracted_keys():
    ref, cand = _spread(40, 20, 1)
    j = Verdict(_result(ref), _result(cand), 1.0, population=100).to_json()
    for key in ("reference_accuracy", "candidate_accuracy", "drop_points", "drop_ci95", "drop_ci95_fixed_n",
                "agreement", "flip_rate", "kl", "questions", "population", "format", "chance", "verdict",
                "point_estimate_verdict", "reason", "reference_ci95", "candidate_ci95"):
        assert key in j
    assert j["questions"] == 40 and j["population"] == 100 and j["format"] == "letter" and j["chance"] == 0.25
    assert j["drop_ci95"] == pytest.approx([100 * x for x in confidence_interval(
        np.array(ref, float) - np.array(cand, float), 100)])
    assert set(j["per_subject"]) == {"subject 0", "subject 1", "subject 2"}
    json.dumps(j)


def test_per_subject_drops_and_kl():
    subjects = ["a"] * 4 + ["b"] * 4
    ref = _result([True] * 8, subjects=subjects)
    cand = _result([False, True, True, True] + [True] * 4, subjects=subjects)
    v = Verdict(ref, cand, 2.0)
    assert {s.subject: s.drop_points for s in v.per_subject} == pytest.approx({"a": 25.0, "b": 0.0})
    # KL by hand over the one question that differs (the others are identical distributions).
    p = np.exp(ref.questions[0].scores) / np.sum(np.exp(ref.questions[0].scores))
    q = np.exp(cand.questions[0].scores) / np.sum(np.exp(cand.questions[0].scores))
    assert v.kl == pytest.approx(float(np.sum(p * np.log(p / q))) / 8)


def test_results_on_different_questions_are_refused():
    with pytest.raises(AuditInputError, match="not scored on the reference's questions"):
        Verdict(_result(_flags(40, 20)), _result(_flags(40, 20), answers=[0] * 40), 1.0)


@pytest.mark.parametrize("bad", [0, -0.5, 2.01, 5, math.nan, "1", True])
def test_bad_max_drop_is_refused(bad):
    with pytest.raises(AuditInputError, match=r"max_drop must be .* in \(0, 2.0\]"):
        check_max_drop(bad)
