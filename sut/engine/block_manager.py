"""Blocks of the paged KV cache: a free list and a reference count per block.

A sequence owns a block table (the blocks holding its tokens, in order).
Reference counts let several sequences share blocks (a common prefix, or a
forked sequence); a block returns to the free list when its count drops to 0.
"""
from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def extra_blocks(self, block_table: list[int], n_tokens: int) -> int:
        """How many more blocks a table needs to hold n_tokens."""
        return max(0, self.blocks_for(n_tokens) - len(block_table))

    def can_grow(self, block_table: list[int], n_tokens: int) -> bool:
        return self.extra_blocks(block_table, n_tokens) <= self.num_free

    def grow(self, block_table: list[int], n_tokens: int) -> None:
        """Append blocks to `block_table` until it holds n_tokens."""
        need = self.extra_blocks(block_table, n_tokens)
        if need > self.num_free:
            raise OutOfBlocks(f"need {need} blocks, {self.num_free} free")
        for _ in range(need):
            block = self._free.popleft()
            self.ref_counts[block] = 1
            block_table.append(block)

    def fork(self, block_table: list[int]) -> list[int]:
        """A second owner for the same blocks (shared, read-only prefix)."""
        for block in block_table:
            self.ref_counts[block] += 1
        return list(block_table)

    def free(self, block_table: list[int]) -> None:
        for block in block_table:
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} freed more often than it was taken")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free.append(block)
        block_table.clear()
