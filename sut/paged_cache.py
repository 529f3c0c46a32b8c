"""Paged KV cache: fixed-size blocks, addressed through each sequence's block table.

Storage per layer is (num_blocks, block_size, H_kv, D), the layout of the paged
decode-attention kernel. A forward pass binds each row's block table and
positions: new keys and values are written at their slots (block * block_size
+ offset), and each row reads back its first `span` tokens. The mask rule is
the slot cache's: a query at position p attends to keys at positions <= p, so
padding rows and stale slots are never read.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kernels import dispatch


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


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * n_layers * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def pool_blocks(bytes_per_block: int, free_bytes: int, fraction: float, needed_blocks: int) -> int:
    """Blocks for the pool: a fraction of free memory, and never more than needed."""
    affordable = int(free_bytes * fraction) // bytes_per_block
    if affordable < 1:
        raise MemoryError(f"{free_bytes / 2**20:.0f} MiB free is too little for one KV block "
                          f"of {bytes_per_block / 2**20:.2f} MiB")
    return max(1, min(affordable, needed_blocks))


class PagedKVCache:
    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        self._write_slots = self._read_slots = self._write_rows = None
        self._span = 0
        # Decode steps on a GPU attend with the paged kernel, straight from the blocks.
        self._kernel_args = None

    def bind(self, block_tables: list[list[int]], positions: torch.Tensor, valid: torch.Tensor):
        """Rows' block tables, positions (B, T), and which (b, t) are real tokens."""
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
        self._kernel_args = None
        if positions.shape[1] == 1 and dispatch.uses_triton(self.k):
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
        flat_k = c.k[self.i].flatten(0, 1)  # (num_blocks * block_size, H_kv, D)
        flat_v = c.v[self.i].flatten(0, 1)
        rows, cols = c._write_rows
        flat_k[c._write_slots] = k.transpose(1, 2)[rows, cols]
        flat_v[c._write_slots] = v.transpose(1, 2)[rows, cols]
        if c._kernel_args is not None:
            tables, seq_lens = c._kernel_args
            out = dispatch.paged_decode_attention(q[:, :, 0].contiguous(), c.k[self.i], c.v[self.i],
                                                  tables, seq_lens)  # (B, H, D)
            return out.unsqueeze(2)
        k_all = flat_k[c._read_slots].transpose(1, 2)  # (B, H_kv, span, D)
        v_all = flat_v[c._read_slots].transpose(1, 2)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
