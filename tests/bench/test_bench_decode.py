"""`wallperf bench decode` on a tiny model: the byte count it divides by, and a report with every path."""
import pytest
import torch

from wallperf.bench import decode as bench_decode
from wallperf.sut.models.config import LlamaConfig
from wallperf.harness.hardware.counts import flops_per_token
from wallperf.sut.models.llama import LlamaConfig
from wallperf.sut.loading.weights import build_model
from wallperf.sut.models.llama import synthetic_state_dict


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


def test_bench_reports_each_row_count_path_and_thread(monkeypatch):
    model = tiny(True)
    monkeypatch.setattr(bench_decode, "stream_bandwidth", lambda *a: (10.0, 12.0))
    monkeypatch.setattr(bench_decode, "read_bandwidth", lambda *a: 8.0)
    monkeypatch.setattr(bench_decode, "gemm_peak_tflops", lambda: 0.5)
    shape = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=96, vocab_size=300,
                       tie_embeddings=True)
    report = bench_decode.bench(model, [0], shape, rows=(1, 3), context=20, tokens=4, repeats=1)
    assert {(r["rows"], r["path"], r["thread"]) for r in report["rows"]} == {
        (n, p, t) for n in (1, 3) for p in ("fused", "eager") for t in ("worker", "main")}
    assert report["gemm_peak_tflops"] == 0.5
    for r in report["rows"]:
        seconds = r["ms_per_step"] / 1e3
        # Every window starts after the prompt and its first token: the context is past the prompt.
        assert r["context"] > 20
        assert r["tokens_per_second"] == pytest.approx(r["rows"] / seconds)
        assert r["gbps"] == pytest.approx(bench_decode.step_bytes(model, r["context"], r["rows"]) / seconds / 1e9)
        assert r["fraction_of_copy"] == pytest.approx(r["gbps"] / 10.0)
        assert r["tflops"] == pytest.approx(r["rows"] * flops_per_token(shape, r["context"]) / seconds / 1e12)
        assert r["fraction_of_peak"] == pytest.approx(r["tflops"] / 0.5)
        # The roofline: the slower of reading the bytes at the read-only bandwidth and the FLOPs at the peak.
        memory = bench_decode.step_bytes(model, r["context"], r["rows"]) / 8e9
        compute = r["rows"] * flops_per_token(shape, r["context"]) / 0.5e12
        assert r["roofline_ms"] == pytest.approx(max(memory, compute) * 1e3)
        assert r["bound"] == ("memory" if memory >= compute else "compute")
        assert r["roofline_ratio"] == pytest.approx(seconds / max(memory, compute))
    text = bench_decode.format_report(report, "tiny")
    assert "fused" in text and "eager" in text and "10.0 GB/s" in text and "0.500 TFLOP/s" in text
    assert "read-only 8.0 GB/s" in text and f"CPU kernels: {report['cpu_isa']}" in text
    assert f"load average {report['load_average'][0]:.1f} before" in text


def test_bench_times_only_the_paths_and_threads_asked_for(monkeypatch):
    monkeypatch.setattr(bench_decode, "stream_bandwidth", lambda *a: (10.0, 12.0))
    monkeypatch.setattr(bench_decode, "read_bandwidth", lambda *a: 8.0)
    monkeypatch.setattr(bench_decode, "gemm_peak_tflops", lambda: 0.5)
    shape = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=96, vocab_size=300,
                       tie_embeddings=True)
    report = bench_decode.bench(tiny(True), [0], shape, rows=(2,), context=8, tokens=2, repeats=1,
                                paths=("fused",), threads=("worker",))
    assert [(r["rows"], r["path"], r["thread"]) for r in report["rows"]] == [(2, "fused", "worker")]


def test_the_kernel_peak_is_the_best_call_of_the_best_pass(monkeypatch):
    """A roof is what the kernel can do: calls slowed by other work on the cores must not lower it."""
    from wallperf.harness.hardware import peak_kernels

    calls = []
    monkeypatch.setattr(peak_kernels, "timed", lambda device, dtype, n, repeats, warmup: (
        calls.append((dtype, n, repeats)), (3e12, "kernel", [3.0, 1.5, 2.0]))[1])
    assert bench_decode.gemm_peak_tflops() == pytest.approx(2.0)  # 3e12 FLOPs over the fastest call
    assert calls == [("bfloat16", bench_decode.CPU_SETTINGS.gemm_n, bench_decode.PEAK_CALLS)]
    monkeypatch.setattr(bench_decode, "stream_bandwidth", lambda *a: (10.0, 12.0))
    monkeypatch.setattr(bench_decode, "read_bandwidth", lambda *a: 8.0)
    passes = iter([0.9, 0.3, 0.5, 0.4])  # the warm-up pass's, then three timed passes'
    monkeypatch.setattr(bench_decode, "gemm_peak_tflops", lambda: next(passes))
    shape = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=96, vocab_size=300,
                       tie_embeddings=True)
    report = bench_decode.bench(tiny(True), [0], shape, rows=(1,), context=8, tokens=2, repeats=3,
                                paths=("fused",), threads=("worker",))
    assert report["gemm_peak_samples"] == [0.3, 0.5, 0.4] and report["gemm_peak_tflops"] == 0.5


