"""The quantization gate: verdicts on synthetic per-question results, the paired
bootstrap against a naive resampling and McNemar's normal interval, input
errors, and (slow) SmolLM2 against a damaged and an upcast copy of itself."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from audit.gate import AuditInputError, AuditResult, ModelSpec, audit, cmd_audit, parse_spec, resolve_spec
from audit.mmlu import MMLUResult, QuestionScore
from audit.stats import Z95, kl_divergence, paired_bootstrap_ci


def _result(correct, answers=None, subjects=None, fmt="cloze"):
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


def test_pass_when_the_drop_is_small_and_the_reference_informative():
    ref = _result(_flags(400, 240))
    cand = _result(_flags(400, 240, flip=[0, 1, 300]))  # -2 +1: 0.25 points
    r = AuditResult(ref, cand, max_drop=1.0)
    assert r.verdict == "PASS"
    assert r.drop_points == pytest.approx(0.25)
    assert r.agreement == pytest.approx(397 / 400)
    assert r.drop_ci95[0] <= 0.25 <= r.drop_ci95[1]
    assert r.to_json()["verdict"] == "PASS"


def test_fail_when_the_drop_exceeds_max_drop():
    ref = _result(_flags(400, 240))
    cand = _result(_flags(400, 240, flip=range(8)))  # 2 points
    r = AuditResult(ref, cand, max_drop=1.5)
    assert r.verdict == "FAIL" and r.drop_points == pytest.approx(2.0)
    assert "more than the 1.5 allowed" in r.reason


def test_inconclusive_when_the_reference_is_at_chance():
    ref = _result(_flags(100, 27))
    r = AuditResult(ref, _result(_flags(100, 27)), max_drop=1.0)
    assert not ref.significantly_above_chance
    assert r.verdict == "INCONCLUSIVE"
    assert "cannot detect damage" in r.reason and "--per-subject" in r.reason and "--format (letter)" in r.reason
    assert "cannot detect damage" in r.summary()


def test_a_large_drop_fails_even_from_a_reference_at_chance():
    r = AuditResult(_result(_flags(100, 27)), _result(_flags(100, 27, flip=range(10))), max_drop=1.0)
    assert r.verdict == "FAIL"


def test_baseline_must_still_be_beaten():
    ref = _result(_flags(400, 240))
    cand = _result(_flags(400, 240, flip=[0]))
    below = AuditResult(ref, cand, 1.0, baseline=_result(_flags(400, 239)))
    assert below.verdict == "FAIL" and below.beats_baseline is False and "baseline" in below.reason
    above = AuditResult(ref, cand, 1.0, baseline=_result(_flags(400, 200)))
    assert above.verdict == "PASS" and above.beats_baseline is True
    assert above.to_json()["baseline_accuracy"] == pytest.approx(0.5)


def test_json_has_the_contracted_keys():
    j = AuditResult(_result(_flags(40, 20)), _result(_flags(40, 19)), 1.0).to_json()
    for key in ("reference_accuracy", "candidate_accuracy", "drop_points", "drop_ci95", "agreement", "kl",
                "questions", "format", "chance", "verdict", "baseline_accuracy"):
        assert key in j
    assert j["questions"] == 40 and j["format"] == "cloze" and j["chance"] == 0.25
    assert j["baseline_accuracy"] is None and len(j["drop_ci95"]) == 2
    assert set(j["per_subject"]) == {"subject 0", "subject 1", "subject 2"}
    json.dumps(j)


def test_per_subject_drops_and_kl():
    subjects = ["a"] * 4 + ["b"] * 4
    ref = _result([True] * 8, subjects=subjects)
    cand = _result([False, True, True, True] + [True] * 4, subjects=subjects)
    r = AuditResult(ref, cand, 2.0)
    drops = {s.subject: s.drop_points for s in r.per_subject}
    assert drops == pytest.approx({"a": 25.0, "b": 0.0})
    # KL by hand over the one question that differs (the others are identical distributions).
    p = np.exp(ref.questions[0].scores) / np.sum(np.exp(ref.questions[0].scores))
    q = np.exp(cand.questions[0].scores) / np.sum(np.exp(cand.questions[0].scores))
    assert r.kl == pytest.approx(float(np.sum(p * np.log(p / q))) / 8)
    assert kl_divergence([[0.0, 0.0]], [[0.0, 0.0]]) == pytest.approx([0.0])


def test_results_on_different_questions_are_refused():
    with pytest.raises(AuditInputError, match="not scored on the reference's questions"):
        AuditResult(_result(_flags(40, 20)), _result(_flags(40, 20), answers=[0] * 40), 1.0)


def _paired_sample(rng, n, p_ref_only, p_cand_only, p_both):
    u = rng.random(n)
    ref = (u < p_ref_only) | ((u >= p_ref_only + p_cand_only) & (u < p_ref_only + p_cand_only + p_both))
    cand = ((u >= p_ref_only) & (u < p_ref_only + p_cand_only + p_both))
    return ref, cand


def test_bootstrap_ci_agrees_with_naive_resampling_and_mcnemar():
    rng = np.random.default_rng(1)
    ref, cand = _paired_sample(rng, 1500, 0.08, 0.03, 0.3)
    lo, hi = paired_bootstrap_ci(ref, cand)
    # Naive bootstrap: resample question indices.
    idx = rng.integers(0, ref.size, size=(4000, ref.size))
    naive = np.quantile((ref[idx].astype(int) - cand[idx].astype(int)).mean(axis=1), [0.025, 0.975])
    assert (lo, hi) == pytest.approx(tuple(naive), abs=0.003)
    # McNemar's normal interval for a paired difference of proportions.
    n, b, c = ref.size, np.sum(ref & ~cand), np.sum(~ref & cand)
    d = (b - c) / n
    half = Z95 * math.sqrt((b + c) / n - d * d) / math.sqrt(n)
    assert (lo, hi) == pytest.approx((d - half, d + half), abs=0.003)


def test_bootstrap_ci_covers_the_true_drop():
    rng = np.random.default_rng(2)
    true_drop = 0.05 - 0.02
    covered = 0
    for trial in range(200):
        ref, cand = _paired_sample(rng, 800, 0.05, 0.02, 0.3)
        lo, hi = paired_bootstrap_ci(ref, cand, n_resamples=2000, seed=trial)
        covered += lo <= true_drop <= hi
    assert 0.90 <= covered / 200 <= 0.99


@pytest.mark.parametrize("bad", [0, -0.5, 2.01, 5, math.nan, "1", True])
def test_bad_max_drop_is_refused_before_any_work(bad):
    with pytest.raises(AuditInputError, match=r"max_drop must be .* in \(0, 2.0\]"):
        audit("no-such-model", "no-such-model", max_drop=bad)


@pytest.mark.parametrize("spec,message", [
    ("", "empty"),
    ("smollm2-135m@int4", "dtype 'int4' is not one of"),
    ("smollm2-135m+noise0", "must be a number > 0"),
    ("smollm2-135m@bfloat16+noisex", "must be a number > 0"),
])
def test_bad_spec_syntax(spec, message):
    with pytest.raises(AuditInputError, match=message):
        parse_spec(spec)


def test_spec_grammar():
    assert parse_spec("smollm2-135m") == ModelSpec("smollm2-135m", None, 0.0)
    s = parse_spec("/tmp/a@b/model.gguf@fp8+noise0.05")
    assert (s.target, s.dtype, s.noise) == ("/tmp/a@b/model.gguf", "fp8", 0.05)
    assert str(parse_spec("m@float32+noise0.2")) == "m@float32+noise0.2"


@pytest.mark.parametrize("target,message", [
    ("no-such-model", "neither a model name from conf/models"),
    ("llama3.1-8b", "cannot be audited: .*synthetic weights"),
])
def test_unresolvable_spec(target, message):
    with pytest.raises(AuditInputError, match=message):
        resolve_spec(parse_spec(target))


def _args(**kw):
    base = dict(reference="smollm2-135m", candidate="smollm2-135m", max_drop=1.0, baseline=None, per_subject=1,
                fmt="cloze", k_shot=0, json=True, no_progress=True, subjects=None)
    return SimpleNamespace(**{**base, **kw})


def test_cli_bad_input_exits_2(capsys):
    assert cmd_audit(_args(max_drop=3.0)) == 2
    assert cmd_audit(_args(reference="no-such-model")) == 2
    assert "neither a model name" in capsys.readouterr().err


# First questions of subjects that bf16 SmolLM2 answers right in the cloze format with a clear
# margin (>= 0.23 nats/char between its two best answers; float32 moves margins by < 0.03),
# measured: rounding cannot flip them, scrambled weights can. Elsewhere the model is at chance
# and no damage could be seen on a handful of questions.
CLEAR_SUBJECTS = ["high school geography", "human aging", "human sexuality", "marketing", "moral scenarios",
                  "nutrition"]


@pytest.fixture
def one_thread():
    """The test machine's cores are shared: one thread avoids OpenMP threads waiting on each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_smollm2_with_noisy_weights_fails(mmlu_path, one_thread):
    r = audit("smollm2-135m", "smollm2-135m@bfloat16+noise0.5", per_subject=1, subjects=CLEAR_SUBJECTS,
              mmlu_path=mmlu_path, progress=False)
    assert r.reference.overall.correct == len(CLEAR_SUBJECTS) and r.reference.significantly_above_chance
    assert r.verdict == "FAIL" and r.drop_points > 1.0 and r.agreement < 1.0


