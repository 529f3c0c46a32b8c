"""The roofline against published figures and sums done by hand.

References: parameter counts from the model cards (Llama 3.1 8B 8.03B, 70B
70.6B, 405B 406B; Mixtral 8x7B 46.7B total, 12.9B active), FACTS.md's memory
walls (Llama 3.1 8B bf16 = 16.06e9 bytes: ~331 tok/s MI300X, ~209 H100), and
Llama 3 8B's well-known KV cache of 128 KiB per token in bf16.
"""
import argparse
import dataclasses
import errno
import json
import os
from pathlib import Path

import pytest

from wallperf.harness.config import ConfigError, load_hardware_config, load_model_config
from wallperf.sut.models.config import LlamaConfig
from wallperf.harness.hardware.counts import active_parameters, count_parameters, flops_per_token, weight_parameters
from wallperf.harness.hardware.roofline import bytes_per_step, memory_wall, roofline_row, roofline_rows, run_roofline
from wallperf.harness.hardware.roofline_cmd import add_roofline_parser, cmd_roofline
from wallperf.harness.loadgen.results import OutputError

ROW_KEYS = {"batch", "bytes_per_step", "memory_bound_tokens_per_second", "compute_bound_tokens_per_second",
            "bound", "ridge_point", "active_parameters"}

# Mixtral 8x7B's published shape: 8 experts, 2 per token.
MIXTRAL = LlamaConfig(n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=8, ffn_size=14336, vocab_size=32000,
                     head_dim=128, n_experts=8, experts_per_token=2)
MIXTRAL_EXPERT = 32 * 3 * 4096 * 14336  # one expert's SwiGLU weights over all layers


def shape(name):
    return load_model_config(name).shape


def hw(name):
    return load_hardware_config(name)


# Llama 3.1 8B by hand: embedding and untied LM head, 32 layers of q/o (4096x4096),
# k/v (4096x1024), SwiGLU (3 x 4096x14336) and two norms, and the final norm.
LLAMA_8B_PARAMS = 2 * 128256 * 4096 + 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096
LLAMA_8B_ACTIVE = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 128256 * 4096


@pytest.mark.parametrize("name, published", [("llama3.1-8b", 8.03e9), ("llama3.1-70b", 70.6e9),
                                             ("llama3.1-405b", 406e9), ("smollm2-135m", 135e6)])
def test_parameter_counts_match_model_cards(name, published):
    assert count_parameters(shape(name)).total == pytest.approx(published, rel=5e-3)


def test_llama_8b_counts_by_hand():
    s = shape("llama3.1-8b")
    assert count_parameters(s).total == LLAMA_8B_PARAMS
    assert active_parameters(s) == LLAMA_8B_ACTIVE
    assert flops_per_token(s) == 2 * LLAMA_8B_ACTIVE


def test_llama_8b_bf16_step_is_facts_16_06_gb():
    assert bytes_per_step(shape("llama3.1-8b"), "bfloat16") == pytest.approx(16.06e9, rel=1e-3)


@pytest.mark.parametrize("hardware, facts", [("mi300x", 331), ("h100-sxm", 209)])
def test_memory_wall_matches_facts(hardware, facts):
    assert memory_wall(shape("llama3.1-8b"), hw(hardware), "bfloat16") == pytest.approx(facts, rel=0.01)


@pytest.mark.parametrize("hardware, tb_per_s", [("mi250", 3.2768), ("mi250x", 3.2768), ("mi250x-gcd", 1.6384),
                                                ("h200", 4.8)])
def test_memory_wall_is_bandwidth_over_16_06_gb(hardware, tb_per_s):
    # FACTS.md's "~200 tok/s" for the MI250 is 3.2 TB/s / 16.06 GB (199.3); its
    # table's exact 3.2768 TB/s, used here, gives 204.0.
    assert memory_wall(shape("llama3.1-8b"), hw(hardware), "bfloat16") == pytest.approx(
        tb_per_s * 1e12 / 16.06e9, rel=1e-3)


