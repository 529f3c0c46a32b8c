"""`wallperf bench decode` on a tiny model: the byte count it divides by, and a report with every path."""
import pytest
import torch

from harness.bench import decode as bench_decode
from sut.models.llama import LlamaConfig
from sut.weights import build_model
from sut.models.llama import synthetic_state_dict


def tiny(tie: bool):
    cfg = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=96, vocab_size=300,
                      tie_embeddings=tie, max_position=256)
    return build_model(cfg, synthetic_state_dict(cfg, 0, torch.bfloat16), torch.bfloat16, "cpu")


@pytest.mark.parametrize("tie", [True, False])
def test_step_bytes_counts_weights_once_and_the_kv_read(tie):
    model = tiny(tie)
    h, f, v, layers, kv = 64, 96, 300, 2, 2 * 16  # kv heads * head_dim
    per_layer = h * (h + 2 * kv) + h * h + 2 * h * f + f * h + 2 * h  # qkv, o, gate_up, down, two norms
    head = v * h
    embedding_read = h if not tie else 0  # untied: one row looked up; tied: the head reads the table
    expected = 2 * (layers * per_layer + h + head + embedding_read)
    kv_bytes = 2 * layers * kv * 2 * 10.5  # K and V, bf16, at context 10.5
    assert bench_decode.step_bytes(model, 10.5) == pytest.approx(expected + kv_bytes)


def test_bench_reports_each_path_and_thread(monkeypatch):
    model = tiny(True)
    monkeypatch.setattr(bench_decode, "stream_bandwidth", lambda *a: (10.0, 12.0))
    report = bench_decode.bench(model, [0], context=20, tokens=4, repeats=1)
    assert {(r["path"], r["thread"]) for r in report["rows"]} == {
        (p, t) for p in ("fused", "eager") for t in ("worker", "main")}
    for r in report["rows"]:
        assert r["ms_per_token"] > 0
        assert r["gbps"] == pytest.approx(report["bytes_per_token"] / (r["ms_per_token"] / 1e3) / 1e9)
        assert r["fraction_of_copy"] == pytest.approx(r["gbps"] / 10.0)
    text = bench_decode.format_report(report, "tiny")
    assert "fused" in text and "eager" in text and "10.0 GB/s" in text


def test_bad_arguments_exit_with_usage_error():
    with pytest.raises(SystemExit) as e:
        bench_decode.main(["--tokens", "0"])
    assert e.value.code == 2
