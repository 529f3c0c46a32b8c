"""MMLU scoring against independent references: HF transformers' logits for the
log-likelihoods, Newcombe's published Wilson intervals, exact binomial sums."""
import math
from fractions import Fraction

import pytest
import torch

from wallperf.audit.mmlu import Accuracy, build_context, choose_exemplars, evaluate
from wallperf.audit.stats import binomial_sf, wilson_interval
from wallperf.harness.loadgen.qsl import MMLUQuestion

LETTERS = "ABCD"

QUESTIONS = [
    MMLUQuestion("high school biology", " What do cells contain? ", ("DNA", "a stone core", "ice", "light"), "A"),
    MMLUQuestion("high school biology", "Which is a mammal?", ("trout", "whale", "ant", "a small frog"), "B"),
    # " D" is one token: a single-token answer beside longer ones in one padded batch.
    MMLUQuestion("astronomy", "What orbits the Earth?", ("Mars", "the Sun", "the Moon", "D"), "C"),
    MMLUQuestion("astronomy", "How many moons has Mars?", ("0", "1", "3", "2"), "D"),
]


def _letter_prompt(q):
    # lm-eval's MMLU task: the subject's description, then _default_template_yaml's doc_to_text.
    return (f"The following are multiple choice questions (with answers) about {q.subject}.\n\n"
            f"{q.question.strip()}\nA. {q.choices[0]}\nB. {q.choices[1]}\nC. {q.choices[2]}\nD. {q.choices[3]}"
            "\nAnswer:")


def _cloze_prompt(q):
    return f"Question: {q.question.strip()}\nAnswer:"


def _reference_scores(hf_model, encode, q, fmt):
    """Sum of the answer tokens' log-probabilities, from HF logits of the whole sequence."""
    context = _letter_prompt(q) if fmt == "letter" else _cloze_prompt(q)
    answers = [f" {x}" for x in (LETTERS if fmt == "letter" else q.choices)]
    n = len(encode(context))
    lls = []
    for answer in answers:
        ids = encode(context + answer)
        with torch.no_grad():  # the rows that predict the answer's tokens: n - 1 onwards
            logits = hf_model(torch.tensor([ids])).logits[0, n - 1:len(ids) - 1].double()
        logp = torch.log_softmax(logits, dim=-1)
        lls.append(sum(float(logp[i - n, ids[i]]) for i in range(n, len(ids))))
    if fmt == "cloze":
        return lls, [ll / len(c) for ll, c in zip(lls, q.choices)]
    return lls, lls


@pytest.fixture(scope="module")
def tiny_models(tiny_llama_folder):
    """The tiny random Llama as HF transformers reads it and as our loader does."""
    from transformers import LlamaForCausalLM

    from wallperf.sut.loading.load import load_model

    hf = LlamaForCausalLM.from_pretrained(tiny_llama_folder, dtype=torch.float32).eval()
    ours = load_model(tiny_llama_folder, "float32")
    return hf, ours, ours.tokenizer


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_loglikelihoods_match_hf(tiny_models, fmt):
    hf, ours, tokenizer = tiny_models
    result = evaluate(ours, QUESTIONS, fmt, progress=False)
    for q, scored in zip(QUESTIONS, result.questions):
        lls, scores = _reference_scores(hf, tokenizer.encode, q, fmt)
        assert scored.loglikelihoods == pytest.approx(lls, abs=2e-4)
        assert scored.scores == pytest.approx(scores, abs=2e-4)
        assert scored.predicted == max(range(4), key=scores.__getitem__)
        assert scored.correct == (scored.predicted == LETTERS.index(q.answer))
        expected = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
        assert scored.probs == pytest.approx(expected, abs=1e-5)
    assert result.overall.correct == sum(q.correct for q in result.questions)
    assert set(result.per_subject) == {"high school biology", "astronomy"}


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_packing_does_not_change_the_scores(tiny_models, fmt):
    """One question per row, padded rows side by side in one pass, and one row for all: the same
    log-likelihoods as one question per forward pass."""
    from wallperf.audit.mmlu import prepare
    from wallperf.audit.scoring import score_requests

    _, ours, tokenizer = tiny_models
    requests = prepare(tokenizer, QUESTIONS * 3, fmt)
    alone = [score_requests(ours.model, [r])[0] for r in requests]
    for row_tokens, max_tokens in [(1, 10_000), (1, 1), (10_000, 10_000)]:
        packed = score_requests(ours.model, requests, max_tokens=max_tokens, row_tokens=row_tokens)
        assert packed == [pytest.approx(lls, abs=1e-4) for lls in alone]


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_fp8_kv_scoring_matches_the_engines_fp8_cache(tiny_models, fp8):
    """Letter answers over an emulated fp8 KV cache against the engine's paged fp8 cache
    (sut.paged_cache, keys stored less the model's calibrated centres) prefilling each
    question alone: the same log-likelihoods, and not those of the unquantized cache."""
    from wallperf.audit.mmlu import prepare
    from wallperf.audit.scoring import score_requests
    from wallperf.sut.quant.kv_calibration import key_centres
    from wallperf.sut.engine.paged_cache import PagedKVCache

    _, ours, tokenizer = tiny_models
    requests = prepare(tokenizer, QUESTIONS, "letter")
    emulated = score_requests(ours.model, requests, kv_dtype=fp8)
    plain = score_requests(ours.model, requests)
    cfg = ours.model.cfg
    for (ctx, conts), got, unquantized in zip(requests, emulated, plain):
        cache = PagedKVCache(cfg.n_layers, 8, 64, cfg.n_kv_heads, cfg.head_dim, torch.float32, kv_dtype=fp8,
                             k_centre=key_centres(ours.model))
        positions = torch.arange(len(ctx)).unsqueeze(0)
        cache.bind([list(range(8))], positions, torch.ones(1, len(ctx), dtype=torch.bool))
        logits = ours.model(torch.tensor([ctx]), positions, cache, logits_at=torch.tensor([[len(ctx) - 1]]))
        logp = torch.log_softmax(logits[0, -1].double(), dim=-1)
        assert got == pytest.approx([float(logp[c[0]]) for c in conts], abs=1e-4)
        assert got != pytest.approx(unquantized, abs=1e-6)


