"""`wallperf audit` end to end: the seeded draw order, stopping at the first decided look,
the baseline's costs, input errors; (slow) SmolLM2 against a damaged and an upcast copy."""
import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

import wallperf.audit.gate as gate
from wallperf.audit.gate import audit, cmd_audit, draw_order
from wallperf.audit.specs import AuditInputError
from wallperf.harness.loadgen.qsl import load_mmlu

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_draw_order_is_a_seeded_permutation():
    order = draw_order(14042)
    assert sorted(order) == list(range(14042))
    assert list(order[:50]) == list(draw_order(14042)[:50]) != list(draw_order(14042, seed=1)[:50])


def test_runs_to_the_pool_when_undecided(tiny_llama_folder, tiny_mmlu_path):
    """A random model is at chance: no PASS, so every question of the pool is drawn, in the seeded order."""
    r = audit(str(tiny_llama_folder), f"{tiny_llama_folder}@bf16", max_drop=2.0,
              baseline_spec=f"{tiny_llama_folder}+noise1", mmlu_path=tiny_mmlu_path, progress=False,
              look_every=16, max_questions=None)
    pool = load_mmlu(tiny_mmlu_path)
    assert r.verdict.verdict == "INCONCLUSIVE" and r.verdict.questions == r.verdict.population == 60
    expected = [pool[i] for i in draw_order(60)]
    assert [(q.subject, "ABCD"[q.answer]) for q in r.verdict.reference.questions] == [
        (q.subject, q.answer) for q in expected]
    j = r.to_json()
    assert set(j["models"]) == {"reference", "candidate", "baseline"}
    assert j["models"]["reference"]["weight_dtype"] == "float32"
    assert j["models"]["candidate"]["bytes_per_token"] == j["models"]["reference"]["bytes_per_token"] / 2
    assert j["baseline_comparison"]["verdict"] in ("quantized", "small", "undecided")
    assert j["hardware"] == "cpu" and j["max_questions"] is None
    json.dumps(j)


def test_stops_at_the_first_decided_look(tiny_llama_folder, tiny_mmlu_path, monkeypatch):
    looks = []

    def decided_at_32(reference, candidate, max_drop, population):
        looks.append(len(reference))
        return "PASS" if len(reference) >= 32 else None

    monkeypatch.setattr(gate, "decide", decided_at_32)
    r = audit(str(tiny_llama_folder), str(tiny_llama_folder), mmlu_path=tiny_mmlu_path, progress=False,
              look_every=16)
    assert looks == [16, 32] and r.verdict.questions == 32


def test_max_questions_caps_the_draw(tiny_llama_folder, tiny_mmlu_path):
    r = audit(str(tiny_llama_folder), str(tiny_llama_folder), mmlu_path=tiny_mmlu_path, progress=False,
              look_every=8, max_questions=20, subjects=["virology", "anatomy"])
    assert r.verdict.questions == 20 and r.verdict.population == 40 and r.max_questions == 20
    assert {q.subject for q in r.verdict.reference.questions} <= {"virology", "anatomy"}
    assert r.verdict.verdict == "INCONCLUSIVE" and "--max-questions" in r.verdict.reason


def test_kv_dtype_fp8_runs_the_candidate_over_an_fp8_cache(tiny_llama_folder, tiny_mmlu_path):
    plain = audit(str(tiny_llama_folder), str(tiny_llama_folder), mmlu_path=tiny_mmlu_path, progress=False,
                  max_questions=16, look_every=16)
    fp8 = audit(str(tiny_llama_folder), str(tiny_llama_folder), mmlu_path=tiny_mmlu_path, progress=False,
                max_questions=16, look_every=16, kv_dtype="fp8", hardware="mi300x")
    assert fp8.specs["candidate"].endswith("--kv-dtype fp8") and fp8.specs["reference"] == str(tiny_llama_folder)
    assert [q.loglikelihoods for q in fp8.verdict.reference.questions] == [
        q.loglikelihoods for q in plain.verdict.reference.questions]
    assert [q.loglikelihoods for q in fp8.verdict.candidate.questions] != [
        q.loglikelihoods for q in plain.verdict.candidate.questions]


def _args(**kw):
    base = dict(reference="smollm2-135m", candidate="smollm2-135m", max_drop=1.0, baseline=None, per_subject=1,
                fmt="cloze", k_shot=0, json=True, no_progress=True, subjects=None, hardware="cpu",
                max_questions=None, seed=0, kv_dtype="auto")
    return SimpleNamespace(**{**base, **kw})


def test_cli_bad_input_exits_2(capsys):
    assert cmd_audit(_args(max_drop=3.0)) == 2
    assert cmd_audit(_args(reference="no-such-model")) == 2
    assert "neither a model name" in capsys.readouterr().err
    assert cmd_audit(_args(hardware="no-such-gpu")) == 2
    assert "no-such-gpu" in capsys.readouterr().err
    assert cmd_audit(_args(max_questions=0)) == 2
    assert cmd_audit(_args(kv_dtype="int4")) == 2 and "int4" in capsys.readouterr().err


def test_bad_input_is_refused_before_any_work():
    with pytest.raises(AuditInputError, match="format 'essay'"):
        audit("no-such-model", "no-such-model", fmt="essay")


# Questions bf16 SmolLM2 answers right in the cloze format with a margin of at least 0.05 nats/char
# between its two best answers, measured over the first three questions of every subject (index
# within the subject's questions): a damaged copy at chance gets most of them wrong. Elsewhere the
# model is near chance and no damage could be seen on a few dozen questions.
CLEAR_QUESTIONS = {
    "astronomy": (1,), "clinical knowledge": (2,), "college medicine": (2,), "electrical engineering": (1,),
    "global facts": (2,), "high school biology": (0,), "high school chemistry": (1,),
    "high school european history": (2,), "high school geography": (0, 1), "high school psychology": (2,),
    "high school us history": (1,), "high school world history": (1,), "human aging": (0,),
    "human sexuality": (0, 2), "jurisprudence": (1, 2), "machine learning": (2,), "management": (2,),
    "marketing": (0, 1), "moral disputes": (1,), "moral scenarios": (0, 2), "nutrition": (0,), "prehistory": (2,),
    "us foreign policy": (1,)}


@pytest.mark.slow
def test_smollm2_with_noisy_weights_fails(mmlu_path):
    from wallperf.harness.loadgen.qsl import select_per_subject

    seen, pool = Counter(), []
    for q in select_per_subject(load_mmlu(mmlu_path), 3):
        if seen[q.subject] in CLEAR_QUESTIONS.get(q.subject, ()):
            pool.append(q)
        seen[q.subject] += 1
    r = audit("smollm2-135m", "smollm2-135m@bf16+noise0.5", fmt="cloze", questions=pool, progress=False)
    assert len(pool) == 28 and r.verdict.reference.overall.correct >= len(pool) - 2
    assert r.verdict.verdict == "FAIL" and r.verdict.drop_ci95[0] > 1.0


@pytest.mark.slow
def test_smollm2_float32_is_not_failed(mmlu_path, capsys):
    code = cmd_audit(_args(candidate="smollm2-135m@fp32", per_subject=None, max_questions=32))
    out = json.loads(capsys.readouterr().out)
    assert code == 3 and out["verdict"] == "INCONCLUSIVE" and out["questions"] == 32
    assert out["agreement"] > 0.9 and np.isfinite(out["drop_ci95"]).all()