def test_step_bytes_counts_each_rows_kv_and_embedding_row():
    model = tiny(False)
    one, four = bench_decode.step_bytes(model, 10.0), bench_decode.step_bytes(model, 10.0, rows=4)
    kv, row = 2 * 2 * 32 * 2 * 10.0, 64 * 2
    assert four - one == pytest.approx(3 * (kv + row))


def test_a_cpu_path_this_machine_cannot_run_is_refused_before_loading(monkeypatch, capsys):
    monkeypatch.setenv("WALLPERF_CPU_ISA", "amx")
    with pytest.raises(SystemExit) as e:
        bench_decode.main(["--rows", "1"])
    assert e.value.code == 2 and "WALLPERF_CPU_ISA=amx is refused" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--tokens", "0"], ["--rows", "0"], ["--rows", "65"], ["--rows", "8,x"],
                                  ["--paths", "fused,fast"], ["--threads", "main,main"]])
def test_bad_arguments_exit_with_usage_error(argv):
    with pytest.raises(SystemExit) as e:
        bench_decode.main(argv)
    assert e.value.code == 2


def _walls(monkeypatch):
    monkeypatch.setattr(bench_decode, "stream_bandwidth", lambda *a: (10.0, 12.0))
    monkeypatch.setattr(bench_decode, "read_bandwidth", lambda *a: 8.0)
    monkeypatch.setattr(bench_decode, "gemm_peak_tflops", lambda: 0.5)


def test_every_timed_step_decodes_every_row_when_prefill_is_staggered(monkeypatch):
    """12 prompts of 200 tokens are over one step's 2048-token budget: the scheduler prefills
    the last ones a step at a time while the first decode. The first rows' budget covers
    those steps, so no row finishes inside a window (which _time_window refuses)."""
    _walls(monkeypatch)
    shape = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=96, vocab_size=300,
                        tie_embeddings=True)
    report = bench_decode.bench(tiny(True), [0], shape, rows=(12,), context=200, tokens=4, repeats=1,
                                paths=("eager",), threads=("main",))
    (r,) = report["rows"]
    # Every row decodes in every timed step: the mean context is the prompt, the first
    # token, the rows' head start, the warm-up window and half the timed one, whatever the row.
    assert r["rows"] == 12 and 200 + 1 + 4 < r["context"] < 200 + 1 + 12 + 4 + 4


def test_a_window_in_which_a_row_finishes_is_refused(monkeypatch):
    from wallperf.sut.engine.engine import SamplingParams

    monkeypatch.setenv("WALLPERF_FUSED_DECODE", "0")  # _engine sets it for the process; restored after the test
    engine = bench_decode._engine(tiny(True), [0], "eager", 2, list(range(5, 25)), 8)
    engine.add_request(99, list(range(5, 25)), SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.step()  # the new prompt's prefill
    with pytest.raises(RuntimeError, match="rows started or finished inside it"):
        bench_decode._time_window(engine, 4, in_thread=False)


def test_the_fused_steps_phases_add_up_to_the_step(monkeypatch):
    """wallperf::step_profile splits each fused step into its phases; with one pass the
    phases and the time outside the op are the step's time, and each is a real share."""
    if bench_decode.step_profile(False, False) is None:
        pytest.skip("no compiled CPU kernels here")
    _walls(monkeypatch)
    shape = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=96, vocab_size=300,
                        tie_embeddings=True)
    report = bench_decode.bench(tiny(True), [0], shape, rows=(3,), context=20, tokens=4, repeats=1,
                                paths=("fused", "eager"), threads=("main",))
    by_path = {r["path"]: r for r in report["rows"]}
    assert by_path["eager"]["phases_ms"] is None
    split = by_path["fused"]["phases_ms"]
    assert set(split) == set(bench_decode.PHASES) | {"outside"}
    assert sum(split.values()) == pytest.approx(by_path["fused"]["ms_per_step"])
    assert all(split[n] > 0 for n in ("qkv", "attend", "gate_up", "down", "head", "outside"))
    assert "where a fused step's time goes" in bench_decode.format_report(report, "tiny")
    # Off again after the bench: a step outside it adds nothing.
    before = bench_decode.step_profile(False, True)
    assert before.tolist() == [0.0] * len(before)
