"""A GGUF file's metadata and tensor table, read in one pass over a memory map.

The `gguf` package's GGUFReader builds a numpy view for every part of every
metadata field: a tokenizer's 49,152 tokens and 48,900 merges became ~300,000
memmap slices, 5 s to open SmolLM2-135M's file, and the loader opened it twice
(weights, tokenizer), so each LoadGen test process spent 10 of its 13.5 s of
start-up there. This reader decodes the same layout with `struct` and
`bytes.decode` over the map (tens of milliseconds) and hands each tensor's bytes
to dequantization exactly as GGUFReader shapes them: the simple block formats
vectorized whole (sut/loading/dequant.py), the rest by gguf.quants.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count,
u64 key/value count; each key/value: string key, u32 value type, value (strings
are u64 length + UTF-8 bytes; arrays are u32 element type + u64 count +
elements); each tensor: string name, u32 dimension count, u64 dimensions
(innermost first), u32 ggml type, u64 offset into the data section, which starts
at the next multiple of `general.alignment` (32 when absent).

The file is untrusted: every length and count is checked against what is left of
the file before anything is allocated, so a truncated or hostile file raises
ValueError (loading turns it into one line naming the file), never a huge
allocation or a read past the end.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
_SCALARS = {  # value type -> (struct format, size)
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
    7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
STRING, ARRAY = 8, 9
MAX_DIMS = 4


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple  # numpy order: outermost first
    ggml_type: int
    data: np.ndarray  # as GGUFReader gives it: typed for float/int types, else uint8 rows of blocks


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(f"{what} at byte {self.pos} needs {n} bytes, but the file ends at {self.size}")

    def scalar(self, kind: int, what: str):
        fmt, n = _SCALARS[kind]
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar(10, what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def value(self, kind: int, what: str):
        if kind in _SCALARS:
            return self.scalar(kind, what)
        if kind == STRING:
            return self.string(what)
        if kind != ARRAY:
            raise ValueError(f"{what}: unknown value type {kind}")
        item, count = self.scalar(4, what), self.scalar(10, what)
        if item in _SCALARS:
            fmt, size = _SCALARS[item]
            n = count * size
            self.need(n, what)
            # struct's codes are numpy's too.
            values = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos).tolist()
            self.pos += n
            return values
        if item == STRING:
            # Each string takes at least its 8-byte length: a count the file cannot hold is refused first.
            self.need(8 * count, what)
            return [self.string(what) for _ in range(count)]
        if item == ARRAY:
            self.need(12 * count, what)
            return [self.value(ARRAY, what) for _ in range(count)]
        raise ValueError(f"{what}: unknown array element type {item}")


class GGUFFile:
    """`metadata` (key -> Python value, as GGUFReader's `contents()`), `tensors` (in file
    order), `version`. Tensors are views of the memory map: copy what must outlive it."""

    def __init__(self, path: str | Path):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            if size < 24:
                raise ValueError(f"{size} bytes: too short for a GGUF header")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        c = _Cursor(self._map, size)
        c.need(4, "magic")
        if bytes(self._map[:4]) != MAGIC:
            raise ValueError(f"not a GGUF file (magic {bytes(self._map[:4])!r})")
        c.pos = 4
        self.version = c.scalar(4, "version")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = c.scalar(10, "tensor count"), c.scalar(10, "key/value count")
        # Each entry takes at least 8 bytes of name length: counts the file cannot hold are refused now.
        c.need(8 * (n_tensors + n_kv), "the tables")
        self.metadata = {}
        for _ in range(n_kv):
            key = c.string("a metadata key")
            if key in self.metadata:
                raise ValueError(f"metadata key {key!r} appears twice")
            self.metadata[key] = c.value(c.scalar(4, key), key)
        infos = []
        for _ in range(n_tensors):
            name = c.string("a tensor name")
            n_dims = c.scalar(4, name)
            if not 1 <= n_dims <= MAX_DIMS:
                raise ValueError(f"tensor {name!r}: {n_dims} dimensions")
            dims = [c.scalar(10, name) for _ in range(n_dims)]
            infos.append((name, dims, c.scalar(4, name), c.scalar(10, name)))
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment={align!r} is not a power of two")
        start = -(-c.pos // align) * align
        self.tensors, seen = [], set()
        for name, dims, kind, offset in infos:
            if name in seen:
                raise ValueError(f"tensor {name!r} appears twice")
            seen.add(name)
            try:
                qtype = GGMLQuantizationType(kind)
            except ValueError:
                raise ValueError(f"tensor {name!r}: unknown ggml type {kind}") from None
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            shape = tuple(reversed(dims))
            count = int(np.prod(shape, dtype=object))
            if shape[-1] % block:
                raise ValueError(f"tensor {name!r}: rows of {shape[-1]} are not whole blocks of {block}")
            nbytes = count // block * block_bytes
            at = start + offset
            if at + nbytes > size:
                raise ValueError(f"tensor {name!r} needs bytes {at}..{at + nbytes}, but the file ends at {size}")
            typed = _TYPED.get(qtype.name)
            if typed is not None:
                data = np.frombuffer(self._map, dtype=typed, count=count, offset=at).reshape(shape)
            else:
                data = np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=at).reshape(
                    *shape[:-1], shape[-1] // block * block_bytes)
            self.tensors.append(GGUFTensor(name, shape, int(kind), data))

    def dequantized(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor in float32, a copy owned by the caller."""
        from gguf.quants import dequantize

        from wallperf.sut.loading.dequant import dequantize_simple

        fast = dequantize_simple(tensor.data, tensor.ggml_type)
        if fast is not None:
            return fast

        from gguf.constants import GGMLQuantizationType

        return np.array(dequantize(tensor.data, GGMLQuantizationType(tensor.ggml_type)), dtype=np.float32)


# ggml types whose bytes are plain numpy values (the rest are blocks, dequantized by gguf.quants).
_TYPED = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