def test_k_shot_letter_prompt_is_lm_evals():
    q, shot = QUESTIONS[0], QUESTIONS[1]
    expected = (f"The following are multiple choice questions (with answers) about {q.subject}.\n\n"
                + _letter_prompt(shot).split("\n\n", 1)[1] + " B\n\n" + _letter_prompt(q).split("\n\n", 1)[1])
    assert build_context(q, "letter", (shot,)) == expected
    cloze = "Question: Which is a mammal?\nAnswer: whale\n\n" + _cloze_prompt(q)
    assert build_context(q, "cloze", (shot,)) == cloze


def test_exemplars_never_include_the_question():
    pool = [MMLUQuestion("s", f"q{i}", ("a", "b", "c", "d"), "A") for i in range(6)]
    pool.append(MMLUQuestion("s", "q2 ", ("w", "x", "y", "z"), "B"))  # the text of q2, repeated
    pool.append(MMLUQuestion("other", "o", ("a", "b", "c", "d"), "A"))
    for k in (1, 3, 5):
        chosen = choose_exemplars(pool[:6], pool, k)
        for q, shots in zip(pool[:6], chosen):
            assert len(shots) == k
            assert all(s.subject == q.subject and s.question.strip() != q.question.strip() for s in shots)
        assert chosen == choose_exemplars(pool[:6], pool, k)  # deterministic
    with pytest.raises(ValueError, match="5 other questions.*6-shot needs 6"):
        choose_exemplars(pool[2:3], pool, 6)  # q2 has 5 others: its repeat does not count


@pytest.mark.parametrize("successes,n,lo,hi", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score).
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_published_values(successes, n, lo, hi):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)


@pytest.mark.parametrize("successes,n", [(0, 10), (3, 10), (12, 30), (30, 30), (40, 120)])
def test_binomial_sf_matches_exact_sum(successes, n):
    p = Fraction(1, 4)
    exact = sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(successes, n + 1))
    assert binomial_sf(successes, n, 0.25) == pytest.approx(float(exact), rel=1e-12)


def test_significance_is_the_one_sided_exact_test():
    # P(X >= 33 | n=100, p=0.25) = 0.0446, P(X >= 32) = 0.0693: 33 is the least significant count.
    assert Accuracy(33, 100).significantly_above_chance
    assert not Accuracy(32, 100).significantly_above_chance
    assert Accuracy(33, 100).ci95 == wilson_interval(33, 100)


@pytest.mark.slow
@pytest.mark.usefixtures("all_torch_threads")
def test_smollm2_cloze_matches_hf(smollm2_gguf_path, mmlu_path):
    """Our engine's cloze scores on SmolLM2 bf16 against HF transformers reading the same GGUF.

    HF dequantizes the Q4_1 weights and computes in float32 (bf16 matmuls have no fast path on
    a CPU without AVX512-BF16, where HF took minutes over these 20 questions); ours are rounded to
    bf16. On the first question of the first 20 subjects the predictions agree on all 20, and
    per-character scores differ by at most ~0.1 nats. On 20 questions one disagreement is 5
    accuracy points, so "within 2 points" can only mean equal: the test allows the one
    disagreement that 95% agreement allows, and then accuracies one question apart at most.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wallperf.harness.loadgen.qsl import load_mmlu, select_per_subject
    from wallperf.sut.loading.load import load_model

    questions = select_per_subject(load_mmlu(mmlu_path), 1)[:20]
    ours = evaluate(load_model(smollm2_gguf_path, "bfloat16"), questions, "cloze", progress=False)
    where = dict(pretrained_model_name_or_path=smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name)
    hf = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(**where)
    reference = [_reference_scores(hf, lambda text: hf_tokenizer.encode(text, add_special_tokens=False), q,
                                   "cloze")[1] for q in questions]
    predicted = [max(range(4), key=scores.__getitem__) for scores in reference]
    agree = sum(p == s.predicted for p, s in zip(predicted, ours.questions))
    hf_correct = sum(p == LETTERS.index(q.answer) for p, q in zip(predicted, questions))
    assert agree >= 0.95 * len(questions)
    assert abs(hf_correct - ours.overall.correct) <= len(questions) - agree
    for scores, scored in zip(reference, ours.questions):
        assert scored.scores == pytest.approx(scores, abs=0.25)
