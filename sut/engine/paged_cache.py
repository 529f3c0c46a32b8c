"""Paged KV cache: fixed-size blocks, addressed through each sequence's block table.

Storage per layer is (num_blocks, block_size, H_kv, D), the layout of the paged
decode-attention kernel. A forward pass binds each row's block table and
positions: new keys and values are written at their slots (block * block_size
+ offset), and each row reads back its first `span` tokens. The mask rule is
the slot cache's: a query at position p attends to keys at positions <= p, so
padding rows and stale slots are never read.

With an fp8 `kv_dtype` (e4m3fn, or e4m3fnuz on MI300X) keys and values are
stored as fp8 with one fp32 scale per token and KV head (`k_scale`, `v_scale`:
(n_layers, num_blocks, block_size, H_kv)), quantized as they are written and
dequantized to the compute dtype as they are read. Where the hardware has no
fp8 this is exact emulation: the bytes stored are the ones fp8 hardware holds.
Keys are stored less a calibrated centre per layer, KV head and channel (`k_centre`,
(n_layers, H_kv, D) float32; sut.kv_calibration): each query's scores all shift by
the same amount, which softmax ignores, and the few large, nearly constant channels
some models have no longer take the vector's fp8 scale for themselves.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from wallperf.kernels import dispatch
from wallperf.sut.quant.fp8 import FP8_DTYPES, dequantize, quantize_kv_vectors

FP8_KV_DTYPES = tuple(FP8_DTYPES.values())


def available_memory_bytes(device: torch.device) -> int:
    """Free memory now: the accelerator's, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_bytes_per_element(head_dim: int, dtype: torch.dtype) -> float:
    """Bytes a cache stores per K or V element: fp8 adds its fp32 scale per vector."""
    size = torch.empty(0, dtype=dtype).element_size()
    return size + 4 / head_dim if dtype in FP8_KV_DTYPES else size


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return round(2 * n_layers * n_kv_heads * head_dim * kv_bytes_per_element(head_dim, dtype))


def pool_blocks(bytes_per_block: int, free_bytes: int, fraction: float, needed_blocks: int) -> int:
    """Blocks for the pool: a fraction of free memory, and never more than needed."""
    affordable = int(free_bytes * fraction) // bytes_per_block
    if affordable < 1:
        raise MemoryError(f"{free_bytes / 2**20:.0f} MiB free is too little for one KV block "
                          f"of {bytes_per_block / 2**20:.2f} MiB")
    return max(1, min(affordable, needed_blocks))


