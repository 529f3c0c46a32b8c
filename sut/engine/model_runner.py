"""The model runner: the forward passes the engine asks for, against its paged
KV cache.

- `prefill`: chunks of prompts, logits at each chunk's last token: their tokens as
  rows of the fused C++ step where it runs, else padded into one eager batch;
- `decode`: one token per row at its position, the one-token decode step (the
  fused C++ step of kernels/cpu_decode.py where it runs, else eager PyTorch);
- `verify`: a sequence's last token and its k drafted tokens at consecutive
  positions, as k + 1 rows of that same decode step.

Speculative decoding is exact only if each verified position is computed with
the arithmetic of the one-token step that greedy decoding would have run there.
The decode step takes rows at any positions and, per layer, writes every row's
key and value before any row attends over positions 0..its own: so rows of one
sequence at consecutive positions see the keys of the rows before them in the
same call, as they would have seen them from earlier steps. What remains is
whether a row's arithmetic depends on what else shares the call. The fused
step's does not (each GEMM output is one fp32 lane accumulated over K in a fixed
order; attention is per row and head, over the row's own positions). The eager
path's attention does (PyTorch's CPU SDPA sums a batch, and keys masked past a
row's context, in other orders), so verification attends each row alone
(`row_spans`). Its GEMMs may too: the BLAS picks another kernel for 1 row than
for 8 (MKL's fp32 sgemm does). So `rows_independent` is probed once on the
model's own weights, and where it fails the runner verifies by replay: k + 1
one-token steps, exact but reading the weights k + 1 times, which forfeits the
speedup and is reported as such.
"""
from __future__ import annotations

import torch

from wallperf.kernels import dispatch
from wallperf.kernels.cpu_decode import MAX_FUSED_ROWS, FusedDecoder, fused_decode_problem

# Row counts the eager probe compares against one row: every verify width up to 8
# drafted tokens, and a decode batch's.
_PROBE_ROWS = (2, 3, 4, 5, 6, 7, 8, 9, 16)
# Prompt tokens per call of the fused step in a prefill (each call reads the weights once).
PREFILL_ROWS = 128


