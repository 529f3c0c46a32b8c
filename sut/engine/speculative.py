"""Speculative decoding's drafters, the greedy acceptance rule and its counters.

A drafter proposes up to k tokens to follow each decoding sequence; the target
then scores the sequence's last token and the k drafts in one verify pass
(sut.engine.model_runner) and keeps the drafts up to the first one its own
greedy choice disagrees with, plus its own token there. Every emitted token is
the target's argmax at a position whose context is exactly the tokens emitted
before it, so the output is greedy decoding's, token for token, whatever the
drafter proposes: a drafter changes only how many tokens a step emits.

- `NgramDrafter` (prompt lookup): the continuation of the most recent earlier
  occurrence of the sequence's last n tokens (n from `max_n` down to 1) in its
  prompt and output. No model, no cache.
- `DraftModelDrafter`: a smaller model with the same tokenizer, decoding
  greedily on its own paged KV cache. It catches up on the tokens it has not
  seen (a new prompt, or the target's correction), then decodes k - 1 more.
  Its numerics never reach the output, so it takes the fastest path there is:
  the fused decode step for every catch-up, a new prompt included.

What a verify cycle costs on 2 AVX2 cores (Qwen2.5-Coder-1.5B verifying
0.5B drafts, bf16, k = 4, HumanEval): a draft step ~41 ms (its 0.99 GB at
~25 GB/s), the 5-row verify ~1.14x a 1-row step of the target (~128 ms), and
the drafter's catch-up on a prompt ~7 ms a token (compute-bound), paid once
in a request's first verify step; the Python in between is ~1 ms a step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wallperf.sut.engine.block_manager import BlockManager
from wallperf.sut.engine.model_runner import ModelRunner
from wallperf.sut.engine.paged_cache import PagedKVCache


def accepted_prefix(drafts: list[int], targets: list[int]) -> int:
    """How many drafts the target's greedy tokens confirm: the length of their common prefix."""
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return n


