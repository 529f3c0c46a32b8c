"""Fused mixture-of-experts MLP (Mixtral): each token through its top-k experts' SwiGLU
MLPs, outputs summed with the router's weights.

    x            (T, hidden)         tokens
    topk_ids     (T, k) int          experts chosen per token (the caller routes)
    topk_weights (T, k) fp32         their weights (Mixtral: softmax over the top-k)
    w13          (E, 2F, hidden)     gate (rows :F) and up (rows F:) projections, stacked
    w2           (E, hidden, F)      down projection
    out          (T, hidden)         sum_j topk_weights[t, j] * expert_{ids[t, j]}(x[t])

The (token, slot) pairs, T*k of them, are sorted by expert and each expert's run padded
to a multiple of BLOCK_M (`moe_align_block_size`), so every BLOCK_M-row tile of the
sorted list belongs to one expert. One grouped-GEMM kernel then computes all experts at
once: a program takes one tile, reads that expert's weights, and gathers its token rows
by index, so no per-expert launch and no copy of the tokens into expert order. It runs
twice: x @ w13[e].T into (T*k, 2F), then SwiGLU, then act @ w2[e].T into (T*k, hidden)
scaled by each pair's router weight; the k rows of each token are summed last. An
expert that receives no tokens gets no tiles and costs nothing.
"""
import torch

