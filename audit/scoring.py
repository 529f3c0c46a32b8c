"""Log-likelihoods of answer continuations by packed prefill: many questions per forward pass.

Scoring multiple choice needs no decoding: one prefill of each question's
context and its four answers gives every log-probability. Questions are
packed into rows of up to `row_tokens` tokens with no padding between them,
and rows of similar length run together, up to `max_tokens` tokens per
forward pass: each pass multiplies the weights with hundreds of tokens at once
(on a CPU a GEMM with a few hundred rows runs near its peak; one question of
~100 tokens does not), while attention, which runs over a whole row, stays
over short rows. Within a row each question is a small tree:

    [context][answer 1][answer 2][answer 3][answer 4]  [next question's context] ...

Context tokens attend causally within their question; an answer's tokens
attend to their question's context and to their own earlier tokens, never to
another answer or another question, and take positions that continue the
context's (each answer is scored as if it alone followed the context). The
context is thus run once for its four answers. An answer's last token needs
no forward pass: only the tokens before it predict something. Letters (" A")
are one token each, so the letter format runs contexts only.

Logits are computed only where an answer token is predicted, not at every
position (the LM head of a 150k vocabulary would otherwise cost as much as
the rest of the model).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from wallperf.sut.quant.kv_calibration import key_centres
from wallperf.sut.quant.fp8 import dequantize, quantize_kv_vectors

DEFAULT_MAX_TOKENS = 1024
DEFAULT_ROW_TOKENS = 256


def encode_request(tokenizer, context: str, continuations) -> tuple[list, list]:
    """Token ids of the context and of each continuation as it tokenizes after it.

    As lm-eval does: the continuation's tokens are those of context+continuation
    past the context's tokens, so the answer is scored as the model would read it.
    """
    ctx = tokenizer.encode(context, add_special_tokens=True)
    plain_len = len(tokenizer.encode(context))
    conts = []
    for text in continuations:
        ids = tokenizer.encode(context + text)[plain_len:]
        if not ids:
            raise ValueError(f"continuation {text!r} adds no tokens after the context")
        conts.append(ids)
    return ctx, conts


def packed_length(request) -> int:
    ctx, conts = request
    return len(ctx) + sum(len(c) - 1 for c in conts)


def pack(lengths, max_tokens: int) -> list[list[int]]:
    """Indices grouped into rows of at most `max_tokens` tokens (a longer item gets a row
    of its own): longest first, each into the first row it fits (first-fit decreasing)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_tokens - lengths[i])
    return rows


class PackedAttention:
    """The model's attention 'cache' for one packed prefill: it stores nothing and
    masks each question's tree (see the module docstring). With an fp8 `kv_dtype`,
    keys and values go through what an fp8 KV cache does to them (sut.paged_cache:
    keys less their calibrated centres `k_centre`, (n_layers, H_kv, D), then e4m3
    with one scale per token and KV head, dequantized as read) before attention."""

    def __init__(self, mask: torch.Tensor, kv_dtype: torch.dtype | None = None,
                 k_centre: torch.Tensor | None = None):
        self.mask = mask  # (B, 1, T, T)
        self.kv_dtype, self.k_centre = kv_dtype, k_centre

    def attention_mask(self, positions):
        return self.mask

    def layer(self, i: int) -> "_PackedLayer":
        return _PackedLayer(self, i)


