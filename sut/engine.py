"""The native engine: continuous batching over a slot KV cache, greedy decoding.

The engine knows nothing of LoadGen. Callers add requests (prompt token ids and
SamplingParams) and call `step()`, which admits waiting requests into free
slots (prefilling them together, padded on the right), runs one decode step
for every running sequence, and returns the tokens produced as TokenEvents.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from sut.kv_cache import SlotKVCache


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int
    # EOS is suppressed until this many tokens exist (LoadGen needs n_tokens > 1).
    min_new_tokens: int = 0
    # Decode exactly max_new_tokens, as serving benchmarks' ignore_eos does.
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens: {self}")


@dataclass(slots=True)
class Sequence:
    request_id: int
    prompt_ids: list
    params: SamplingParams
    slot: int = -1
    output_ids: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: int
    token_id: int
    # 1 for the first generated token.
    index: int
    finished: bool


class Engine:
    def __init__(self, model, eos_token_ids, max_batch: int, max_seq_len: int,
                 prefill_token_budget: int = 4096, device="cpu"):
        cfg = model.cfg
        if max_seq_len > cfg.max_position:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context {cfg.max_position}")
        self.model, self.device = model, torch.device(device)
        self.eos_token_ids = torch.tensor(sorted(eos_token_ids), dtype=torch.long)
        self._eos_set = frozenset(eos_token_ids)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.prefill_token_budget = prefill_token_budget
        dtype = model.embed_tokens.weight.dtype
        self.cache = SlotKVCache(cfg.n_layers, max_batch, cfg.n_kv_heads, max_seq_len, cfg.head_dim,
                                 dtype, self.device)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots = list(range(max_batch - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free_slots) - len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request_id: int, prompt_ids, params: SamplingParams) -> None:
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError(f"request {request_id}: empty prompt")
        if len(prompt) + params.max_new_tokens > self.max_seq_len:
            raise ValueError(f"request {request_id}: prompt of {len(prompt)} tokens + {params.max_new_tokens} "
                             f"new tokens exceeds max_seq_len {self.max_seq_len}")
        self.waiting.append(Sequence(request_id, prompt, params))

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        decoding = list(self.running)
        admitted = []
        while self.waiting and self._free_slots:
            seq = self.waiting.popleft()
            seq.slot = self._free_slots.pop()
            admitted.append(seq)
        for group in self._prefill_groups(admitted):
            self._prefill(group, events)
        if decoding:
            self._decode(decoding, events)
        return events

    def generate(self, prompt_ids, params: SamplingParams) -> list[int]:
        """Greedy tokens for one prompt (the engine must be idle)."""
        assert not self.has_unfinished(), "generate() needs an idle engine"
        self.add_request(0, prompt_ids, params)
        out = []
        while self.has_unfinished():
            out.extend(ev.token_id for ev in self.step())
        return out

    def _prefill_groups(self, seqs):
        group, longest = [], 0
        for seq in seqs:
            n = len(seq.prompt_ids)
            if group and max(longest, n) * (len(group) + 1) > self.prefill_token_budget:
                yield group
                group, longest = [], 0
            group.append(seq)
            longest = max(longest, n)
        if group:
            yield group

    def _prefill(self, group: list[Sequence], events: list) -> None:
        group.sort(key=lambda s: s.slot)
        longest = max(len(s.prompt_ids) for s in group)
        # Right padding: pad positions continue past the prompt, so their cache
        # entries lie beyond the sequence and are overwritten before being read.
        ids = torch.zeros(len(group), longest, dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, : len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids)
        positions = torch.arange(longest).expand(len(group), -1)
        last = torch.tensor([[len(s.prompt_ids) - 1] for s in group])
        self.cache.bind([s.slot for s in group], positions)
        logits = self.model(ids.to(self.device), positions.to(self.device), self.cache,
                            logits_at=last.to(self.device))
        self._sample(group, logits[:, -1], events)
        self.running.extend(s for s in group if s.slot >= 0)

    def _decode(self, seqs: list[Sequence], events: list) -> None:
        seqs = sorted(seqs, key=lambda s: s.slot)
        ids = torch.tensor([[s.output_ids[-1]] for s in seqs])
        positions = torch.tensor([[s.length - 1] for s in seqs])
        self.cache.bind([s.slot for s in seqs], positions)
        logits = self.model(ids.to(self.device), positions.to(self.device), self.cache)
        self._sample(seqs, logits[:, -1], events)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, events: list) -> None:
        """Greedy choice per row; rows still short of min_new_tokens cannot pick EOS."""
        suppress = [i for i, s in enumerate(seqs) if len(s.output_ids) < s.params.min_new_tokens]
        if suppress:
            logits[torch.tensor(suppress).unsqueeze(1), self.eos_token_ids] = float("-inf")
        tokens = logits.argmax(dim=-1).tolist()
        for seq, tok in zip(seqs, tokens):
            seq.output_ids.append(tok)
            n = len(seq.output_ids)
            done = (n >= seq.params.max_new_tokens
                    or (not seq.params.ignore_eos and tok in self._eos_set)
                    or seq.length >= self.max_seq_len)
            events.append(TokenEvent(seq.request_id, tok, n, done))
            if done:
                self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self._free_slots.append(seq.slot)
        seq.slot = -1
