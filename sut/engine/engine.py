"""The native engine: continuous batching over a paged KV cache, greedy decoding,
optionally speculative.

The engine knows nothing of LoadGen. Callers add requests (prompt token ids and
SamplingParams) and call `step()`, which returns the tokens produced as
TokenEvents. The parts, as vLLM and nano-vllm divide them: sequences
(sut.engine.sequence), the scheduler (sut.engine.scheduler: what runs each step
within the token budget and the KV pool, and preemption), the model runner
(sut.engine.model_runner: prefill, the decode step and the verify step), and
under speculative decoding a drafter with the acceptance rule
(sut.engine.speculative). This file ties them into a step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from wallperf.sut.engine.block_manager import BlockManager
from wallperf.sut.engine.model_runner import ModelRunner
from wallperf.sut.engine.paged_cache import FP8_KV_DTYPES, PagedKVCache, available_memory_bytes, kv_bytes_per_token, pool_blocks
from wallperf.sut.engine.scheduler import Scheduler
from wallperf.sut.engine.sequence import SamplingParams, Sequence, TokenEvent, checked_prompt
from wallperf.sut.engine.speculative import Speculation, SpecStats, accepted_prefix
from wallperf.sut.quant.kv_calibration import key_centres

__all__ = ["Engine", "EngineStats", "SamplingParams", "Sequence", "TokenEvent", "checked_prompt", "Speculation"]


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
                 kv_memory_fraction: float = 0.3, device="cpu", kv_dtype: torch.dtype | None = None,
                 speculation: Speculation | None = None):
        """`kv_dtype`: how the KV cache stores keys and values (default: the model's
        dtype; torch.float8_e4m3fn or float8_e4m3fnuz for an fp8 cache with scales).
        `speculation`: a drafter and its k (sut.engine.speculative); None decodes one
        token per step."""
        cfg = model.cfg
        if max_seq_len > cfg.max_position:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context {cfg.max_position}")
        self.model, self.device = model, torch.device(device)
        self.eos_token_ids = torch.tensor(sorted(eos_token_ids), dtype=torch.long)
        self._eos_set = frozenset(eos_token_ids)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        dtype = model.embed_tokens.weight.dtype
        # Drafted tokens need cache slots past the sequence's end while they are verified.
        lookahead = speculation.k if speculation else 0
        if num_blocks is None:
            per_block = block_size * kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, kv_dtype or dtype)
            needed = max_batch * -(-(max_seq_len + lookahead) // block_size)
            num_blocks = pool_blocks(per_block, available_memory_bytes(self.device), kv_memory_fraction, needed)
        if num_blocks * block_size < max_seq_len + lookahead:
            raise ValueError(f"a KV pool of {num_blocks} blocks of {block_size} cannot hold one sequence "
                             f"of max_seq_len {max_seq_len}" + (f" and {lookahead} drafted tokens" if lookahead else ""))
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_batch, max_tokens_per_step)
        # An fp8 cache stores keys less their calibrated centres (sut.kv_calibration).
        centres = key_centres(model) if kv_dtype in FP8_KV_DTYPES else None
        self.cache = PagedKVCache(cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim,
                                  dtype, self.device, kv_dtype, centres)
        self.runner = ModelRunner(model, self.cache, self.device)
        self.decode_path = self.runner.decode_path
        self.speculation = self.spec_stats = None
        if speculation:
            self.enable_speculation(speculation)
        # Per sequence under adaptive speculation: its current k.
        self._k: dict[int, int] = {}
        # Called as on_logits(request_id, logits) with the float32 logits behind each
        # emitted token, before EOS suppression (tests compare them bit for bit).
        self.on_logits = None
        self._decode_steps = self._decode_tokens = self._decode_context = 0

    def enable_speculation(self, speculation: Speculation) -> None:
        """Speculate from now on (an idle engine; a backend built without it, as the run driver builds them)."""
        if self.has_unfinished():
            raise RuntimeError("enable_speculation() needs an idle engine")
        if self.blocks.num_blocks * self.blocks.block_size < self.max_seq_len + speculation.k:
            raise ValueError(f"a KV pool of {self.blocks.num_blocks} blocks of {self.blocks.block_size} cannot hold "
                             f"one sequence of max_seq_len {self.max_seq_len} and {speculation.k} drafted tokens")
        self.speculation, self.spec_stats = speculation, SpecStats(speculation.k)
        self.scheduler.on_release = speculation.drafter.release

    # The fused decoder is the runner's; tests swap it for a spy through here.
    @property
    def _fused(self):
        return self.runner.fused

    @_fused.setter
    def _fused(self, value):
        self.runner.fused = value

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self):
        return self.scheduler.running

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    @property
    def max_tokens_per_step(self) -> int:
        return self.scheduler.max_tokens_per_step

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
        self._k.pop(request_id, None)
        return self.scheduler.abort(request_id)

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
        decoding = self.scheduler.reserve_decodes(self._lookahead if self.speculation else lambda s: 0)
        rows = len(decoding) + (sum(self._lookahead(s) for s in decoding) if self.speculation else 0)
        chunks = self.scheduler.schedule_prefill(self.max_tokens_per_step - rows, one_row=bool(decoding))
        if chunks:
            self._prefill(chunks, events)
        if decoding:
            if self.speculation:
                self._speculate(decoding, events)
            else:
                self._decode(decoding, events)
        return events

    def _lookahead(self, seq: Sequence) -> int:
        """Drafts this sequence may have verified this step: k, less what would pass
        its max_new_tokens (the last verify row emits one token of its own) or max_seq_len."""
        k = self._k.get(seq.request_id, self.speculation.k)
        return max(0, min(k, seq.params.max_new_tokens - len(seq.output_ids) - 1, self.max_seq_len - seq.length))

    def _prefill(self, chunks, events: list) -> None:
        logits = self.runner.prefill([([seq.token(i) for i in range(seq.num_cached, seq.num_cached + n)],
                                       seq.num_cached, seq.block_table) for seq, n in chunks])
        done = []
        for row, (seq, n) in enumerate(chunks):
            seq.num_cached += n
            if seq.num_cached == seq.length:
                done.append(row)
        if done:
            self._sample([chunks[r][0] for r in done], logits[done], events)

    def _decode(self, seqs: list[Sequence], events: list) -> None:
        logits = self.runner.decode([s.output_ids[-1] for s in seqs], [s.length - 1 for s in seqs],
                                    [s.block_table for s in seqs])
        for s in seqs:
            s.num_cached += 1
        self._count_decode(seqs, len(seqs))
        self._sample(seqs, logits, events)

    def _count_decode(self, seqs, tokens: int) -> None:
        self._decode_steps += 1
        self._decode_tokens += tokens
        self._decode_context += sum(s.length for s in seqs)

    def _targets(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        """The target's greedy token after each row, EOS banned where the output
        before that row is still short of min_new_tokens (as _sample bans it)."""
        short = max(0, min(seq.params.min_new_tokens - len(seq.output_ids), logits.shape[0]))
        if short:
            logits = logits.clone()
            logits[:short, self.eos_token_ids] = float("-inf")
        return logits.argmax(dim=-1).tolist()

    def _speculate(self, seqs: list[Sequence], events: list) -> None:
        """Draft, verify every sequence's drafts in one pass, keep the confirmed prefix
        and the target's token after it."""
        spec, stats = self.speculation, self.spec_stats
        t0 = time.perf_counter()
        drafts = spec.drafter.propose(seqs, [self._lookahead(s) for s in seqs])
        t1 = time.perf_counter()
        rows = [([s.output_ids[-1]] + d, s.length - 1, s.block_table) for s, d in zip(seqs, drafts)]

        def keep_going(i, got):  # replay: continue while the last verified draft held
            return self._targets(seqs[i], torch.stack(got))[-1] == drafts[i][len(got) - 1]

        logits = self.runner.verify(rows, keep_going)
        stats.verify_seconds += time.perf_counter() - t1
        stats.draft_seconds += t1 - t0
        stats.steps += 1
        self._count_decode(seqs, sum(len(r[0]) for r in rows))
        for seq, d, lg in zip(seqs, drafts, logits):
            targets = self._targets(seq, lg)
            # Replay may stop after a rejection: n drafts confirmed need n + 1 rows.
            n = accepted_prefix(d[:len(targets) - 1], targets[:len(targets) - 1])
            start_len = seq.length
            emitted = 0
            for j in range(min(n + 1, len(targets))):
                seq.num_cached += 1
                emitted += 1
                if self._emit(seq, targets[j], lg[j], events):
                    break
            stats.record(len(d), n, emitted)
            # The drafter's cache holds the sequence's tokens and its drafts: keep what still matches.
            seq.draft_cached = min(seq.draft_cached, start_len + n)
            if spec.adaptive and d:
                k = self._k.get(seq.request_id, spec.k)
                self._k[seq.request_id] = min(spec.k, k + 1) if n == len(d) else max(1, k - 1) if n == 0 else k

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, events: list) -> None:
        """Greedy choice per row; rows still short of min_new_tokens cannot pick EOS.
        One argmax over the batch; only a row short of min_new_tokens whose argmax is
        an EOS takes its own with EOS banned (any other argmax is already the banned
        choice: argmax keeps the first of equal maxima, and that was not an EOS)."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, (seq, row) in enumerate(zip(seqs, logits)):
            tok = tokens[i]
            if tok in self._eos_set and len(seq.output_ids) < seq.params.min_new_tokens:
                tok = self._targets(seq, row.unsqueeze(0))[0]
            self._emit(seq, tok, row, events)

    def _emit(self, seq: Sequence, tok: int, logits: torch.Tensor, events: list) -> bool:
        """Append one token; True when it finishes the sequence (its blocks are freed)."""
        if self.on_logits is not None:
            self.on_logits(seq.request_id, logits)
        seq.output_ids.append(tok)
        n = len(seq.output_ids)
        done = (n >= seq.params.max_new_tokens
                or (not seq.params.ignore_eos and tok in self._eos_set)
                or seq.length >= self.max_seq_len)
        events.append(TokenEvent(seq.request_id, tok, n, done))
        if done:
            self.scheduler.finish(seq)
            self._k.pop(seq.request_id, None)
        return done
