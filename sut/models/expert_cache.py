"""Where a mixture of memory experts keeps its experts: a bank of millions of rows in a
memory-mapped safetensors file on the host, and an LRU cache of the hot rows on the
compute device.

The bank is far larger than the device's memory is meant to spend on it (1M experts of
hidden 576 in bf16 are 2.3 GB per layer) while a token reads a few dozen rows, so the
rows stay in the file and the page cache: opening reads the header only, a gather
touches only the pages of the rows it asks for.

The cache holds `capacity` rows in one device tensor (`storage`). Each step, `fetch`
takes the experts a batch selected, looks up the distinct ones, and loads those that
miss in one gather from the bank and one copy to the device, into the slots of the
least recently used rows. Recency is counted in steps: every expert a step uses is
marked with that step's number, so a step never evicts what it is about to read (it
may use at most `capacity` distinct experts; callers split bigger batches).

Counters: `selections` (token-expert picks), `lookups` (distinct experts per step,
summed), `hits` + `misses` = lookups, `bytes_loaded` = misses * bytes_per_expert,
`load_seconds` (gather and copy; on a GPU the copy from pageable memory is
synchronous, the scatter into `storage` is not).
"""
from __future__ import annotations

import json
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wallperf.sut.atomic import atomic_file

_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# Rows generated and written at a time: bounded memory whatever the bank's size.
_CHUNK_ROWS = 16384


def write_synthetic_bank(path: Path, tensors: dict, dtype: torch.dtype, seed: int, scale: float,
                         metadata: dict | None = None) -> None:
    """Write a safetensors file of seeded N(0, scale^2) tensors, `tensors` mapping
    name -> (rows, row_size), streamed in chunks and renamed into place when complete,
    so that a reader never sees a partial bank (two writers race harmlessly)."""
    path = Path(path)
    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    item = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, (rows, row_size) in tensors.items():
        nbytes = rows * row_size * item
        header[name] = {"dtype": names[dtype], "shape": [rows, row_size], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {k: str(v) for k, v in {**(metadata or {}), "seed": seed, "scale": scale}.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so the data is 8-byte aligned
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        generator = torch.Generator().manual_seed(seed)
        for rows, row_size in tensors.values():
            for start in range(0, rows, _CHUNK_ROWS):
                n = min(_CHUNK_ROWS, rows - start)
                chunk = (torch.randn(n, row_size, generator=generator) * scale).to(dtype)
                f.write(chunk.view(torch.uint8).numpy())


class ExpertBank:
    """A safetensors file of 2-D tensors, one expert per row, mapped read-only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        self.metadata = header.pop("__metadata__", {})
        # A private mapping of the whole file: pages are read on first touch and
        # dropped under memory pressure, never written back.
        raw = torch.from_file(str(self.path), shared=False, size=self.path.stat().st_size, dtype=torch.uint8)
        data = 8 + header_len
        self.tensors = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            flat = raw[data + begin: data + end].view(_SAFETENSORS_DTYPES[info["dtype"]])
            self.tensors[name] = flat.view(*info["shape"])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


@dataclass(frozen=True)
class ExpertCacheStats:
    steps: int = 0
    selections: int = 0
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0

    def __add__(self, other: "ExpertCacheStats") -> "ExpertCacheStats":
        return ExpertCacheStats(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def to_dict(self) -> dict:
        hit_rate = self.hits / self.lookups if self.lookups else None
        return {**asdict(self), "hit_rate": hit_rate}


class ExpertCache:
    def __init__(self, bank_rows: torch.Tensor, capacity: int, device: torch.device | str = "cpu"):
        """bank_rows (N, R): the experts on the host (an ExpertBank tensor); `capacity`
        rows of them are kept on `device`."""
        n_experts = bank_rows.shape[0]
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.bank_rows = bank_rows
        self.capacity = min(capacity, n_experts)
        self.storage = torch.empty(self.capacity, bank_rows.shape[1], dtype=bank_rows.dtype, device=device)
        # Host-side maps: 4 bytes per expert of the bank, 16 per slot.
        self.slot_of = torch.full((n_experts,), -1, dtype=torch.int32)
        self.expert_of = torch.full((self.capacity,), -1, dtype=torch.int64)
        # Empty slots carry -1, older than any step, so they fill first.
        self.last_used = torch.full((self.capacity,), -1, dtype=torch.int64)
        self._counts = dict.fromkeys(("steps", "selections", "lookups", "hits", "misses", "evictions"), 0)
        self._load_seconds = 0.0

    @property
    def bytes_per_expert(self) -> int:
        return self.bank_rows.shape[1] * self.bank_rows.element_size()

    @property
    def stats(self) -> ExpertCacheStats:
        c = self._counts
        return ExpertCacheStats(**c, bytes_loaded=c["misses"] * self.bytes_per_expert,
                                load_seconds=self._load_seconds)

    def fetch(self, ids: torch.Tensor) -> torch.Tensor:
        """Make the experts `ids` (any shape) resident; their slots in `storage`
        (same shape, int64, on the storage's device)."""
        flat = ids.reshape(-1).to("cpu", torch.int64)  # the bank is on the host: one sync
        unique = torch.unique(flat)  # sorted, so a miss gather walks the file forward
        if unique.numel() > self.capacity:
            raise ValueError(f"a step uses {unique.numel()} distinct experts; the cache holds {self.capacity}")
        c = self._counts
        c["steps"] += 1
        step = c["steps"]
        slots = self.slot_of[unique].long()
        resident = slots >= 0
        self.last_used[slots[resident]] = step
        missing = unique[~resident]
        if missing.numel():
            self._load(missing, step)
        c["selections"] += flat.numel()
        c["lookups"] += unique.numel()
        c["hits"] += int(resident.sum())
        c["misses"] += missing.numel()
        return self.slot_of[flat].long().view(ids.shape).to(self.storage.device)

    def _load(self, missing: torch.Tensor, step: int) -> None:
        start = time.perf_counter()
        # The oldest marks; this step's hits carry the newest, and at least len(missing)
        # slots are older since the step's distinct experts fit in the cache.
        victims = torch.topk(self.last_used, missing.numel(), largest=False).indices
        evicted = self.expert_of[victims]
        evicted = evicted[evicted >= 0]
        self.slot_of[evicted] = -1
        rows = self.bank_rows.index_select(0, missing)  # (m, R): the one gather from the bank
        self.storage[victims.to(self.storage.device)] = rows.to(self.storage.device)
        self.slot_of[missing] = victims.int()
        self.expert_of[victims] = missing
        self.last_used[victims] = step
        self._counts["evictions"] += evicted.numel()
        self._load_seconds += time.perf_counter() - start