from wallperf.kernels._triton import require_triton, tl, triton, upcast_dot
from wallperf.kernels.swiglu import swiglu

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_moe_ref(x, w13, w2, topk_weights, topk_ids):
    """PyTorch reference and CPU path: a loop over experts, in fp32. Shapes as in the
    module docstring; returns (T, hidden) in x's dtype."""
    F = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)  # pairs routed to e
        if token.numel() == 0:
            continue
        gate_up = x[token].float() @ w13[e].float().T  # (n, 2F)
        act = torch.nn.functional.silu(gate_up[:, :F]) * gate_up[:, F:]  # (n, F)
        y = act @ w2[e].float().T  # (n, hidden)
        out.index_add_(0, token, y * topk_weights[token, slot].float()[:, None])
    return out.to(x.dtype)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sorts the T*k (token, slot) pairs by expert, padding each expert's run to a
    multiple of block_m. Runs on the ids' device without a host sync.

    Returns
      sorted_ids  (max_padded,) int32: pair index t*k + j in expert order; padding slots
                  hold T*k, which no pair has
      expert_ids  (max_padded // block_m,) int32: the expert of each block_m tile, -1
                  for tiles past the end
      num_padded  (1,) int32: the padded total, the end of the meaningful tiles
    max_padded = T*k + num_experts*(block_m - 1) rounded up to block_m, a bound on the
    padded total that needs no look at the counts.
    """
    flat = topk_ids.reshape(-1)  # (T*k,) pair p is token p // k, slot p % k
    num_pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
    padded = (counts + block_m - 1) // block_m * block_m  # (E,)
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    count_start = counts.cumsum(0) - counts

    experts_sorted, order = torch.sort(flat.long(), stable=True)  # (T*k,) each
    rank = torch.arange(num_pairs, device=device) - count_start[experts_sorted]
    max_padded = (num_pairs + num_experts * (block_m - 1) + block_m - 1) // block_m * block_m
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[padded_start[experts_sorted] + rank] = order.to(torch.int32)

    tile_start = torch.arange(0, max_padded, block_m, device=device)
    expert_ids = torch.searchsorted(padded_end, tile_start, right=True)  # first run ending past it
    expert_ids = torch.where(tile_start < padded_end[-1], expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, padded_end[-1:].to(torch.int32)


@triton.jit
def _moe_grouped_gemm_kernel(
    a_ptr, w_ptr, c_ptr, topk_weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    N, K, num_pairs,
    stride_am, stride_we, stride_wn, stride_cm,
    A_ROWS_PER_TOKEN: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Grid (tiles of sorted pairs, cdiv(N, BLOCK_N)). c row p = pair p; a row = the pair's
    # token (p // k) for the first GEMM, the pair itself (A_ROWS_PER_TOKEN=1) for the second.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # (BLOCK_M,)
    pair_mask = pairs < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + (pairs // A_ROWS_PER_TOKEN).to(tl.int64)[:, None] * stride_am
    w_cols = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_rows + k[None, :], mask=pair_mask[:, None] & (k[None, :] < K),
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_cols + k[:, None], mask=(k[:, None] < K) & (offs_n[None, :] < N),
                    other=0.0)  # (BLOCK_K, BLOCK_N): the expert's (N, K) weight, transposed
        if UPCAST_DOT:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc)

    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + pairs, mask=pair_mask, other=0.0)[:, None]
    c = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=pair_mask[:, None] & (offs_n[None, :] < N))


def _grouped_gemm(a, w, c, topk_weights, sorted_ids, expert_ids, num_padded,
                  rows_per_token, mul_routed_weight, block_m):
    """c[p] = a[p // rows_per_token] @ w[expert of p].T for every sorted pair p."""
    N, K = w.shape[1], w.shape[2]
    block_n, block_k = 64, 64
    grid = (expert_ids.numel(), triton.cdiv(N, block_n))
    _moe_grouped_gemm_kernel[grid](
        a, w, c, topk_weights, sorted_ids, expert_ids, num_padded,
        N, K, c.shape[0],
        a.stride(0), w.stride(0), w.stride(1), c.stride(0),
        A_ROWS_PER_TOKEN=rows_per_token, MUL_ROUTED_WEIGHT=mul_routed_weight,
        UPCAST_DOT=upcast_dot(a.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )


def fused_moe(x, w13, w2, topk_weights, topk_ids, block_m: int = 16):
    """Triton launcher. Shapes as in the module docstring, all contiguous; x, w13, w2
    fp32/fp16/bf16 alike; topk_ids int32/int64 in [0, E). Returns (T, hidden) in x's dtype.
    block_m (a power of two >= 16) is the tile of sorted pairs: small suits decode, where
    each expert sees few tokens and padding to a big tile would be wasted work."""
    require_triton()
    if x.dim() != 2 or w13.dim() != 3 or w13.shape[2] != x.shape[1] or w13.shape[1] % 2:
        raise ValueError(f"fused_moe: x (T, hidden) and w13 (E, 2F, hidden), got "
                         f"{tuple(x.shape)} and {tuple(w13.shape)}")
    T, hidden = x.shape
    E, F = w13.shape[0], w13.shape[1] // 2
    if w2.shape != (E, hidden, F):
        raise ValueError(f"fused_moe: w2 must be (E, hidden, F)={(E, hidden, F)}, got {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"fused_moe: topk_ids and topk_weights (T, k) with T={T}, got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if x.dtype not in _DTYPES or w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise TypeError(f"fused_moe: x, w13, w2 fp32/fp16/bf16 alike, got {x.dtype}, "
                        f"{w13.dtype}, {w2.dtype}")
    if topk_ids.dtype not in (torch.int32, torch.int64) or topk_weights.dtype != torch.float32:
        raise TypeError(f"fused_moe: topk_ids int32/int64 and topk_weights fp32, got "
                        f"{topk_ids.dtype}, {topk_weights.dtype}")
    if not all(t.is_contiguous() for t in (x, w13, w2, topk_weights, topk_ids)):
        raise ValueError("fused_moe: all inputs must be contiguous")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"fused_moe: block_m must be a power of two >= 16, got {block_m}")

    num_pairs = topk_ids.numel()
    if num_pairs == 0:
        return torch.zeros_like(x)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, E, block_m)
    weights = topk_weights.reshape(-1)  # (T*k,) indexed by pair

    gate_up = torch.empty((num_pairs, 2 * F), dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, weights, sorted_ids, expert_ids, num_padded,
                  rows_per_token=topk_ids.shape[1], mul_routed_weight=False, block_m=block_m)
    act = swiglu(gate_up)  # (T*k, F)
    # fp32 so that the k weighted expert outputs of a token are summed before rounding.
    down = torch.empty((num_pairs, hidden), dtype=torch.float32, device=x.device)
    _grouped_gemm(act, w2, down, weights, sorted_ids, expert_ids, num_padded,
                  rows_per_token=1, mul_routed_weight=True, block_m=block_m)
    return down.view(T, -1, hidden).sum(dim=1).to(x.dtype)  # (T, k, hidden) -> (T, hidden)
