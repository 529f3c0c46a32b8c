"""Quantize or run the small model: costs at the memory wall and the plain verdict."""
import numpy as np
import pytest
import torch

from wallperf.audit.baseline import BaselineComparison, ModelCost
from wallperf.audit.mmlu import MMLUResult, QuestionScore
from wallperf.harness.config import load_hardware_config


def _result(correct):
    questions = []
    for i, ok in enumerate(correct):
        answer = i % 4
        pick = answer if ok else (answer + 1) % 4
        scores = tuple(-1.0 if c == pick else -2.0 for c in range(4))
        questions.append(QuestionScore(f"subject {i % 5}", answer, scores, scores))
    return MMLUResult("letter", 0, tuple(questions))


def _correct(n, accuracy, seed):
    return np.random.default_rng(seed).random(n) < accuracy


@pytest.fixture(scope="module")
def tiny_models(tiny_llama_folder):
    from wallperf.audit.specs import load_spec, parse_spec

    cpu = load_hardware_config("cpu")
    return {dtype: load_spec(parse_spec(f"{tiny_llama_folder}@{dtype}"), cpu, device="cpu")
            for dtype in ("bf16", "fp8")}


def test_bytes_per_token_count_what_each_model_holds(tiny_llama_folder, tiny_models):
    """bf16: two bytes for each parameter HF transformers counts (the tied head once); fp8: one
    byte per projection weight, four per output channel's scale, bf16 for the rest."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_llama_folder)
    cpu = load_hardware_config("cpu")
    bf16 = ModelCost.of("tiny", tiny_models["bf16"], cpu)
    assert bf16.weight_dtype == "bfloat16" and bf16.bytes_per_token == 2 * hf.num_parameters()
    assert bf16.memory_wall_tokens_per_second == pytest.approx(cpu.bandwidth_gbps * 1e9 / bf16.bytes_per_token)
    projections = [m.weight for name, m in hf.named_modules() if name.startswith("model.layers.")
                   and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj")]
    quantized = sum(w.numel() for w in projections)
    scales = sum(w.shape[0] for w in projections)
    fp8 = ModelCost.of("tiny@fp8", tiny_models["fp8"], cpu)
    assert fp8.weight_dtype == "fp8"
    assert fp8.bytes_per_token == quantized + 4 * scales + 2 * (hf.num_parameters() - quantized)
    assert fp8.memory_wall_tokens_per_second / bf16.memory_wall_tokens_per_second == pytest.approx(
        bf16.bytes_per_token / fp8.bytes_per_token)


def _comparison(cand_accuracy, base_accuracy, tiny_models, n=600):
    big = ModelCost.of("big@fp8", tiny_models["fp8"], load_hardware_config("cpu"))
    small = ModelCost("small", "bfloat16", big.bytes_per_token / 3, big.memory_wall_tokens_per_second * 3)
    return BaselineComparison(_result(_correct(n, cand_accuracy, 1)), _result(_correct(n, base_accuracy, 2)),
                              big, small, "cpu", population=14042)


def test_a_clearly_better_quantized_model_beats_the_small_one(tiny_models):
    c = _comparison(0.55, 0.27, tiny_models)
    lo, hi = c.advantage_ci95
    assert c.verdict == "quantized" and 0 < lo <= c.advantage_points <= hi
    assert c.speed_ratio == pytest.approx(1 / 3)
    assert "beats running the small one" in c.reason and "for the speed it gives up" in c.reason
    j = c.to_json()
    assert j["verdict"] == "quantized" and j["candidate"]["spec"] == "big@fp8" and j["baseline"]["spec"] == "small"


def test_a_small_model_as_good_wins(tiny_models):
    c = _comparison(0.3, 0.6, tiny_models)
    assert c.verdict == "small" and c.advantage_ci95[1] <= 0 and "run the small model" in c.reason


def test_equal_models_are_undecided(tiny_models):
    c = _comparison(0.5, 0.5, tiny_models)
    lo, hi = c.advantage_ci95
    assert c.verdict == "undecided" and lo < 0 < hi and "do not separate" in c.reason


def test_an_untied_table_counts_the_one_row_a_token_gathers(tiny_llama_folder, tmp_path):
    """A run's roofline counts one row of an untied embedding table per token; the audit's
    speed side counts the same, so its memory-wall tokens/s and a run's agree."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from wallperf.audit.specs import load_spec, parse_spec

    folder = tmp_path / "untied"
    cfg = LlamaConfig.from_pretrained(tiny_llama_folder)
    cfg.tie_word_embeddings = False
    torch.manual_seed(1)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(folder)
    shutil.copy(tiny_llama_folder / "tokenizer.json", folder / "tokenizer.json")
    cpu = load_hardware_config("cpu")
    cost = ModelCost.of("untied", load_spec(parse_spec(f"{folder}@bf16"), cpu, device="cpu"), cpu)
    table = cfg.vocab_size * cfg.hidden_size
    assert cost.bytes_per_token == 2 * (hf.num_parameters() - table + cfg.hidden_size)
    assert cost.to_json()["embedding_counted"] == "rows"
