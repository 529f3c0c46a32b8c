"""Fused MoE (alignment + grouped GEMM + SwiGLU + weighted sum) vs the per-expert loop
reference, and that reference vs a per-token computation of Mixtral's MoE MLP."""
import pytest
import torch

from wallperf.kernels.moe import fused_moe, fused_moe_ref, moe_align_block_size

pytestmark = pytest.mark.triton

# Under the interpreter, bf16 tiles go through tl.dot as fp32 (Triton 3.9's interpreter
# returns garbage for a bf16 dot; see test_interpreter_gaps.py): the bf16 cases check
# loads, masks and indexing, not the bf16 dot itself, which only a GPU run checks.
# bf16: the kernel rounds gate_up and the activation to bf16 between the GEMMs (as
# HF's Mixtral does) while the reference stays in fp32; the interpreter truncates.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
E, HIDDEN, F, TOP_K = 4, 64, 48, 2
UNUSED_EXPERT = 2


def _route(T, device, unused=UNUSED_EXPERT):
    """Mixtral routing (softmax, top-k, renormalize) that never picks expert `unused`."""
    logits = torch.randn(T, E, device=device)
    logits[:, unused] = float("-inf")
    weights, ids = logits.softmax(dim=-1).topk(TOP_K, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def _weights(dtype, device):
    w13 = (0.1 * torch.randn(E, 2 * F, HIDDEN, device=device)).to(dtype)
    w2 = (0.1 * torch.randn(E, HIDDEN, F, device=device)).to(dtype)
    return w13, w2


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("T", [1, 33])
def test_matches_reference_with_an_idle_expert(T, dtype, device):
    x = torch.randn(T, HIDDEN, device=device).to(dtype)
    w13, w2 = _weights(dtype, device)
    topk_weights, topk_ids = _route(T, device)
    assert not (topk_ids == UNUSED_EXPERT).any()
    out = fused_moe(x, w13, w2, topk_weights, topk_ids)
    assert out.shape == (T, HIDDEN) and out.dtype == dtype
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, topk_weights, topk_ids), **TOL[dtype])


def test_all_tokens_on_one_expert_span_several_tiles(device):
    T = 33  # every token picks experts 1 and 3: 33 pairs each, two 32-row tiles each
    x = torch.randn(T, HIDDEN, device=device)
    w13, w2 = _weights(torch.float32, device)
    topk_ids = torch.tensor([[1, 3]] * T, device=device, dtype=torch.int32)
    topk_weights = torch.rand(T, TOP_K, device=device)
    out = fused_moe(x, w13, w2, topk_weights, topk_ids, block_m=32)
    expected = fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_align_block_size_groups_pairs_by_expert(device):
    topk_ids = torch.tensor([[0, 3], [3, 1], [0, 3], [1, 0], [3, 0]], device=device)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, E, block_m=4)
    num_pairs, n = topk_ids.numel(), int(num_padded)
    # counts 4, 2, 0, 4 -> runs padded to 4, 4, 0, 4
    assert n == 12
    assert expert_ids[: n // 4].tolist() == [0, 1, 3]
    assert (expert_ids[n // 4:] == -1).all()
    real = sorted_ids[:n][sorted_ids[:n] < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair exactly once
    assert (sorted_ids[n:] == num_pairs).all()
    for tile, expert in enumerate(expert_ids[: n // 4].tolist()):
        pairs = sorted_ids[tile * 4: (tile + 1) * 4]
        pairs = pairs[pairs < num_pairs]
        assert (topk_ids.reshape(-1)[pairs] == expert).all()


def test_reference_is_the_per_token_mixtral_mlp():
    T = 5
    x = torch.randn(T, HIDDEN)
    w13, w2 = _weights(torch.float32, "cpu")
    topk_weights, topk_ids = _route(T, "cpu")
    expected = torch.zeros(T, HIDDEN)
    for t in range(T):
        for j in range(TOP_K):
            e = topk_ids[t, j]
            gate, up = w13[e, :F] @ x[t], w13[e, F:] @ x[t]
            expected[t] += topk_weights[t, j] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, topk_weights, topk_ids), expected,
                               atol=1e-5, rtol=1e-5)


def test_rejects_bad_inputs(device):
    x = torch.randn(3, HIDDEN, device=device)
    w13, w2 = _weights(torch.float32, device)
    topk_weights, topk_ids = _route(3, device)
    with pytest.raises(ValueError):
        fused_moe(x, w13, w2.transpose(1, 2), topk_weights, topk_ids)
    with pytest.raises(TypeError):
        fused_moe(x.half(), w13, w2, topk_weights, topk_ids)
    with pytest.raises(ValueError):
        fused_moe(x, w13, w2, topk_weights, topk_ids, block_m=24)
