"""Paged split-KV decode attention vs its gather-then-softmax reference, and the
reference vs torch's scaled_dot_product_attention on the same keys laid out flat."""
import math

import pytest
import torch

from wallperf.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

pytestmark = pytest.mark.triton

# Under the interpreter, bf16 tiles go through tl.dot as fp32 (Triton 3.9's interpreter
# returns garbage for a bf16 dot; see test_interpreter_gaps.py): the bf16 cases check
# loads, masks and indexing, not the bf16 dot itself, which only a GPU run checks.
# bf16: probabilities are rounded to bf16 before the P @ V dot (as flash attention does)
# and the interpreter truncates the final cast.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _paged_inputs(seq_lens, H, H_kv, D, block_size, dtype, device, spare_blocks=3):
    """Caches with more blocks than needed and each sequence's blocks scattered at random
    (so a wrong block lookup reads someone else's keys), one spare table column."""
    B = len(seq_lens)
    max_blocks = max(math.ceil(n / block_size) for n in seq_lens) + 1
    num_blocks = B * max_blocks + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, H_kv, D, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, H_kv, D, device=device).to(dtype)
    block_tables = torch.randperm(num_blocks, device=device)[: B * max_blocks]
    block_tables = block_tables.reshape(B, max_blocks).to(torch.int32)
    q = torch.randn(B, H, D, device=device).to(dtype)
    return q, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32, device=device)


# Ragged lengths: a 1-token sequence, one exactly a block, one spanning many blocks and
# several partitions with a length that is no multiple of the block size.
SEQ_LENS = [1, 16, 77, 33]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("H, H_kv", [(4, 4), (8, 2), (9, 3), (4, 1)])  # GQA ratios 1, 4, 3, 4
def test_matches_reference(H, H_kv, dtype, device):
    inputs = _paged_inputs(SEQ_LENS, H, H_kv, 32, 16, dtype, device)
    # partition 32 splits the 77-token sequence into 3 partitions, exercising the reduce.
    out = paged_decode_attention(*inputs, partition_size=32)
    torch.testing.assert_close(out, paged_decode_attention_ref(*inputs), **TOL[dtype])


@pytest.mark.parametrize("partition_size", [16, 64, 512])
def test_partition_size_does_not_change_the_result(partition_size, device):
    inputs = _paged_inputs([1, 33, 130], 4, 2, 64, 16, torch.float32, device)
    out = paged_decode_attention(*inputs, partition_size=partition_size)
    torch.testing.assert_close(out, paged_decode_attention_ref(*inputs), **TOL[torch.float32])


def test_odd_block_and_head_sizes(device):
    # block_size 5 puts block boundaries inside every key tile; D 48 pads to a 64 tile.
    inputs = _paged_inputs([1, 33, 52], 6, 2, 48, 5, torch.float32, device)
    out = paged_decode_attention(*inputs, partition_size=16, scale=0.3)
    torch.testing.assert_close(out, paged_decode_attention_ref(*inputs, scale=0.3), **TOL[torch.float32])


def test_rejects_bad_inputs(device):
    q, k_cache, v_cache, block_tables, seq_lens = _paged_inputs([3], 4, 2, 16, 4, torch.float32, device)
    with pytest.raises(ValueError):  # H not a multiple of H_kv
        paged_decode_attention(q[:, :3], k_cache, v_cache, block_tables, seq_lens)
    with pytest.raises(TypeError):
        paged_decode_attention(q, k_cache, v_cache, block_tables.long(), seq_lens)
    with pytest.raises(ValueError):
        paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, partition_size=24)


def test_reference_matches_sdpa_on_flat_keys():
    seq_lens, H, H_kv, D, block_size = [1, 33, 20], 6, 2, 16, 8
    q, k_cache, v_cache, block_tables, lens = _paged_inputs(seq_lens, H, H_kv, D, block_size,
                                                            torch.float32, "cpu")
    out = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens)
    for b, n in enumerate(seq_lens):
        # Token t of sequence b, read through the block table the slow way.
        where = [(block_tables[b, t // block_size], t % block_size) for t in range(n)]
        keys = torch.stack([k_cache[blk, slot] for blk, slot in where])  # (n, H_kv, D)
        values = torch.stack([v_cache[blk, slot] for blk, slot in where])
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[b][:, None, :], keys.transpose(0, 1), values.transpose(0, 1), enable_gqa=True,
        )  # (H, 1, D) over (H_kv, n, D)
        torch.testing.assert_close(out[b], expected[:, 0], atol=1e-5, rtol=1e-5)
