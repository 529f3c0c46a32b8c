"""Whole-tensor dequantization of GGML's simple block formats in numpy.

gguf.quants.dequantize splits a tensor into groups of rows and loops over them
in Python: ~2.7 s for SmolLM2-135M's Q4_1 file on a 2-core VM, paid by every
LoadGen test process. The simple formats (a float16 scale, maybe a float16 min
or 5th bits, and packed integers per block of 32) vectorize over the whole
tensor at once. The arithmetic is the package's, operation for operation in
float32 (scale x integer, then + min), so the results are bit for bit the same
(tests/sut/loading/test_dequant.py); every other type (the K-quants, IQ types)
goes to gguf.quants.
"""
from __future__ import annotations

import numpy as np

BLOCK = 32
# The ggml type ids handled here: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (their block sizes are gguf's GGML_QUANT_SIZES).
_SIMPLE = (2, 3, 6, 7, 8)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 values: the low nibbles first, then the high ones."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=1)


def _fifth_bits(blocks: np.ndarray, at: int) -> np.ndarray:
    """Q5's 32 high bits per block, as 0 or 16 per weight."""
    qh = blocks[:, at:at + 4].copy().view("<u4")
    return (((qh >> np.arange(BLOCK, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def dequantize_simple(data: np.ndarray, ggml_type: int) -> np.ndarray | None:
    """float32 weights of `data` (uint8 rows of blocks, as the GGUF stores them), or
    None for a type this module does not handle."""
    if int(ggml_type) not in _SIMPLE:
        return None
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = GGML_QUANT_SIZES[GGMLQuantizationType(int(ggml_type))][1]
    rows = data.shape[:-1]
    blocks = np.ascontiguousarray(data).reshape(-1, size)
    d = _f16(blocks, 0)
    if ggml_type == 8:  # Q8_0
        out = d * blocks[:, 2:].view(np.int8).astype(np.float32)
    elif ggml_type == 2:  # Q4_0
        out = d * (_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)
    elif ggml_type == 3:  # Q4_1
        out = d * _nibbles(blocks[:, 4:]).astype(np.float32) + _f16(blocks, 2)
    elif ggml_type == 6:  # Q5_0
        q = (_nibbles(blocks[:, 6:]) | _fifth_bits(blocks, 2)).astype(np.int8) - np.int8(16)
        out = d * q.astype(np.float32)
    else:  # Q5_1
        q = _nibbles(blocks[:, 8:]) | _fifth_bits(blocks, 4)
        out = d * q.astype(np.float32) + _f16(blocks, 2)
    return out.reshape(*rows, -1)
