"""wallperf.tools.gguf_export and the llamacpp backend's weight counting.

The export is read back with gguf's own GGUFReader and compared with the
source's tensors dequantized by gguf and rounded to bfloat16 by torch (the
native engine's bf16 weights); the bytes the roofline counts for a GGUF are
recomputed here from GGML's block layouts.
"""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

from wallperf.cli import main
from wallperf.harness.config import load_hardware_config, load_model_config
from wallperf.tools.gguf_export import bf16_gguf, cached_export_path, export_gguf
from wallperf.harness.hardware.counts import WeightBytes
from wallperf.harness.hardware.roofline import memory_wall, run_roofline

MOSTLY_BF16 = 32
# GGML blocks of 32 weights: Q4_1 = fp16 scale and min + 16 bytes of nibbles;
# Q8_0 = fp16 scale + 32 int8.
Q4_1_BYTES, Q8_0_BYTES = 20 / 32, 34 / 32


def _bf16_as_float(raw: np.ndarray) -> torch.Tensor:
    """BF16 tensor data as stored (bytes) to float32, independently of gguf."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.int16).copy()).view(torch.bfloat16).float()


def _rounded(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.float32)).to(torch.bfloat16).float()


@pytest.fixture
def tiny_gguf(tmp_path):
    """A small GGUF with an F32 norm, an F32 matrix, a Q8_0 matrix and metadata arrays."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_float32("llama.rope.freq_base", 100000.0)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<|im_end|>"])
    w.add_key_value("tokenizer.ggml.token_type", [1, 1, 3], GGUFValueType.ARRAY, GGUFValueType.INT32)
    w.add_uint32("general.file_type", 7)
    tensors = {"blk.0.attn_norm.weight": rng.standard_normal(64).astype(np.float32),
               "blk.0.attn_q.weight": rng.standard_normal((48, 64)).astype(np.float32),
               "token_embd.weight": rng.standard_normal((40, 64)).astype(np.float32)}
    for name, a in tensors.items():
        if name == "token_embd.weight":
            w.add_tensor(name, quantize(a, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_export_keeps_metadata_and_rounds_2d_tensors_to_bf16(tiny_gguf, tmp_path):
    out = export_gguf(tiny_gguf, tmp_path / "sub" / "tiny.bf16.gguf")
    assert out.is_file() and not list(out.parent.glob("*.part"))
    src, got = GGUFReader(str(tiny_gguf)), GGUFReader(str(out))
    keys = [k for k in src.fields if not k.startswith("GGUF.")]
    assert [k for k in got.fields if not k.startswith("GGUF.")] == keys
    for k in keys:
        want = MOSTLY_BF16 if k == "general.file_type" else src.fields[k].contents()
        assert got.fields[k].contents() == want, k
        assert got.fields[k].types == src.fields[k].types, k
    assert [t.name for t in got.tensors] == [t.name for t in src.tensors]
    for s, g in zip(src.tensors, got.tensors):
        assert list(g.shape) == list(s.shape), s.name
        source = dequantize(s.data, s.tensor_type)
        if len(s.shape) == 1:
            assert g.tensor_type == GGMLQuantizationType.F32
            assert np.array_equal(np.asarray(g.data), source), s.name
        else:
            assert g.tensor_type == GGMLQuantizationType.BF16
            assert torch.equal(_bf16_as_float(g.data).reshape(source.shape), _rounded(source)), s.name


def test_a_failed_export_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    import gguf

    def broken(self, tensor, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_gguf, tmp_path / "out" / "x.gguf")
    assert list((tmp_path / "out").iterdir()) == []


def test_cached_export_is_written_once_and_keyed_by_content(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("WALLPERF_CACHE", str(tmp_path / "cache"))
    first = bf16_gguf(tiny_gguf)
    assert first.parent == tmp_path / "cache" / "gguf" and first == cached_export_path(tiny_gguf)
    stamp = first.stat().st_mtime_ns
    assert bf16_gguf(tiny_gguf) == first and first.stat().st_mtime_ns == stamp
    changed = tmp_path / "changed" / tiny_gguf.name
    changed.parent.mkdir()
    changed.write_bytes(tiny_gguf.read_bytes() + b"\0" * 32)
    assert cached_export_path(changed) != first


def test_cli_export(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["export-gguf", "--model", str(tiny_gguf), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert GGUFReader(str(out)).fields["general.file_type"].contents() == MOSTLY_BF16
    # A model that is not a GGUF, and an output name that is not one, are refused.
    assert main(["export-gguf", "--model", "llama3.1-8b"]) == 2
    assert main(["export-gguf", "--model", str(tiny_gguf), "--out", str(tmp_path / "x.bin")]) == 2
    assert "expected a .gguf" in capsys.readouterr().err


def test_roofline_counts_an_engines_own_weight_bytes():
    s, cpu = load_model_config("smollm2-135m").shape, load_hardware_config("cpu")
    kv_per_token = 2 * s.n_layers * s.n_kv_heads * s.head_dim * 2  # float16 K and V
    gguf = WeightBytes(table=0, dense=96e6)
    wall = memory_wall(s, cpu, "bfloat16", context=100, weights=gguf, kv_bytes_per_element=2)
    assert wall == pytest.approx(32e9 / (96e6 + 100 * kv_per_token))
    r = run_roofline(s, cpu, "bfloat16", 50.0, batch=4, context=100, weights=gguf, kv_bytes_per_element=2)
    assert r["bytes_per_step"] == pytest.approx(96e6 + 4 * 100 * kv_per_token)
    assert r["mbu"] == pytest.approx(50 / 4 * r["bytes_per_step"] / 32e9)
    # Without the overrides, the parameter count at the dtype's size, as before.
    assert run_roofline(s, cpu, "bfloat16", 50.0, 4, 100)["bytes_per_step"] > 2 * 134e6


# -- the real SmolLM2 GGUF (slow) ---------------------------------------------


@pytest.mark.slow
def test_smollm2_weight_bytes_from_ggml_block_sizes(smollm2_gguf_path):
    from wallperf.sut.backends.llamacpp import load_gguf_model

    loaded = load_gguf_model(smollm2_gguf_path)
    s = load_model_config("smollm2-135m").shape
    h, kv, f = s.hidden_size, s.n_kv_heads * s.head_dim, s.ffn_size
    per_layer = h * h * 2 + kv * h * 2 + 3 * h * f  # q, o; k, v; gate, up, down
    norms = (2 * s.n_layers + 1) * h
    # Tied embeddings: token_embd is also the LM head, read whole each step, counted once.
    want = s.n_layers * per_layer * Q4_1_BYTES + s.vocab_size * h * Q8_0_BYTES + 4 * norms
    assert loaded.weight_bytes == want and loaded.table_bytes == 0
    assert loaded.weight_format == "gguf Q4_1+Q8_0"
    assert loaded.config.tie_embeddings and loaded.tokenizer.eos_token_ids == {2}


@pytest.mark.slow
def test_smollm2_bf16_export_holds_the_native_bf16_weights(smollm2_gguf_path, tmp_path):
    from wallperf.sut.loading.load import load_model

    out = export_gguf(smollm2_gguf_path, tmp_path / "smollm2.bf16.gguf")
    src, got = GGUFReader(str(smollm2_gguf_path)), GGUFReader(str(out))
    assert got.fields["tokenizer.ggml.merges"].contents() == src.fields["tokenizer.ggml.merges"].contents()
    assert got.fields["tokenizer.chat_template"].contents() == src.fields["tokenizer.chat_template"].contents()
    for s, g in zip(src.tensors, got.tensors):
        assert s.name == g.name
        if len(s.shape) > 1:
            source = dequantize(s.data, s.tensor_type)
            assert torch.equal(_bf16_as_float(g.data).reshape(source.shape), _rounded(source)), s.name
    # And the native engine, loading either file in bf16, holds the same weights.
    a = load_model(smollm2_gguf_path, "bfloat16").model.state_dict()
    b = load_model(out, "bfloat16").model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