class ModelRunner:
    def __init__(self, model, cache, device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self.dtype = model.embed_tokens.weight.dtype
        self.fused, self.decode_path = self._fused_decoder()
        self._rows_independent = None

    def _fused_decoder(self):
        """The one-call C++ decode step where it runs (bf16 on the CPU), and a
        sentence saying which decode path this runner takes and why."""
        if self.device.type != "cpu" or self.dtype != torch.bfloat16:
            return None, "eager PyTorch"
        problem = fused_decode_problem(self.model, self.cache)
        if problem is not None:
            return None, f"eager PyTorch (fused C++ step unavailable: {problem})"
        return FusedDecoder(self.model, self.cache), f"fused C++ step (kernels/cpu_decode.py) up to {MAX_FUSED_ROWS} rows"

    @torch.inference_mode()
    def prefill(self, rows: list[tuple[list[int], int, list[int]]], rows_per_call: int = PREFILL_ROWS) -> torch.Tensor:
        """rows: (tokens, start, block_table), tokens fed from position start on.
        Returns float32 logits (rows, vocab) at each row's last. Where the fused step
        runs, every token is a row of it, `rows_per_call` a call (_prefill_fused); else
        the rows are padded into one batch of the eager model."""
        if self.fused is not None:
            return self._prefill_fused(rows, rows_per_call)
        width = max(len(tokens) for tokens, _, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for row, (tokens, start, _) in enumerate(rows):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            # Padding continues the positions (masked, never written).
            positions[row] = torch.arange(start, start + width)
            valid[row, :len(tokens)] = True
        last = torch.tensor([[len(tokens) - 1] for tokens, _, _ in rows])
        self.cache.bind([table for _, _, table in rows], positions, valid)
        logits = self.model(ids.to(self.device), positions.to(self.device), self.cache,
                            logits_at=last.to(self.device))
        return logits[:, -1]

    def _prefill_fused(self, rows, rows_per_call: int) -> torch.Tensor:
        """The prompts' tokens as rows of the fused step, `rows_per_call` a call, the head
        computed for each prompt's last token only. Each row writes its key and value
        before any row attends, so a call's rows see the ones before them and a later
        call's see the earlier calls'. No padding, and no eager op between the GEMMs:
        a 121-token MMLU prompt took 200 ms through the eager model on a 2-core AVX2 VM,
        of which the GEMMs 174 ms. A row's arithmetic is the decode step's, so a prompt's
        keys and values are the bits that decoding its tokens one by one would write."""
        flat, lasts = [], []
        for tokens, start, table in rows:
            flat += [(t, start + j, table) for j, t in enumerate(tokens)]
            lasts.append(len(flat) - 1)
        out = []
        for c0 in range(0, len(flat), rows_per_call):
            part = flat[c0:c0 + rows_per_call]
            wanted = [i - c0 for i in lasts if c0 <= i < c0 + len(part)]
            logits = self.fused([f[0] for f in part], [f[1] for f in part], [f[2] for f in part],
                                logits_rows=wanted)
            if wanted:
                out.append(logits)
        return torch.cat(out)

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]],
               row_spans: bool = False) -> torch.Tensor:
        """The one-token decode step: float32 logits (rows, vocab), each row's key and
        value written at its position first. `row_spans`: the eager path attends each
        row on its own (PagedKVCache.bind), for verification."""
        if self.fused is not None and len(token_ids) <= MAX_FUSED_ROWS:
            return self.fused(token_ids, positions, block_tables)
        ids = torch.tensor([[t] for t in token_ids])
        pos = torch.tensor([[p] for p in positions])
        self.cache.bind(block_tables, pos, torch.ones_like(pos, dtype=torch.bool), row_spans=row_spans)
        return self.model(ids.to(self.device), pos.to(self.device), self.cache)[:, -1]

    @property
    def rows_independent(self) -> bool:
        """Whether a decode row's logits are the same bits whatever rows share its call."""
        if self._rows_independent is None:
            self._rows_independent = self.fused is not None or self._probe_eager()
        return self._rows_independent

    @property
    def verify_path(self) -> str:
        if self.rows_independent:
            return "one call of the decode step per verify (rows independent of the batch)"
        return ("replay: one decode step per drafted position (this device's eager GEMMs change "
                "with the row count, so a shared call would not be bit-exact)")

    @torch.inference_mode()
    def _probe_eager(self) -> bool:
        """The eager step's only row-count-dependent arithmetic is the GEMM (RMSNorm,
        RoPE, SwiGLU and residuals are elementwise per row; attention is per row):
        compare each of one block's projections and the head at 1 row and at many."""
        gen = torch.Generator().manual_seed(0)
        layer = self.model.layers[0]
        head = self.model.embed_tokens.weight if self.model.lm_head is None else self.model.lm_head.weight
        for w in (layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight,
                  layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight, head):
            for m in _PROBE_ROWS:
                x = torch.randn(m, w.shape[1], generator=gen).to(w.dtype).to(w.device)
                many = dispatch.linear(x, w)
                if any(not torch.equal(many[i:i + 1], dispatch.linear(x[i:i + 1], w)) for i in range(m)):
                    return False
        return True

    @torch.inference_mode()
    def verify(self, rows: list[tuple[list[int], int, list[int]]], keep_going=None) -> list[torch.Tensor]:
        """rows: per sequence (tokens, start, block_table): its uncached last token and
        drafted tokens, fed at positions start, start + 1, ... Returns per sequence the
        float32 logits (len(tokens), vocab) after each of them, or (replay) after as
        many as `keep_going(sequence index, logits so far)` wanted: a rejected draft
        ends its sequence's replay."""
        if self.rows_independent:
            flat = [(t, start + j, table) for tokens, start, table in rows for j, t in enumerate(tokens)]
            # Calls of at most MAX_FUSED_ROWS rows: a later call's rows find the keys an
            # earlier call wrote, and each row's arithmetic is the one-row step's.
            out = []
            for i in range(0, len(flat), MAX_FUSED_ROWS):
                part = flat[i:i + MAX_FUSED_ROWS]
                out.append(self.decode([t for t, _, _ in part], [p for _, p, _ in part], [b for _, _, b in part],
                                       row_spans=True))
            logits, per_seq, at = torch.cat(out), [], 0
            for tokens, _, _ in rows:
                per_seq.append(logits[at:at + len(tokens)])
                at += len(tokens)
            return per_seq
        width = max(len(tokens) for tokens, _, _ in rows)
        got = [[] for _ in rows]
        for j in range(width):
            live = [i for i, (tokens, _, _) in enumerate(rows)
                    if j < len(tokens) and (j == 0 or keep_going is None or keep_going(i, got[i]))]
            if not live:
                break
            logits = self.decode([rows[i][0][j] for i in live], [rows[i][1] + j for i in live],
                                 [rows[i][2] for i in live], row_spans=True)
            for r, i in enumerate(live):
                got[i].append(logits[r])
        return [torch.stack(g) for g in got]