def test_dtype_sizes_scale_weight_bytes():
    s = shape("llama3.1-8b")
    assert bytes_per_step(s, "float32") == 4 * LLAMA_8B_PARAMS
    # fp8: projections at 1 byte plus an fp32 scale per output row; table, head and norms bf16.
    projections = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    rows = 32 * (4096 + 2 * 1024 + 4096 + 2 * 14336 + 4096)
    assert bytes_per_step(s, "fp8") == projections + 4 * rows + 2 * (LLAMA_8B_PARAMS - projections)


def test_embedding_rows_counts_only_gathered_rows():
    s = shape("llama3.1-8b")
    gathered = (LLAMA_8B_PARAMS - 128256 * 4096 + 3 * 4096) * 2
    assert bytes_per_step(s, "bfloat16", batch=3, embedding="rows") == gathered
    tied = shape("smollm2-135m")  # the tied table is the LM head, read whole either way
    assert bytes_per_step(tied, "bfloat16", embedding="rows") == bytes_per_step(tied, "bfloat16")


def test_kv_cache_bytes_by_hand():
    s = shape("llama3.1-8b")
    per_token = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16
    assert per_token == 128 * 1024
    kv = bytes_per_step(s, "bfloat16", batch=4, context=8192) - bytes_per_step(s, "bfloat16", batch=4)
    assert kv == 4 * 8192 * per_token
    # fp8 weights keep a bf16 KV cache; float32 doubles it.
    assert bytes_per_step(s, "fp8", 1, 100) - bytes_per_step(s, "fp8", 1) == 100 * per_token
    assert bytes_per_step(s, "float32", 1, 100) - bytes_per_step(s, "float32", 1) == 200 * per_token


def test_attention_flops_grow_with_context():
    s = shape("llama3.1-8b")
    assert flops_per_token(s, 1000) - flops_per_token(s) == 2 * 2 * 32 * 32 * 128 * 1000


def test_mixtral_counts_match_published():
    p = count_parameters(MIXTRAL)
    assert p.total == pytest.approx(46.7e9, rel=2e-3)
    assert p.experts == 8 * MIXTRAL_EXPERT
    # Mistral's 12.9B active includes the embedding table, as the batch-1 step does.
    assert weight_parameters(MIXTRAL, batch=1) == pytest.approx(12.9e9, rel=2e-3)
    assert active_parameters(MIXTRAL) == weight_parameters(MIXTRAL, 1) - 32000 * 4096 - (2 * 32 + 1) * 4096


@pytest.mark.parametrize("batch, experts", [(1, 2), (2, 4), (3, 6), (4, 8), (64, 8)])
def test_moe_batch_touches_min_of_all_and_batch_times_k(batch, experts):
    dense_part = count_parameters(MIXTRAL).total - 8 * MIXTRAL_EXPERT
    assert weight_parameters(MIXTRAL, batch) == dense_part + experts * MIXTRAL_EXPERT


def test_bound_switches_at_the_ridge_point():
    s, mi300x = shape("llama3.1-8b"), hw("mi300x")
    ridge = 1307.4e12 / 5.3e12
    # Dense, context 0: FLOP/byte = batch * 2 * active / weight bytes, so by hand:
    switch = ridge * (2 * LLAMA_8B_PARAMS) / (2 * LLAMA_8B_ACTIVE)
    assert 263 < switch < 264
    below, above = roofline_rows(s, mi300x, "bfloat16", [263, 264])
    assert below.ridge_point == pytest.approx(ridge)
    assert (below.bound, above.bound) == ("memory", "compute")
    assert below.memory_bound_tokens_per_second < below.compute_bound_tokens_per_second
    assert above.memory_bound_tokens_per_second > above.compute_bound_tokens_per_second