class _PackedLayer:
    __slots__ = ("packed", "i")

    def __init__(self, packed: PackedAttention, i: int):
        self.packed, self.i = packed, i

    def attend(self, q, k, v, mask):
        """q (B, H, T, D), k and v (B, H_kv, T, D) -> (B, H, T, D)."""
        fp8, centres = self.packed.kv_dtype, self.packed.k_centre
        if fp8 is not None:
            # The cache's (N, H_kv, D) layout, so that a centre (H_kv, D) lines up.
            centre = None if centres is None else centres[self.i]
            k = dequantize(*quantize_kv_vectors(k.transpose(1, 2), fp8, centre), k.dtype).transpose(1, 2)
            v = dequantize(*quantize_kv_vectors(v, fp8), v.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _layout(requests, width: int):
    """One row of `width` tokens: token ids, positions, question and branch of every token
    (padding: a question of its own per token), and for each request and answer the
    (index in the row, target id) pairs whose log-probabilities sum to its log-likelihood."""
    ids, positions, question, branch, targets = [], [], [], [], []
    for r, (ctx, conts) in enumerate(requests):
        offset, n = len(ids), len(ctx)
        ids += ctx
        positions += range(n)
        question += [r] * n
        branch += [0] * n
        answers = []
        for b, cont in enumerate(conts, 1):
            start = len(ids)
            ids += cont[:-1]
            positions += range(n, n + len(cont) - 1)
            question += [r] * (len(cont) - 1)
            branch += [b] * (len(cont) - 1)
            # cont[0] is predicted by the context's last token, cont[k] by cont[k-1].
            answers.append([(offset + n - 1, cont[0])] + [(start + k - 1, cont[k]) for k in range(1, len(cont))])
        targets.append(answers)
    pad = width - len(ids)
    return (ids + [0] * pad, positions + [0] * pad, question + list(range(-1, -pad - 1, -1)), branch + [0] * pad,
            targets)


@torch.inference_mode()
def loglikelihoods(model, rows, kv_dtype: torch.dtype | None = None) -> list[list[tuple]]:
    """Sum of log-probabilities of each continuation after its context, for rows of requests
    (context ids, [continuation ids, ...]), all rows in one forward pass of `model` (a
    sut.models.llama.LlamaModel or one of its family); per row, per request, per answer.
    `kv_dtype`: an fp8 KV cache's format to emulate (PackedAttention)."""
    width = max(sum(map(packed_length, row)) for row in rows)
    ids, positions, question, branch, targets = zip(*(_layout(row, width) for row in rows))
    device = model.embed_tokens.weight.device
    q = torch.tensor(question, device=device)  # (B, T)
    b = torch.tensor(branch, device=device)
    order = torch.arange(width, device=device)
    mask = ((q[:, :, None] == q[:, None, :]) & (order[None, :] <= order[:, None])
            & ((b[:, None, :] == 0) | (b[:, None, :] == b[:, :, None])))  # (B, T, T): query, key
    wanted = [sorted({i for answers in row for pairs in answers for i, _ in pairs}) for row in targets]
    at = torch.tensor([w + [w[-1]] * (max(map(len, wanted)) - len(w)) for w in wanted], device=device)
    centres = None if kv_dtype is None else key_centres(model)
    logits = model(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                   PackedAttention(mask[:, None], kv_dtype, centres), logits_at=at)  # (B, P, V)
    norm = torch.logsumexp(logits, dim=-1)  # (B, P)
    index = [{i: k for k, i in enumerate(w)} for w in wanted]
    flat = [(r, index[r][i], t) for r, row in enumerate(targets) for answers in row for pairs in answers
            for i, t in pairs]
    rr, pp, tt = (torch.tensor(col, device=device) for col in zip(*flat))
    logp = iter((logits[rr, pp, tt].double() - norm[rr, pp].double()).tolist())
    return [[tuple(sum(next(logp) for _ in pairs) for pairs in answers) for answers in row] for row in targets]


def score_requests(model, requests, max_tokens: int = DEFAULT_MAX_TOKENS,
                   row_tokens: int = DEFAULT_ROW_TOKENS, kv_dtype: torch.dtype | None = None) -> list[tuple]:
    """loglikelihoods() of every request, in the order given: packed into rows of `row_tokens`,
    rows of similar length run together up to `max_tokens` tokens per forward pass."""
    out = [None] * len(requests)
    rows = pack([packed_length(r) for r in requests], row_tokens)
    length = {id(row): sum(packed_length(requests[i]) for i in row) for row in rows}
    rows.sort(key=lambda row: -length[id(row)])
    start = 0
    while start < len(rows):
        count = max(1, max_tokens // length[id(rows[start])])
        group = rows[start: start + count]
        start += len(group)
        for row, scores in zip(group, loglikelihoods(model, [[requests[i] for i in row] for row in group], kv_dtype)):
            for i, lls in zip(row, scores):
                out[i] = lls
    return out
