"""What a run's roofline counts for each engine: a GGUF's bytes for llama.cpp, the
loaded model's tensors for the native engine, and MoME's memory-expert rows per step
from its own counters, worked out by hand."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from wallperf.driver.peers import memory_expert_bytes_per_step, roofline_counts
from wallperf.sut.models.config import LlamaConfig
from wallperf.harness.hardware.counts import WeightBytes
from wallperf.harness.hardware.roofline import bytes_per_step


def test_mome_rows_read_per_step_by_hand():
    # Layer 3: 40 distinct experts over 10 steps; layer 7: 90 over 30. 2 KiB per expert.
    stats = {"bytes_per_expert": 2048, "layers": {"3": {"lookups": 40, "steps": 10},
                                                  "7": {"lookups": 90, "steps": 30}}}
    assert memory_expert_bytes_per_step(stats) == (4 + 3) * 2048
    assert memory_expert_bytes_per_step(None) == 0.0


def test_llamacpp_counts_its_gguf_and_float16_kv():
    counts = roofline_counts(SimpleNamespace(weight_bytes=96_600_000, table_bytes=0))
    assert counts == {"weights": WeightBytes(table=0, dense=96_600_000), "embedding": "rows",
                      "kv_bytes_per_element": 2}


def test_an_untied_table_counts_the_rows_a_step_gathers():
    # Untied: vocab 1000 x hidden 8, 2 bytes each = 16,000 table bytes; 50,000 other bytes.
    shape = LlamaConfig(n_layers=1, hidden_size=8, n_heads=2, n_kv_heads=1, ffn_size=16, vocab_size=1000,
                       tie_embeddings=False)
    counts = roofline_counts(SimpleNamespace(weight_bytes=66_000, table_bytes=16_000))
    # One row (16 bytes) per sequence of the batch, plus everything else whole; no context.
    assert bytes_per_step(shape, "bfloat16", 1, 0, **counts) == 50_000 + 16
    assert bytes_per_step(shape, "bfloat16", 4, 0, **counts) == 50_000 + 4 * 16
    # The published convention (`wallperf roofline`) reads the table whole.
    assert bytes_per_step(shape, "bfloat16", 1, 0, weights=counts["weights"]) == 66_000
    # Tied, the table is the LM head: read whole even when counting rows.
    tied = dataclasses.replace(shape, tie_embeddings=True)
    assert bytes_per_step(tied, "bfloat16", 1, 0, **counts) == 66_000


def test_native_counts_its_tensors_and_a_passed_kv_size():
    model = torch.nn.ModuleDict({"embed_tokens": torch.nn.Embedding(10, 4, dtype=torch.bfloat16),
                                 "proj": torch.nn.Linear(4, 6, bias=False, dtype=torch.float32)})
    counts = roofline_counts(SimpleNamespace(model=model), {"bytes_per_expert": 8, "layers": {
        "1": {"lookups": 6, "steps": 2}}}, kv_bytes_per_element=1.0625)
    assert counts["weights"] == WeightBytes(table=10 * 4 * 2, dense=6 * 4 * 4, extra=3 * 8)
    assert counts["kv_bytes_per_element"] == pytest.approx(1.0625)