def test_memory_bound_scales_with_batch_until_kv_dominates():
    s, h100 = shape("llama3.1-8b"), hw("h100-sxm")
    one, eight = roofline_rows(s, h100, "bfloat16", [1, 8])
    assert eight.memory_bound_tokens_per_second == pytest.approx(8 * one.memory_bound_tokens_per_second)
    long_context = roofline_row(s, h100, "bfloat16", 8, context=32768)
    assert long_context.memory_bound_tokens_per_second < eight.memory_bound_tokens_per_second / 2


def test_fp8_weights_compute_at_the_bf16_peak():
    # w8a16: the fp8 weights are widened for bf16 math, on fp8 hardware too.
    s = shape("llama3.1-8b")
    assert roofline_row(s, hw("h100-sxm"), "fp8", 1).ridge_point == pytest.approx(989.4e12 / 3.35e12)
    assert roofline_row(s, hw("mi250"), "fp8", 1).ridge_point == pytest.approx(362.1e12 / 3.2768e12)
    assert run_roofline(s, hw("h100-sxm"), "fp8", 10.0, 1, 0)["compute_dtype"] == "bfloat16"


def test_run_roofline_by_hand():
    s, h100 = shape("llama3.1-8b"), hw("h100-sxm")
    single = run_roofline(s, h100, "bfloat16", tokens_per_second=100.0, batch=1, context=0)
    # steps/s = 100 / 1; bytes/step = 16.06 GB
    assert single["achieved_bandwidth_gbps"] == pytest.approx(100 * 2 * LLAMA_8B_PARAMS / 1e9)
    assert single["mbu"] == pytest.approx(100 * 2 * LLAMA_8B_PARAMS / 3.35e12)
    assert single["memory_wall_tokens_per_second"] == pytest.approx(3.35e12 / (2 * LLAMA_8B_PARAMS))
    assert single["bound"] == "memory" and single["utilization"] == single["mbu"]

    offline = run_roofline(s, h100, "bfloat16", tokens_per_second=1000.0, batch=8, context=0)
    assert offline["achieved_bandwidth_gbps"] == pytest.approx(1000 / 8 * 2 * LLAMA_8B_PARAMS / 1e9)
    assert offline["mfu"] == pytest.approx(1000 * 2 * LLAMA_8B_ACTIVE / 989.4e12)
    assert offline["compute_bound_tokens_per_second"] == pytest.approx(989.4e12 / (2 * LLAMA_8B_ACTIVE))


def test_offline_bound_counts_prefill_flops():
    # 0.874 TFLOP/s bf16, 2.5 prompt tokens per output token: the compute bound counts the prompts'
    # FLOPs too (context 0 keeps attention out of the sums: by hand, 2 * active per token).
    s = shape("smollm2-135m")
    cpu = dataclasses.replace(hw("cpu"), bandwidth_gbps=40.0, peak_tflops={"bfloat16": 0.874, "float32": 0.4,
                                                                           "fp8": None})
    active = active_parameters(s)
    decode_only = run_roofline(s, cpu, "bfloat16", 364.7, batch=32, context=0)
    assert decode_only["compute_bound_tokens_per_second"] == pytest.approx(0.874e12 / (2 * active))
    with_prompts = run_roofline(s, cpu, "bfloat16", 364.7, batch=32, context=0, prompt_tokens=160,
                                output_tokens=64)
    per_token = 2 * active + 160 * flops_per_token(s, 80) / 64
    assert with_prompts["compute_bound_tokens_per_second"] == pytest.approx(0.874e12 / per_token)
    assert with_prompts["mfu"] == pytest.approx(364.7 * per_token / 0.874e12)
    assert with_prompts["bound"] == "compute" and with_prompts["utilization"] == pytest.approx(with_prompts["mfu"])


def _run_cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="wallperf")
    add_roofline_parser(parser.add_subparsers())
    rc = cmd_roofline(parser.parse_args(["roofline", *argv]))
    return rc, capsys.readouterr()


