"""The native engine: continuous batching over a paged KV cache, greedy decoding.

The engine knows nothing of LoadGen. Callers add requests (prompt token ids and
SamplingParams) and call `step()`, which returns the tokens produced as
TokenEvents. Each step has a token budget shared by decodes (one token per
running sequence) and prefill chunks (waiting prompts, or the rest of prompts
already started). When the KV pool runs out of blocks, the most recently
admitted sequence is preempted: its blocks are freed and it waits again, to be
recomputed (prompt and output so far) when blocks are free.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from wallperf.kernels.cpu_decode import MAX_FUSED_ROWS, FusedDecoder, fused_decode_problem
from wallperf.sut.engine.block_manager import BlockManager
from wallperf.sut.quant.kv_calibration import key_centres
from wallperf.sut.engine.paged_cache import FP8_KV_DTYPES, PagedKVCache, available_memory_bytes, kv_bytes_per_token, pool_blocks


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


def checked_prompt(request_id: int, prompt_ids, params: SamplingParams, max_seq_len: int) -> list:
    """The prompt as a list, or ValueError if it is empty or it and its new tokens overflow max_seq_len
    (every backend's add_request check)."""
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError(f"request {request_id}: empty prompt")
    if len(prompt) + params.max_new_tokens > max_seq_len:
        raise ValueError(f"request {request_id}: prompt of {len(prompt)} tokens + {params.max_new_tokens} "
                         f"new tokens exceeds max_seq_len {max_seq_len}")
    return prompt


@dataclass(slots=True)
class Sequence:
    request_id: int
    prompt_ids: list
    params: SamplingParams
    output_ids: list = field(default_factory=list)
    block_table: list = field(default_factory=list)
    # Tokens whose keys and values are in the cache.
    num_cached: int = 0

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def decoding(self) -> bool:
        """Everything but the last sampled token is cached: the next step feeds it."""
        return bool(self.output_ids) and self.num_cached == self.length - 1

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: int
    token_id: int
    # 1 for the first generated token.
    index: int
    finished: bool


@dataclass(frozen=True, slots=True)
class EngineStats:
    preemptions: int
    kv_blocks: int
    block_size: int
    decode_steps: int
    decode_tokens: int
    # Sum over decoded tokens of the context each attended over.
    decode_context_tokens: int

    @property
    def mean_decode_batch(self) -> float | None:
        return self.decode_tokens / self.decode_steps if self.decode_steps else None

    @property
    def mean_decode_context(self) -> float | None:
        return self.decode_context_tokens / self.decode_tokens if self.decode_tokens else None


class Engine:
    def __init__(self, model, eos_token_ids, max_batch: int, max_seq_len: int,
                 max_tokens_per_step: int = 2048, block_size: int = 16, num_blocks: int | None = None,
                 kv_memory_fraction: float = 0.3, device="cpu", kv_dtype: torch.dtype | None = None):
        """`kv_dtype`: how the KV cache stores keys and values (default: the model's
        dtype; torch.float8_e4m3fn or float8_e4m3fnuz for an fp8 cache with scales)."""
        cfg = model.cfg
        if max_seq_len > cfg.max_position:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context {cfg.max_position}")
        self.model, self.device = model, torch.device(device)
        self.eos_token_ids = torch.tensor(sorted(eos_token_ids), dtype=torch.long)
        self._eos_set = frozenset(eos_token_ids)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.max_tokens_per_step = max(max_tokens_per_step, max_batch)
        dtype = model.embed_tokens.weight.dtype
        if num_blocks is None:
            per_block = block_size * kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, kv_dtype or dtype)
            needed = max_batch * -(-max_seq_len // block_size)
            num_blocks = pool_blocks(per_block, available_memory_bytes(self.device), kv_memory_fraction, needed)
        if num_blocks * block_size < max_seq_len:
            raise ValueError(f"a KV pool of {num_blocks} blocks of {block_size} cannot hold one sequence "
                             f"of max_seq_len {max_seq_len}")
        self.blocks = BlockManager(num_blocks, block_size)
        # An fp8 cache stores keys less their calibrated centres (sut.kv_calibration).
        centres = key_centres(model) if kv_dtype in FP8_KV_DTYPES else None
        self.cache = PagedKVCache(cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim,
                                  dtype, self.device, kv_dtype, centres)
        self._fused, self.decode_path = self._fused_decoder(model, dtype)
        self.waiting: deque[Sequence] = deque()
        # In admission order: the last one is the first to be preempted.
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._decode_steps = self._decode_tokens = self._decode_context = 0

    def _fused_decoder(self, model, dtype):
        """The one-call C++ decode step where it runs (bf16 on the CPU), and a
        sentence saying which decode path this engine takes and why."""
        if self.device.type != "cpu" or dtype != torch.bfloat16:
            return None, "eager PyTorch"
        problem = fused_decode_problem(model, self.cache)
        if problem is not None:
            return None, f"eager PyTorch (fused C++ step unavailable: {problem})"
        return FusedDecoder(model, self.cache), f"fused C++ step (kernels/cpu_decode.py) up to {MAX_FUSED_ROWS} rows"

    @property
    def free_slots(self) -> int:
        """How many more requests the engine wants now."""
        return self.max_batch - len(self.running) - len(self.waiting)

    @property
    def stats(self) -> EngineStats:
        return EngineStats(self.preemptions, self.blocks.num_blocks, self.blocks.block_size,
                           self._decode_steps, self._decode_tokens, self._decode_context)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request_id: int, prompt_ids, params: SamplingParams) -> None:
        prompt = checked_prompt(request_id, prompt_ids, params, self.max_seq_len)
        self.waiting.append(Sequence(request_id, prompt, params))

    def abort(self, request_id: int) -> int | None:
        """End a request that has not finished (its client went away): it leaves the
        queues and its blocks are freed. The number of blocks freed, or None when
        no such request is unfinished."""
        for seq in [*self.running, *self.waiting]:
            if seq.request_id == request_id:
                (self.running if seq in self.running else self.waiting).remove(seq)
                freed = len(seq.block_table)
                self.blocks.free(seq.block_table)
                return freed
        return None

    def generate(self, prompt_ids, params: SamplingParams) -> list[int]:
        """Greedy tokens for one prompt (the engine must be idle)."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine")
        self.add_request(0, prompt_ids, params)
        out = []
        while self.has_unfinished():
            out.extend(ev.token_id for ev in self.step())
        return out

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        decoding = self._reserve_decodes()
        chunks = self._schedule_prefill(self.max_tokens_per_step - len(decoding))
        if chunks:
            self._prefill(chunks, events)
        if decoding:
            self._decode(decoding, events)
        return events

    def _reserve_decodes(self) -> list[Sequence]:
        """Running sequences that decode this step, each with room for its new token."""
        decoding = [s for s in self.running if s.decoding]
        for seq in list(decoding):
            if seq not in self.running:
                continue
            while not self.blocks.can_grow(seq.block_table, seq.length):
                victim = self.running[-1]
                self._preempt(victim)
                if victim in decoding:
                    decoding.remove(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.block_table, seq.length)
        return decoding

    def _schedule_prefill(self, budget: int) -> list[tuple[Sequence, int]]:
        """(sequence, tokens) chunks: unfinished prefills first, then new admissions.

        The chunks run as one padded batch, every row as wide as the widest, so the
        budget bounds rows x width rather than the chunks' sum: one 1000-token prompt
        beside 31 short ones would otherwise compute 32 rows of 1000 positions, and
        attention over the padded span grows with its square (MMLU's prompts run from
        ~100 to ~1100 tokens; an Offline run over them slowed ~10x as long prompts
        came up). A row that would widen the batch past the budget is cut to fit or waits."""
        chunks, width = [], 0
        candidates = [s for s in self.running if not s.decoding]
        for seq in candidates + list(self.waiting):
            room = budget // (len(chunks) + 1)  # the widest any row may be with this one added
            if room < max(width, 1):
                break
            admitting = seq not in self.running
            if admitting and len(self.running) >= self.max_batch:
                break
            n = min(seq.length - seq.num_cached, room)
            if not self.blocks.can_grow(seq.block_table, seq.num_cached + n):
                break
            self.blocks.grow(seq.block_table, seq.num_cached + n)
            if admitting:
                self.waiting.remove(seq)
                self.running.append(seq)
            chunks.append((seq, n))
            width = max(width, n)
        return chunks

    def _prefill(self, chunks, events: list) -> None:
        width = max(n for _, n in chunks)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        positions = torch.zeros(len(chunks), width, dtype=torch.long)
        valid = torch.zeros(len(chunks), width, dtype=torch.bool)
        for row, (seq, n) in enumerate(chunks):
            start = seq.num_cached
            ids[row, :n] = torch.tensor([seq.token(i) for i in range(start, start + n)])
            # Padding continues the positions (masked, never written).
            positions[row] = torch.arange(start, start + width)
            valid[row, :n] = True
        last = torch.tensor([[n - 1] for _, n in chunks])
        self.cache.bind([s.block_table for s, _ in chunks], positions, valid)
        logits = self.model(ids.to(self.device), positions.to(self.device), self.cache,
                            logits_at=last.to(self.device))
        done = []
        for row, (seq, n) in enumerate(chunks):
            seq.num_cached += n
            if seq.num_cached == seq.length:
                done.append(row)
        if done:
            self._sample([chunks[r][0] for r in done], logits[done, -1], events)

    def _decode(self, seqs: list[Sequence], events: list) -> None:
        if self._fused is not None and len(seqs) <= MAX_FUSED_ROWS:
            logits = self._fused([s.output_ids[-1] for s in seqs], [s.length - 1 for s in seqs],
                                 [s.block_table for s in seqs])
        else:
            ids = torch.tensor([[s.output_ids[-1]] for s in seqs])
            positions = torch.tensor([[s.length - 1] for s in seqs])
            self.cache.bind([s.block_table for s in seqs], positions, torch.ones_like(positions, dtype=torch.bool))
            logits = self.model(ids.to(self.device), positions.to(self.device), self.cache)[:, -1]
        for s in seqs:
            s.num_cached += 1
        self._decode_steps += 1
        self._decode_tokens += len(seqs)
        self._decode_context += sum(s.length for s in seqs)
        self._sample(seqs, logits, events)

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
                self.running.remove(seq)
                self.blocks.free(seq.block_table)

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks; it waits first in line and is recomputed."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1