@pytest.mark.slow
def test_smollm2_float32_does_not_fail(mmlu_path, one_thread, capsys):
    code = cmd_audit(_args(candidate="smollm2-135m@float32", subjects=CLEAR_SUBJECTS))
    out = json.loads(capsys.readouterr().out)
    assert code in (0, 3) and out["verdict"] in ("PASS", "INCONCLUSIVE")
    assert out["questions"] == len(CLEAR_SUBJECTS) and out["drop_points"] <= 1.0


def test_fp8_without_sut_quant_is_a_clear_error(monkeypatch, smollm2_gguf_path):
    import sys

    from audit.gate import load_spec

    monkeypatch.setitem(sys.modules, "sut.quant", None)  # as if sut/quant.py did not exist
    with pytest.raises(AuditInputError, match="fp8 is unavailable"):
        load_spec(parse_spec(f"{smollm2_gguf_path}@fp8"))


def test_reasons_say_when_the_ci_straddles_the_limit():
    ref = _result(_flags(200, 120))
    weak_fail = AuditResult(ref, _result(_flags(200, 120, flip=range(3))), max_drop=1.0)  # 1.5 points
    assert weak_fail.verdict == "FAIL" and "do not prove a drop above the limit" in weak_fail.reason
    weak_pass = AuditResult(ref, _result(_flags(200, 120, flip=[0])), max_drop=1.0)  # 0.5 points
    assert weak_pass.verdict == "PASS" and "cannot rule out a drop above the limit" in weak_pass.reason
