"""The fast GGUF reader against the `gguf` package's own GGUFReader (the
independent reference): the same metadata values, the same tensor names, shapes,
types and bytes, and the same dequantized weights; and a hostile file (cut short
anywhere, or with counts it cannot hold) is one ValueError, quickly."""
from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

from wallperf.sut.loading.gguf_file import GGUFFile


def _write(path, tensor_types=(GGMLQuantizationType.F32, GGMLQuantizationType.Q8_0,
                               GGMLQuantizationType.Q4_1, GGMLQuantizationType.BF16, GGMLQuantizationType.F16)):
    rng = np.random.default_rng(1)
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_float32("llama.rope.freq_base", 100000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.chat_template", "{{ messages }} é ✓")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<|im_end|>", "ünï"])
    w.add_array("tokenizer.ggml.merges", ["a b", "ab c"])
    w.add_key_value("tokenizer.ggml.token_type", [1, 1, 3, 1], GGUFValueType.ARRAY, GGUFValueType.INT32)
    w.add_key_value("general.some_u64", 2 ** 40 + 3, GGUFValueType.UINT64)
    w.add_key_value("general.some_f64", -1.5, GGUFValueType.FLOAT64)
    for i, kind in enumerate(tensor_types):
        a = rng.standard_normal((8, 64)).astype(np.float32)
        if kind in (GGMLQuantizationType.F32,):
            w.add_tensor(f"t{i}.weight", a)
        elif kind == GGMLQuantizationType.F16:
            w.add_tensor(f"t{i}.weight", a.astype(np.float16))
        else:
            w.add_tensor(f"t{i}.weight", quantize(a, kind), raw_dtype=kind)
    w.add_tensor("norm.weight", rng.standard_normal(64).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _same_as_gguf_reader(path) -> None:
    ours, ref = GGUFFile(path), GGUFReader(str(path))
    expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == expected.keys()
    for key, value in expected.items():
        assert ours.metadata[key] == pytest.approx(value) if isinstance(value, float) else ours.metadata[key] == value, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype, a.name
        assert a.data.nbytes == int(b.n_bytes)
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name
        np.testing.assert_array_equal(ours.dequantized(a), np.asarray(dequantize(b.data, b.tensor_type), np.float32))


def test_a_small_file_of_every_common_type_reads_as_gguf_reads_it(tmp_path):
    _same_as_gguf_reader(_write(tmp_path / "m.gguf"))


@pytest.mark.slow
def test_smollm2s_file_reads_as_gguf_reads_it_and_much_faster(smollm2_gguf_path):
    _same_as_gguf_reader(smollm2_gguf_path)
    start = time.perf_counter()
    GGUFFile(smollm2_gguf_path)
    # GGUFReader took 5-18 s on a 2-core VM; the tables are read in well under a second.
    assert time.perf_counter() - start < 2.0


def test_a_file_cut_short_anywhere_is_one_value_error(tmp_path):
    whole = _write(tmp_path / "m.gguf", (GGMLQuantizationType.Q8_0,)).read_bytes()
    cut = tmp_path / "cut.gguf"
    # Every cut through the header and tables, and a few through the tensor data.
    for n in [*range(0, 600, 7), len(whole) - 1, len(whole) - 40]:
        cut.write_bytes(whole[:n])
        with pytest.raises(ValueError):
            GGUFFile(cut)


def test_counts_the_file_cannot_hold_are_refused_before_anything_is_allocated(tmp_path):
    def header(n_tensors, n_kv, body=b""):
        return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body

    cases = {
        "huge key/value count": header(0, 2 ** 62),
        "huge tensor count": header(2 ** 60, 0),
        "huge string length": header(0, 1, struct.pack("<Q", 2 ** 63)),
        "huge string array": header(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2 ** 61)),
        "huge numeric array": header(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2 ** 61)),
        "unknown value type": header(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99)),
        "version 7": b"GGUF" + struct.pack("<IQQ", 7, 0, 0),
        "not gguf": b"GGML" + bytes(40),
    }
    for what, data in cases.items():
        path = tmp_path / "bad.gguf"
        path.write_bytes(data + bytes(16))
        start = time.perf_counter()
        with pytest.raises(ValueError):
            GGUFFile(path)
        assert time.perf_counter() - start < 1.0, what


def test_a_tensor_reaching_past_the_end_is_refused(tmp_path):
    path = _write(tmp_path / "m.gguf", (GGMLQuantizationType.F32,))
    data = bytearray(path.read_bytes())
    # The first tensor's offset (the last u64 of its table entry) pushed past the file's end.
    name = b"t0.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8 + 4
    data[at:at + 8] = struct.pack("<Q", len(data))
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="file ends"):
        GGUFFile(path)