class PagedKVCache:
    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", kv_dtype: torch.dtype | None = None,
                 k_centre: torch.Tensor | None = None):
        """`dtype`: the keys and values attention computes with; `kv_dtype`: how they
        are stored (default `dtype`; an fp8 dtype adds per-vector scales); `k_centre`:
        an fp8 cache's key centres (None: zeros, i.e. keys stored as they are)."""
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        store = dtype if kv_dtype is None else kv_dtype
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        self.dtype, self.fp8 = dtype, store in FP8_KV_DTYPES
        self.k_scale = self.v_scale = self.k_centre = None
        if self.fp8:
            self.k_scale = torch.ones(shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = torch.ones(shape[:-1], dtype=torch.float32, device=device)
            want = (n_layers, n_kv_heads, head_dim)
            if k_centre is None:
                k_centre = torch.zeros(want)
            if tuple(k_centre.shape) != want:
                raise ValueError(f"k_centre must be (n_layers, n_kv_heads, head_dim) = {want}, "
                                 f"got {tuple(k_centre.shape)}")
            self.k_centre = k_centre.to(device=device, dtype=torch.float32).contiguous()
        elif k_centre is not None:
            raise ValueError("k_centre is for an fp8 KV cache; this cache stores keys in " + str(store))
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        self._write_slots = self._read_slots = self._write_rows = None
        self._span = 0
        self._row_spans = None
        # Decode steps on a GPU attend with the paged kernel, straight from the blocks.
        self._kernel_args = None

    def bind(self, block_tables: list[list[int]], positions: torch.Tensor, valid: torch.Tensor,
             row_spans: bool = False):
        """Rows' block tables, positions (B, T), and which (b, t) are real tokens.
        `row_spans` (one-token rows only): each row attends in a call of its own over
        exactly its context, as it would alone, instead of all rows over the longest
        context with the rest masked: PyTorch's CPU attention sums masked tiles and
        batched rows in orders that change the low bits (speculative verification
        needs a row's bits to be the one-row step's)."""
        bs = self.block_size
        span = int(positions[valid].max()) + 1
        width = -(-span // bs)
        tables = torch.zeros(len(block_tables), width, dtype=torch.long)
        for row, table in enumerate(block_tables):
            n = min(len(table), width)
            tables[row, :n] = torch.tensor(table[:n])
        tok = torch.arange(span)
        read = tables[:, tok // bs] * bs + tok % bs  # (B, span)
        rows, cols = valid.nonzero(as_tuple=True)
        pos = positions[rows, cols]
        write = tables[rows, pos // bs] * bs + pos % bs  # (N_valid,)
        self._read_slots, self._write_slots = read.to(self.device), write.to(self.device)
        self._write_rows = (rows.to(self.device), cols.to(self.device))
        self._span = span
        self._row_spans = (positions[:, 0] + 1).tolist() if row_spans else None
        self._kernel_args = None
        # The paged kernel reads bf16/fp16 blocks; an fp8 cache is gathered and dequantized.
        if positions.shape[1] == 1 and not self.fp8 and not row_spans and dispatch.uses_triton(self.k):
            seq_lens = (positions[:, 0] + 1).to(torch.int32)
            self._kernel_args = (tables.to(torch.int32).to(self.device), seq_lens.to(self.device))
        return self

    def attention_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, span) boolean: True where a query may attend to a key."""
        keys = torch.arange(self._span, device=positions.device)
        return (keys <= positions.unsqueeze(-1)).unsqueeze(1)

    def layer(self, i: int) -> "_PagedLayer":
        return _PagedLayer(self, i)


class _PagedLayer:
    __slots__ = ("cache", "i")

    def __init__(self, cache: PagedKVCache, i: int):
        self.cache, self.i = cache, i

    def attend(self, q, k, v, mask):
        """Store k, v (B, H_kv, T, D) and attend q (B, H, T, D) over the context -> (B, H, T, D)."""
        c = self.cache
        rows, cols = c._write_rows
        if c.fp8:
            k_all = self._store_fp8(c.k, c.k_scale, k.transpose(1, 2)[rows, cols], c.k_centre[self.i])
            v_all = self._store_fp8(c.v, c.v_scale, v.transpose(1, 2)[rows, cols])
            return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
        flat_k = c.k[self.i].flatten(0, 1)  # (num_blocks * block_size, H_kv, D)
        flat_v = c.v[self.i].flatten(0, 1)
        flat_k[c._write_slots] = k.transpose(1, 2)[rows, cols]
        flat_v[c._write_slots] = v.transpose(1, 2)[rows, cols]
        if c._kernel_args is not None:
            tables, seq_lens = c._kernel_args
            out = dispatch.paged_decode_attention(q[:, :, 0].contiguous(), c.k[self.i], c.v[self.i],
                                                  tables, seq_lens)  # (B, H, D)
            return out.unsqueeze(2)
        if c._row_spans is not None:
            return torch.cat([self._attend_alone(q[b:b + 1], flat_k, flat_v, b, n)
                              for b, n in enumerate(c._row_spans)])
        k_all = flat_k[c._read_slots].transpose(1, 2)  # (B, H_kv, span, D)
        v_all = flat_v[c._read_slots].transpose(1, 2)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)

    def _attend_alone(self, q, flat_k, flat_v, b: int, n: int):
        """Row b's attention over its n positions, the call a one-row step makes."""
        slots = self.cache._read_slots[b, :n]
        k_all = flat_k[slots].transpose(0, 1).unsqueeze(0)  # (1, H_kv, n, D)
        v_all = flat_v[slots].transpose(0, 1).unsqueeze(0)
        mask = torch.ones(1, 1, 1, n, dtype=torch.bool, device=q.device)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)

    def _store_fp8(self, store: torch.Tensor, scales: torch.Tensor, new: torch.Tensor,
                   centre: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize `new` (N, H_kv, D), less `centre` (H_kv, D), into its slots; the
        context back as (B, H_kv, span, D), still centred."""
        c = self.cache
        flat = store[self.i].flatten(0, 1)  # (num_blocks * block_size, H_kv, D)
        flat_scales = scales[self.i].flatten(0, 1)  # (num_blocks * block_size, H_kv)
        flat[c._write_slots], flat_scales[c._write_slots] = quantize_kv_vectors(new, store.dtype, centre)
        return dequantize(flat[c._read_slots], flat_scales[c._read_slots], c.dtype).transpose(1, 2)
