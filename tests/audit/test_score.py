"""`wallperf mmlu`: one model's score on the audit's pool and order, the same figures the
audit gives its reference, a Wilson interval recomputed here, and bad input."""
import json
from types import SimpleNamespace

import pytest

from wallperf.audit.gate import audit
from wallperf.audit.score import cmd_mmlu, score_model, to_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_score_is_the_audits_reference_score(tiny_llama_folder, tiny_mmlu_path):
    result, population = score_model(str(tiny_llama_folder), max_questions=24, mmlu_path=tiny_mmlu_path,
                                     progress=False)
    ref = audit(str(tiny_llama_folder), str(tiny_llama_folder), mmlu_path=tiny_mmlu_path, progress=False,
                look_every=24, max_questions=24).verdict.reference
    assert population == 60 and result.overall.total == 24
    assert [(q.subject, q.answer, q.predicted) for q in result.questions] == [
        (q.subject, q.answer, q.predicted) for q in ref.questions]
    j = to_json(str(tiny_llama_folder), result, population)
    correct = sum(q.predicted == q.answer for q in result.questions)
    assert j["correct"] == correct and j["accuracy"] == pytest.approx(correct / 24)
    # Wilson's 95% interval, from its formula.
    p, n, z = correct / 24, 24, 1.959963984540054
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * (p * (1 - p) / n
                                                                                    + z * z / (4 * n * n)) ** 0.5
    assert j["accuracy_ci95"] == pytest.approx([centre - half, centre + half], abs=1e-9)
    assert sum(s["questions"] for s in j["per_subject"].values()) == 24
    json.dumps(j)


def _args(**kw):
    base = dict(model="smollm2-135m", fmt="letter", per_subject=1, subjects=None, k_shot=0, max_questions=None,
                seed=0, hardware="cpu", json=False, no_progress=True)
    return SimpleNamespace(**{**base, **kw})


def test_bad_input_exits_2_before_any_loading(capsys):
    assert cmd_mmlu(_args(model="no-such-model")) == 2
    assert cmd_mmlu(_args(model="smollm2-135m@int3")) == 2
    assert cmd_mmlu(_args(per_subject=0)) == 2
    assert cmd_mmlu(_args(max_questions=-1)) == 2
    assert cmd_mmlu(_args(subjects=["astrology"])) == 2 and "astrology" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--max-questions", "nan"), ("--per-subject", "0"), ("--k-shot", "-1"),
                                         ("--max-questions", "1e9x")])
def test_bad_numbers_on_the_command_line_exit_2(flag, value, capsys):
    from wallperf.cli import main

    with pytest.raises(SystemExit) as e:
        main(["mmlu", "--model", "smollm2-135m", flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err