def test_cli_json_has_exactly_the_row_keys(capsys):
    rc, out = _run_cli(["--model", "llama3.1-8b", "--hardware", "mi300x", "--batch", "1,8,512", "--json"],
                       capsys)
    rows = json.loads(out.out)
    assert rc == 0 and [r["batch"] for r in rows] == [1, 8, 512]
    assert all(set(r) == ROW_KEYS for r in rows)
    assert rows[0]["memory_bound_tokens_per_second"] == pytest.approx(331, rel=0.01)
    assert [r["bound"] for r in rows] == ["memory", "memory", "compute"]


def test_cli_table_and_emulated_fp8_note(capsys):
    rc, out = _run_cli(["--model", "llama3.1-8b", "--hardware", "mi250", "--dtype", "fp8"], capsys)
    assert rc == 0 and "emulated" in out.err and "w8a16" in out.err
    # 3276.8 GB/s / 9.087 GB: 6.98 GB of fp8 projections and their scales, 2.1 GB of bf16 table and head
    assert "memory-bound tok/s" in out.out and "360.6" in out.out
    rc, out = _run_cli(["--model", "llama3.1-8b", "--hardware", "h100-sxm", "--dtype", "fp8"], capsys)
    assert "emulated" not in out.err


def test_cli_notes_weights_larger_than_memory(capsys):
    _, out = _run_cli(["--model", "llama3.1-405b", "--hardware", "h100-sxm"], capsys)
    assert "do not fit" in out.err and "at least 11 are needed" in out.err  # 811.7 GB / 80 GB
    _, out = _run_cli(["--model", "llama3.1-70b", "--hardware", "mi300x"], capsys)  # 141 GB in 192 GB
    assert "do not fit" not in out.err


@pytest.mark.parametrize("argv, key, allowed", [
    (["--model", "no-such-model", "--hardware", "mi300x"], "--model", "llama3.1-8b"),
    (["--model", "llama3.1-8b", "--hardware", "no-such-gpu"], "--hardware", "h100-sxm"),
    (["--model", "llama3.1-8b", "--hardware", "cpu", "--dtype", "fp16"], "peak_tflops.float16", "bfloat16"),
    (["--model", "llama3.1-8b", "--hardware", "mi300x", "--plot", "roof.pdf"], "--plot", ".svg"),
])
def test_cli_bad_input_names_key_and_allowed_values(argv, key, allowed, capsys):
    with pytest.raises(ConfigError) as e:
        _run_cli(argv, capsys)
    assert e.value.key == key and allowed in str(e.value)


@pytest.mark.parametrize("name,magic", [("roof.png", b"\x89PNG"), ("roof.svg", b"<?xml")])
def test_cli_plot_is_written_whole_or_not_at_all(name, magic, tmp_path, capsys, monkeypatch):
    """The chart is drawn in memory in the suffix's format, written beside the target
    and renamed: an interrupted write leaves the previous file and no stray one."""
    pytest.importorskip("matplotlib")
    out = tmp_path / name
    out.write_bytes(b"previous chart")
    argv = ["--model", "llama3.1-8b", "--hardware", "h100-sxm", "--plot", str(out)]
    real_replace = os.replace

    def interrupted(src, dst):
        assert Path(src).parent == tmp_path and Path(dst) == out
        raise OSError(errno.EIO, "interrupted before the rename")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OutputError, match=f"cannot write {out}"):
        _run_cli(argv, capsys)
    assert out.read_bytes() == b"previous chart" and [p.name for p in tmp_path.iterdir()] == [name]
    monkeypatch.setattr(os, "replace", real_replace)
    assert _run_cli(argv, capsys)[0] == 0
    assert out.read_bytes().startswith(magic)


