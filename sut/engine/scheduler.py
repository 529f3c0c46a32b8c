"""The scheduler: which sequences run each step, within the token budget and the
KV pool.

Continuous batching: each step has a token budget shared by decodes (one row per
running sequence, or 1 + its drafted tokens under speculative decoding) and
prefill chunks (waiting prompts, or the rest of prompts already started). While
sequences decode, a step prefills one prompt, first come first served: each
waiting request then gets its first token after the prompts before it only, and
the decoding ones wait one prompt per step (see schedule_prefill). When
the KV pool runs out of blocks, the most recently admitted sequence is
preempted: its blocks are freed and it waits again, to be recomputed (prompt and
output so far) when blocks are free.
"""
from __future__ import annotations

from collections import deque

from wallperf.sut.engine.block_manager import BlockManager
from wallperf.sut.engine.sequence import Sequence


# The most a padded prefill batch may compute beside its real tokens (rows x width over their sum).
PAD_SLACK = 1.25


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, max_tokens_per_step: int):
        self.blocks, self.max_batch = blocks, max_batch
        self.max_tokens_per_step = max(max_tokens_per_step, max_batch)
        self.waiting: deque[Sequence] = deque()
        # In admission order: the last one is the first to be preempted.
        self.running: list[Sequence] = []
        self.preemptions = 0
        # Called with a sequence whose blocks are freed (preempted, finished or
        # aborted), so that a drafter can free its own.
        self.on_release = None

    def reserve_decodes(self, lookahead=lambda seq: 0) -> list[Sequence]:
        """Running sequences that decode this step, each with room for its new token
        and the `lookahead(seq)` drafted tokens verified beside it."""
        decoding = [s for s in self.running if s.decoding]
        for seq in list(decoding):
            if seq not in self.running:
                continue
            need = seq.length + lookahead(seq)
            while not self.blocks.can_grow(seq.block_table, need):
                victim = self.running[-1]
                self.preempt(victim)
                if victim in decoding:
                    decoding.remove(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.block_table, need)
        return decoding

    def schedule_prefill(self, budget: int, one_row: bool = False) -> list[tuple[Sequence, int]]:
        """(sequence, tokens) chunks: unfinished prefills first, then new admissions.

        On the eager path the chunks run as one padded batch, every row as wide as the
        widest (the fused C++ step takes their tokens as rows, unpadded, for which this
        bound is only cautious), so the budget bounds rows x width rather than the chunks' sum: one 1000-token prompt
        beside 31 short ones would otherwise compute 32 rows of 1000 positions, and
        attention over the padded span grows with its square (MMLU's prompts run from
        ~100 to ~1100 tokens; an Offline run over them slowed ~10x as long prompts
        came up). A row that would widen the batch past the budget is cut to fit or waits,
        and so does one that would make the padding more than PAD_SLACK of the real tokens.

        `one_row` (the engine passes it while sequences decode): one chunk at most. A
        padded batch gives every row its first token when the widest row is done, so a
        burst of Server arrivals waited for all of them at once, and every decoding
        sequence with them. At 1.2 QPS of MMLU prompts on a 2-core AVX2 VM, TTFT p90/p99
        over 240 requests went from 975/2,277 ms to 702/1,242 ms with one prompt a step."""
        chunks, width, tokens = [], 0, 0
        candidates = [s for s in self.running if not s.decoding]
        for seq in candidates + list(self.waiting):
            if chunks and one_row:
                break
            room = budget // (len(chunks) + 1)  # the widest any row may be with this one added
            if room < max(width, 1):
                break
            admitting = seq not in self.running
            if admitting and len(self.running) >= self.max_batch:
                break
            n = min(seq.length - seq.num_cached, room)
            if chunks and (len(chunks) + 1) * max(width, n) > PAD_SLACK * (tokens + n):
                break
            if not self.blocks.can_grow(seq.block_table, seq.num_cached + n):
                break
            self.blocks.grow(seq.block_table, seq.num_cached + n)
            if admitting:
                self.waiting.remove(seq)
                self.running.append(seq)
            chunks.append((seq, n))
            width, tokens = max(width, n), tokens + n
        return chunks

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)

    def abort(self, request_id: int) -> int | None:
        """Remove an unfinished request; the number of blocks freed, or None when
        no such request is unfinished."""
        for seq in [*self.running, *self.waiting]:
            if seq.request_id == request_id:
                (self.running if seq in self.running else self.waiting).remove(seq)
                freed = len(seq.block_table)
                self._release(seq)
                return freed
        return None

    def preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks; it waits first in line and is recomputed."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        if self.on_release is not None:
            self.on_release(seq)
