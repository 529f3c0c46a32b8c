"""Bytes per step as stored: the shape-based layout against the tensors a real model
holds after loading and fp8 quantization, and Mixtral-8x7B's fp8 bytes by hand."""
import pytest
import torch

from wallperf.sut.models.config import LlamaConfig
from wallperf.harness.hardware.counts import held_weight_bytes, prefill_flops, flops_per_token, shape_weight_bytes
from wallperf.harness.hardware.roofline import bytes_per_step
from wallperf.sut.loading.load import load_synthetic
from wallperf.sut.models.families import config_for_shape

MIXTRAL = LlamaConfig(n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=8, ffn_size=14336, vocab_size=32000,
                     head_dim=128, n_experts=8, experts_per_token=2)
TINY_MOE = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=48, vocab_size=128,
                      head_dim=16, n_experts=4, experts_per_token=2, tie_embeddings=False)
TINY_DENSE = LlamaConfig(n_layers=3, hidden_size=96, n_heads=6, n_kv_heads=2, ffn_size=160, vocab_size=256,
                        head_dim=16, tie_embeddings=True)
TINY_QWEN2 = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=96, vocab_size=128,
                        head_dim=16, tie_embeddings=False, attention_bias=True)


class _Tokenizer:
    eos_token_id = 0


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("shape", [TINY_MOE, TINY_DENSE, TINY_QWEN2], ids=["moe", "dense", "qwen2"])
@pytest.mark.parametrize("fp8", [False, True])
def test_shape_layout_matches_the_tensors_a_loaded_model_holds(shape, fp8):
    family = "mixtral" if shape.n_experts > 1 else "llama"
    loaded = load_synthetic(config_for_shape(family, shape), _Tokenizer(), "bfloat16", seed=1,
                            fp8_dtype=torch.float8_e4m3fn if fp8 else None)
    held = held_weight_bytes(loaded.model)
    expected = shape_weight_bytes(shape, "fp8" if fp8 else "bfloat16")
    # The model's own storage, counted independently of both functions.
    assert held.total == _tensor_bytes(loaded.model)
    assert (held.table, held.dense, held.experts) == (expected.table, expected.dense, expected.experts)
    if fp8 and shape.n_experts > 1:
        assert all(m.w13.dtype == torch.float8_e4m3fn for m in loaded.model.modules() if hasattr(m, "w13_scale"))


def test_mixtral_fp8_bytes_by_hand():
    # fp8: attention and the 8 experts' SwiGLU at 1 byte plus an fp32 scale per output row;
    # the embedding table, untied LM head, routers and norms stay bf16 (2 bytes).
    L, h, F = 32, 4096, 14336
    attention = L * (2 * h * 4096 + 2 * h * 1024)
    attention_rows = L * (4096 + 2 * 1024 + h)
    experts = L * 8 * 3 * h * F
    expert_rows = L * 8 * (2 * F + h)
    bf16 = 2 * (2 * 32000 * h + L * h * 8 + (2 * L + 1) * h)
    total = attention + 4 * attention_rows + experts + 4 * expert_rows + bf16
    assert shape_weight_bytes(MIXTRAL, "fp8").total == total
    at_batch_1 = total - (experts + 4 * expert_rows) * 6 / 8
    assert bytes_per_step(MIXTRAL, "fp8") == at_batch_1
    # An LM head counted at 1 byte would be 131 MB (1%) less; all of it at 1 byte, 12.88 GB.
    assert at_batch_1 == pytest.approx(13.153e9, rel=1e-3)


def test_fp8_keeps_lm_head_and_table_in_bf16():
    dense = shape_weight_bytes(TINY_DENSE, "fp8")
    assert dense.table == 256 * 96 * 2


def test_prefill_flops_by_hand():
    s = TINY_DENSE
    # 10 tokens through the weights, attending over 5 positions on average.
    assert prefill_flops(s, 10) == 10 * flops_per_token(s, 5)


@pytest.mark.parametrize("name, non_embedding", [("qwen2.5-coder-1.5b", 1.31e9), ("qwen2.5-coder-0.5b", 0.36e9)])
def test_qwen2_shapes_count_their_published_non_embedding_parameters(name, non_embedding):
    """Qwen's model cards: 1.31B and 0.36B parameters besides the embeddings (Q/K/V biases included)."""
    from wallperf.harness.config import load_model_config
    from wallperf.harness.hardware.counts import count_parameters

    shape = load_model_config(name).shape
    p = count_parameters(shape)
    assert shape.attention_bias and p.biases == shape.n_layers * (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim
    assert p.total - p.embedding - p.lm_head == pytest.approx(non_embedding, rel=0.01)  # the cards round to 3 digits