def test_cli_plot_draws_measured_points(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    s, h100 = shape("llama3.1-8b"), hw("h100-sxm")
    measured = run_roofline(s, h100, "bfloat16", 3000.0, 32, 512)
    (tmp_path / "results.json").write_text(json.dumps(
        {"runs": [{"scenario": "Offline", "mode": "performance", "roofline": measured},
                  {"scenario": "Offline", "mode": "accuracy"}]}))
    out = tmp_path / "roof.svg"
    rc, _ = _run_cli(["--model", "llama3.1-8b", "--hardware", "h100-sxm", "--plot", str(out),
                      "--results", str(tmp_path)], capsys)
    svg = out.read_text()
    assert rc == 0 and "<svg" in svg and "Offline (batch 32)" in svg


def test_an_mfu_above_one_is_flagged_with_its_reason():
    """The AVX2 VM's story: an Offline run set against torch's emulated bf16 matmul (0.00077
    TFLOP/s) gave MFU 897%; against the fp32 FMA peak the engine's bf16 can at best reach
    (0.123 TFLOP/s) the same run is a plausible share of it, and nothing is flagged."""
    from wallperf.audit.perf_audit import roofline_trust
    from wallperf.harness.hardware.roofline import utilization_problems

    shape = load_model_config("smollm2-135m").shape
    cpu = load_hardware_config("cpu")
    run = dict(tokens_per_second=30.0, batch=32, context=200, prompt_tokens=160, output_tokens=64)
    emulated = run_roofline(shape, dataclasses.replace(cpu, peak_tflops={"bfloat16": 0.00077}), "bfloat16", **run)
    fp32_fma = run_roofline(shape, dataclasses.replace(cpu, peak_tflops={"bfloat16": 0.123}), "bfloat16", **run)
    # By hand: 30 tok/s x (decode + the prompt's prefill share) FLOPs per output token, over the peak.
    flops = flops_per_token(shape, 200) + 160 * flops_per_token(shape, 80) / 64
    assert fp32_fma["mfu"] == pytest.approx(30 * flops / 0.123e12, rel=0.05) and fp32_fma["mfu"] < 1
    assert emulated["mfu"] > 1
    problems = utilization_problems(emulated)
    assert problems == [f"mfu {emulated['mfu']:.2f} is above 1 (the peak of the kernel in use): the peak or the "
                        "FLOP count is wrong"]
    assert utilization_problems(fp32_fma) == []
    # The run record says so too, and its summary line does not print it quietly.
    assert roofline_trust(emulated)["trusted"] is False and roofline_trust(fp32_fma)["trusted"] is True


def test_sweep_points_flag_impossible_utilizations():
    from wallperf.audit.pareto import sweep_point
    from wallperf.driver.sweep import _point_line
    from wallperf.harness.hardware.front import StepCost

    record = {"metrics": {"tokens_per_second": 100.0, "tpot_ms": {"p50": 50.0, "p99": 60.0},
                          "ttft_ms": {"p99": 500.0}},
              "engine": {"mean_decode_batch": 4.0, "mean_decode_context": 100.0}, "goodput": {"share": 1.0}}

    def cost(peak):
        return StepCost(weight_bytes=270e6, kv_bytes_per_position=46080, flops_per_token=2.7e8,
                        flops_per_position=1e5, bandwidth_bytes_per_s=22.3e9, peak_flops_per_s=peak)

    good, bad = sweep_point(1.0, record, cost(0.123e12)), sweep_point(1.0, record, cost(0.77e9))
    # By hand: 4 rows x (2.7e8 + 1e5 x 100) FLOPs in 50 ms, over each peak.
    assert good["decode_mfu"] == pytest.approx(4 * 2.8e8 / 0.05 / 0.123e12)
    assert good["untrusted_reasons"] == [] and "NOT TRUSTED" not in _point_line(good)
    assert bad["decode_mfu"] == pytest.approx(4 * 2.8e8 / 0.05 / 0.77e9) and bad["decode_mfu"] > 1
    assert bad["untrusted_reasons"][0].startswith("decode_mfu 29.09 is above 1")
    assert "; NOT TRUSTED: decode_mfu 29.09 is above 1" in _point_line(bad)
