"""Paged decode attention: one new query token per sequence against its paged KV cache.

Layout (the engine's KV cache uses it as is):
    q             (B, H, D)            the step's query, one token per sequence
    k_cache       (num_blocks, block_size, H_kv, D), v_cache alike
    block_tables  (B, max_blocks_per_seq) int32: token t of sequence b lives in block
                  block_tables[b, t // block_size] at slot t % block_size
    seq_lens      (B,) int32, each >= 1, including the token being decoded
    out           (B, H, D), q's dtype

Split-KV ("flash decoding"): at decode there is one query row per sequence, so a
program per (sequence, head) leaves most of a GPU idle on short batches with long
contexts. The context is cut into partitions of `partition_size` tokens; a program per
(sequence, kv head, partition) computes, in fp32, the partition's softmax statistics
(running max m, sum of exponentials l) and unnormalized output, and a second kernel
combines the partitions of each (sequence, head):
    out = sum_p exp(m_p - M) * acc_p / sum_p exp(m_p - M) * l_p,   M = max_p m_p
Partition counts come from block_tables' width, not from seq_lens, so launching needs
no device-to-host sync; programs past a sequence's end return at once.

GQA: the H / H_kv query heads that share a kv head are one tile of rows, so each K/V
tile is loaded once per group, not once per query head.
"""
import math

import torch

from wallperf.kernels._triton import require_triton, tl, triton, upcast_dot

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    """PyTorch reference and CPU path: gathers each sequence's blocks and runs plain
    softmax attention in fp32. Shapes as in the module docstring; returns (B, H, D)."""
    B, H, D = q.shape
    block_size, H_kv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty_like(q)
    for b in range(B):
        n = int(seq_lens[b])
        blocks = block_tables[b, : (n + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, H_kv, D)[:n].float()  # (n, H_kv, D)
        v = v_cache[blocks].reshape(-1, H_kv, D)[:n].float()
        k = k.repeat_interleave(H // H_kv, dim=1)  # (n, H, D): query head h reads kv head h // G
        v = v.repeat_interleave(H // H_kv, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale  # (H, n)
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out


@triton.jit
def _paged_decode_partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_pb, stride_ph, stride_pp,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = part * PARTITION_SIZE
    if start >= seq_len:
        return
    end = tl.minimum(start + PARTITION_SIZE, seq_len)

    # Rows: the GROUP query heads of this kv head, padded to BLOCK_G >= 16 for tl.dot.
    g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)  # token positions in the sequence
        t_mask = t < end
        block = tl.load(block_tables_ptr + seq * stride_bt + t // KV_BLOCK_SIZE,
                        mask=t_mask, other=0).to(tl.int64)
        slot = t % KV_BLOCK_SIZE
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + (block * stride_kb + slot * stride_ks + kv_head * stride_kh)[:, None]
                    + d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_cache_ptr + (block * stride_vb + slot * stride_vs + kv_head * stride_vh)[:, None]
                    + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        # Scores in log2 units (qk_scale folds in log2(e)), so exp2 replaces exp.
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_G, BLOCK_N)
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)  # rescales what was summed under the old max
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    # part_acc is part_max's (B, H, P) layout with D appended, hence `* HEAD_DIM`.
    part_off = seq * stride_pb + heads * stride_ph + part * stride_pp  # (BLOCK_G,)
    tl.store(part_max_ptr + part_off, m, mask=g_mask)
    tl.store(part_sum_ptr + part_off, l, mask=g_mask)
    tl.store(part_acc_ptr + part_off[:, None] * HEAD_DIM + d[None, :], acc,
             mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _paged_decode_reduce_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, seq_lens_ptr, out_ptr,
    stride_pb, stride_ph, stride_pp,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (sequence, query head); only partitions the sequence reaches
    # were written, the rest of the buffers hold garbage and stay masked.
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_parts = tl.cdiv(tl.load(seq_lens_ptr + seq), PARTITION_SIZE)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    p_mask = p < num_parts
    base = seq * stride_pb + head * stride_ph + p * stride_pp  # (BLOCK_P,)
    m = tl.load(part_max_ptr + base, mask=p_mask, other=float("-inf"))
    l = tl.load(part_sum_ptr + base, mask=p_mask, other=0.0)
    acc = tl.load(part_acc_ptr + base[:, None] * HEAD_DIM + d[None, :],
                  mask=p_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_P, BLOCK_D)
    weight = tl.exp2(m - tl.max(m, axis=0))  # 0 for masked partitions
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d,
             out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None,
                           partition_size: int = 512):
    """Triton launcher. Shapes as in the module docstring; q with unit stride along D,
    the caches, block_tables and seq_lens contiguous. scale defaults to 1/sqrt(D);
    partition_size must be a power of two (tokens per split-KV program)."""
    require_triton()
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_decode_attention: q (B, H, D), caches (num_blocks, "
                         f"block_size, H_kv, D) alike; got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, D = q.shape
    _, block_size, H_kv, _ = k_cache.shape
    if k_cache.shape[3] != D or H % H_kv:
        raise ValueError(f"paged_decode_attention: head dims {D} vs {k_cache.shape[3]}, "
                         f"H={H} must be a multiple of H_kv={H_kv}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"paged_decode_attention: block_tables (B, max_blocks) and seq_lens "
                         f"(B,) with B={B}; got {tuple(block_tables.shape)}, {tuple(seq_lens.shape)}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"paged_decode_attention: q and caches fp32/fp16/bf16 alike; got "
                        f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise TypeError("paged_decode_attention: block_tables and seq_lens must be int32")
    if (q.stride(2) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous()
            or not block_tables.is_contiguous() or not seq_lens.is_contiguous()):
        raise ValueError("paged_decode_attention: q needs unit stride along D; caches, "
                         "block_tables and seq_lens must be contiguous")
    if partition_size < 16 or partition_size & (partition_size - 1):
        raise ValueError(f"paged_decode_attention: partition_size must be a power of two >= 16, "
                         f"got {partition_size}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    num_parts = max(1, triton.cdiv(block_tables.shape[1] * block_size, partition_size))
    part_acc = torch.empty((B, H, num_parts, D), dtype=torch.float32, device=q.device)
    part_max = torch.empty((B, H, num_parts), dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    if B == 0:
        return out
    group = H // H_kv
    block_d = triton.next_power_of_2(max(D, 16))
    _paged_decode_partition_kernel[(B, H_kv, num_parts)](
        q, k_cache, v_cache, block_tables, seq_lens,
        part_acc, part_max, part_sum,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        part_max.stride(0), part_max.stride(1), part_max.stride(2),
        GROUP=group, HEAD_DIM=D, KV_BLOCK_SIZE=block_size, PARTITION_SIZE=partition_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=min(64, partition_size), UPCAST_DOT=upcast_dot(q.dtype),
    )
    _paged_decode_reduce_kernel[(B, H)](
        part_acc, part_max, part_sum, seq_lens, out,
        part_max.stride(0), part_max.stride(1), part_max.stride(2),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, PARTITION_SIZE=partition_size,
        BLOCK_P=triton.next_power_of_2(num_parts), BLOCK_D=block_d,
    )
    return out
