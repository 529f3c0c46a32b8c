"""Whole-tensor dequantization of the simple GGML block formats against the
`gguf` package's own (the reference): bit for bit, on random blocks (every bit
pattern of the packed integers, scales of both signs, NaN-free float16) and on
values quantized by the package."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from wallperf.sut.loading.dequant import dequantize_simple

SIMPLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]


def _random_blocks(kind, rows, blocks, rng):
    size = {T.Q4_0: 18, T.Q4_1: 20, T.Q5_0: 22, T.Q5_1: 24, T.Q8_0: 34}[kind]
    data = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    # The float16 scale (and min) drawn as finite values, so the comparison is about the arithmetic.
    halves = 2 if kind in (T.Q4_1, T.Q5_1) else 1
    data[..., :2 * halves] = rng.uniform(-2, 2, size=(rows, blocks, halves)).astype(np.float16).view(np.uint8)
    return data.reshape(rows, blocks * size)


@pytest.mark.parametrize("kind", SIMPLE, ids=lambda k: k.name)
def test_random_blocks_dequantize_bit_for_bit_as_gguf_does(kind):
    data = _random_blocks(kind, 7, 5, np.random.default_rng(int(kind)))
    ours = dequantize_simple(data, int(kind))
    ref = np.asarray(dequantize(data, kind), dtype=np.float32)
    assert ours.shape == ref.shape == (7, 160)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("kind", SIMPLE, ids=lambda k: k.name)
def test_values_quantized_by_gguf_come_back_as_gguf_gives_them(kind):
    w = np.random.default_rng(3).standard_normal((2, 3, 96)).astype(np.float32)
    q = quantize(w, kind)
    ours = dequantize_simple(q, int(kind))
    assert ours.shape == w.shape
    assert np.array_equal(ours, np.asarray(dequantize(q, kind), dtype=np.float32))
    assert np.abs(ours - w).max() < 0.25  # and they are the weights, roughly


def test_other_types_are_left_to_gguf():
    assert dequantize_simple(np.zeros((1, 144), np.uint8), int(T.Q4_K)) is None
    assert dequantize_simple(np.zeros((1, 4), np.float32), int(T.F32)) is None