class NgramDrafter:
    name = "ngram"

    def __init__(self, max_n: int = 3):
        if max_n < 1:
            raise ValueError(f"ngram drafter: max_n must be >= 1, got {max_n}")
        self.max_n = max_n

    def propose(self, seqs, ks: list[int]) -> list[list[int]]:
        return [self._lookup(s.tokens(), k) if k > 0 else [] for s, k in zip(seqs, ks)]

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        for n in range(min(self.max_n, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            # The most recent earlier occurrence: code repeats its nearest context.
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k]
        return []

    def release(self, seq) -> None:
        pass


# Without the fused step, at most this many uncached tokens go through the
# drafter's decode step rather than an eager prefill.
_CATCH_UP_ROWS = 8
# With it, a new prompt goes through the fused step too, this many rows a call:
# the eager prefill re-packs every weight per call and runs ~20 ops a block from
# Python (Qwen2.5-Coder-0.5B, an 80-token prompt, 2 AVX2 cores: 6.6 s eager,
# 3.3 s in calls of 32 rows, 3.7 s of 64; one process, back to back, loaded machine).
_CATCH_UP_CHUNK = 32


class DraftModelDrafter:
    name = "draft-model"

    def __init__(self, model, max_batch: int, max_seq_len: int, max_k: int, device, block_size: int = 16,
                 context: int | None = None, vocab: int | None = None):
        """`context`: the drafter reads at most this many of a new sequence's last
        tokens (None: all of them). Its catch-up on a prompt costs a prefill of
        the drafter, paid in the first verify step; its drafts only need the
        recent context to be right often.

        `vocab`: the drafter proposes only token ids below this (None, or the
        vocabulary's size or more: any). Its
        head then computes those rows of logits alone: on Qwen2.5-Coder-0.5B the
        head is 272 MB of the 988 MB a draft step reads, for 151,936 tokens. A
        byte-level BPE numbers its tokens in the order their merges were learnt,
        most frequent first, so the first ids are the common ones; a target token
        beyond them is never drafted, and the target emits it itself. Exactness is
        untouched: the target verifies every draft."""
        if context is not None and context < 1:
            raise ValueError(f"draft model: context must be >= 1 token or None, got {context}")
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        if vocab is not None and vocab < 16:
            raise ValueError(f"draft model: vocab must be at least 16 token ids (or None: all), got {vocab}")
        self.context = context
        self.vocab = None if vocab is None or vocab >= head.size(0) else vocab  # past the end: every id
        # Bytes of the head a draft step does not read: its rows past `vocab`.
        self.head_bytes_skipped = (0 if self.vocab is None
                                   else (head.size(0) - self.vocab) * head[0].numel() * head.element_size())
        cfg = model.cfg
        dtype = model.embed_tokens.weight.dtype
        per_seq = -(-(max_seq_len + max_k + 1) // block_size)
        self.blocks = BlockManager(max_batch * per_seq, block_size)
        self.cache = PagedKVCache(cfg.n_layers, max_batch * per_seq, block_size, cfg.n_kv_heads, cfg.head_dim,
                                  dtype, torch.device(device))
        self.runner = ModelRunner(model, self.cache, torch.device(device))
        if self.vocab is not None and self.runner.fused is not None:
            self.runner.fused.limit_head(self.vocab)
        self.model = model

    def _choice(self, logits: torch.Tensor) -> int:
        """The drafter's greedy token from one row of logits (within `vocab`)."""
        return int((logits if self.vocab is None else logits[:self.vocab]).argmax())

    def propose(self, seqs, ks: list[int]) -> list[list[int]]:
        """Up to ks[i] greedy draft tokens for each sequence (none where ks[i] is 0)."""
        live = [i for i, k in enumerate(ks) if k > 0]
        drafts = [[] for _ in seqs]
        if not live:
            return drafts
        rows = {}
        for i in live:
            s = seqs[i]
            tokens = s.tokens()
            if s.draft_cached == 0 and self.context is not None:
                s.draft_start = s.draft_cached = max(0, len(tokens) - self.context)
            # The drafter's positions count from draft_start.
            self.blocks.grow(s.draft_block_table, len(tokens) - s.draft_start + ks[i])
            rows[i] = (tokens[s.draft_cached:], s.draft_cached - s.draft_start, s.draft_block_table)
            s.draft_cached = len(tokens)
        for i, token in zip(live, self._catch_up([rows[i] for i in live])):
            drafts[i].append(token)
        for step in range(1, max(ks)):
            live = [i for i in live if ks[i] > step]
            if not live:
                break
            s_ = [seqs[i] for i in live]
            logits = self.runner.decode([drafts[i][-1] for i in live], [s.draft_cached - s.draft_start for s in s_],
                                        [s.draft_block_table for s in s_])
            for r, i in enumerate(live):
                seqs[i].draft_cached += 1
                drafts[i].append(self._choice(logits[r]))
        return drafts

    def _catch_up(self, rows) -> list[int]:
        """Feed each sequence the tokens its draft cache lacks (the target's correction
        and the drafts it confirmed past the cache, or a new prompt); the drafter's
        greedy token after the last of them. The drafter's numerics need not be the
        one-token step's (the target verifies every draft), so rows of any number
        may share a call."""
        if self.runner.fused is not None:
            # The runner's fused prefill: the head only at each sequence's last token.
            return [self._choice(lg) for lg in self.runner.prefill(rows, rows_per_call=_CATCH_UP_CHUNK)]
        out = [None] * len(rows)
        short = [i for i, r in enumerate(rows) if len(r[0]) <= _CATCH_UP_ROWS]
        long = [i for i, r in enumerate(rows) if len(r[0]) > _CATCH_UP_ROWS]
        if short:
            for i, lg in zip(short, self.runner.verify([rows[i] for i in short])):
                out[i] = self._choice(lg[-1])
        if long:
            for i, lg in zip(long, self.runner.prefill([rows[i] for i in long])):
                out[i] = self._choice(lg)
        return out

    def release(self, seq) -> None:
        self.blocks.free(seq.draft_block_table)
        seq.draft_cached = seq.draft_start = 0


@dataclass
class SpecStats:
    """Counters over a run's verify steps (one step verifies every decoding sequence)."""

    k: int
    steps: int = 0
    # One per sequence per verify step: its drafts proposed, accepted and tokens emitted.
    verifies: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    # by_position[j]: verifies whose drafts reached position j + 1, and those accepting it.
    proposed_at: list = field(default_factory=list)
    accepted_at: list = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    def record(self, n_drafts: int, n_accepted: int, n_emitted: int) -> None:
        self.verifies += 1
        self.drafted += n_drafts
        self.accepted += n_accepted
        self.emitted += n_emitted
        while len(self.proposed_at) < n_drafts:
            self.proposed_at.append(0)
            self.accepted_at.append(0)
        for j in range(n_drafts):
            self.proposed_at[j] += 1
            self.accepted_at[j] += j < n_accepted

    def summary(self) -> dict:
        """The figures a report prints: rates, per-position acceptance, time per step."""
        per = lambda a, b: a / b if b else None  # noqa: E731
        return {
            "num_draft_tokens": self.k,
            "verify_steps": self.steps,
            "acceptance_rate": per(self.accepted, self.drafted),
            # Tokens each sequence emits per verify step (accepted drafts + the target's own).
            "mean_acceptance_length": per(self.emitted, self.verifies),
            "acceptance_by_position": [per(a, p) for a, p in zip(self.accepted_at, self.proposed_at)],
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "emitted_tokens": self.emitted,
            "draft_ms_per_step": per(1000 * self.draft_seconds, self.steps),
            "verify_ms_per_step": per(1000 * self.verify_seconds, self.steps),
        }


@dataclass(frozen=True)
class Speculation:
    """How the engine speculates: a drafter and k drafted tokens per verify, fixed, or
    adaptive per sequence (one more after a step accepting all its drafts, one
    fewer after a step accepting none, within 1..k)."""

    drafter: object
    k: int
    adaptive: bool = False

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"speculative decoding needs num_draft_tokens >= 1, got {self.k}")
