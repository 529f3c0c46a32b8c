"""KV cache with one fixed slot per running sequence.

Slot `s` holds a sequence's keys and values at positions 0..len-1, so a query
at position p may attend to every cached position <= p. One rule then masks
prefill (causal) and batched decode of sequences of different lengths alike,
and stale entries past a sequence's length are never read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class SlotKVCache:
    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (n_layers, n_slots, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_slots, self.max_seq_len = n_slots, max_seq_len
        self._slots = None
        self._positions = None
        self._span = 0

    def bind(self, slots: list[int], positions: torch.Tensor) -> "SlotKVCache":
        """Set the slots and positions (B, T) of the next forward pass."""
        span = int(positions.max()) + 1
        if span > self.max_seq_len:
            raise ValueError(f"position {span - 1} exceeds the cache's max_seq_len {self.max_seq_len}")
        self._positions = positions
        self._span = span
        # A run of consecutive slots reads the cache as a view; others gather.
        first = slots[0]
        contiguous = slots == list(range(first, first + len(slots)))
        self._slots = slice(first, first + len(slots)) if contiguous else torch.tensor(slots)
        return self

    def attention_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, S) boolean: True where a query may attend to a key."""
        keys = torch.arange(self._span, device=positions.device)
        return (keys <= positions.unsqueeze(-1)).unsqueeze(1)

    def layer(self, i: int) -> "_LayerView":
        return _LayerView(self, i)


class _LayerView:
    __slots__ = ("cache", "i")

    def __init__(self, cache: SlotKVCache, i: int):
        self.cache, self.i = cache, i

    def attend(self, q, k, v, mask):
        """Store k, v and attend q (B, H, T, D) over the cached keys -> (B, H, T, D)."""
        k_all, v_all = self.store_and_read(k, v)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)

    def store_and_read(self, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H_kv, T, D) at the bound positions; return (B, H_kv, S, D)."""
        c = self.cache
        kc, vc = c.k[self.i], c.v[self.i]  # (N, H_kv, S_max, D)
        slots = c._slots
        if isinstance(slots, slice):
            rows = torch.arange(slots.start, slots.stop).unsqueeze(1)
        else:
            rows = slots.unsqueeze(1)
        rows = rows.expand_as(c._positions)
        # Advanced indices around a slice put the indexed dims first: (B, T, H_kv, D).
        kc[rows, :, c._positions] = k.transpose(1, 2)
        vc[rows, :, c._positions] = v.transpose(1, 2)
        return kc[slots, :, : c._span], vc[slots, :, : c._span]
