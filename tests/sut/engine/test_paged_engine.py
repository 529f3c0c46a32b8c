"""The paged engine against independent references on a tiny synthetic Llama:
HF transformers' greedy decoding with the same weights, and the paged decode
kernel path (forced onto CPU tensors under Triton's interpreter) against the
PyTorch attention path."""
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from wallperf.kernels import _triton
from wallperf.sut.engine.block_manager import BlockManager, OutOfBlocks
from wallperf.sut.engine.engine import Engine, SamplingParams
from wallperf.sut.loading.weights import build_model, load_hf_checkpoint

PROMPTS = [[5, 9, 13, 2, 7], [3] * 21, [11, 4], list(range(1, 40))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = HFLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        rope_theta=10000.0, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(folder, safe_serialization=True)
    ours_cfg, sd, _ = load_hf_checkpoint(folder)
    return hf, build_model(ours_cfg, sd, torch.float32)


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_all(engine, n):
    for i, p in enumerate(PROMPTS):
        engine.add_request(i, p, SamplingParams(max_new_tokens=n, ignore_eos=True))
    out = {i: [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    return [out[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("kwargs", [
    dict(max_batch=4),                                               # all at once
    dict(max_batch=2, max_tokens_per_step=6),                        # chunked prefill, waiting
    dict(max_batch=4, num_blocks=7, block_size=8),                   # preemption and recompute
    dict(max_batch=3, num_blocks=14, block_size=4, max_tokens_per_step=5),
])
def test_continuous_batching_matches_hf_greedy(tiny, kwargs):
    hf, model = tiny
    expected = [hf_greedy(hf, p, 12) for p in PROMPTS]
    engine = Engine(model, {0}, max_seq_len=56, **kwargs)
    assert run_all(engine, 12) == expected
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block returned
    if kwargs.get("num_blocks") == 7:
        assert engine.preemptions > 0


def test_decode_kernel_path_equals_torch_path(tiny, monkeypatch):
    _, model = tiny
    expected = run_all(Engine(model, {0}, max_batch=4, max_seq_len=56, block_size=8), 6)
    monkeypatch.setattr(_triton, "MODE", "triton")
    assert run_all(Engine(model, {0}, max_batch=4, max_seq_len=56, block_size=8), 6) == expected


def test_block_manager_reference_counts():
    bm = BlockManager(num_blocks=4, block_size=4)
    table = []
    bm.grow(table, 9)
    assert len(table) == 3 and bm.num_free == 1
    shared = bm.fork(table)
    bm.free(table)
    assert bm.num_free == 1  # still held by the fork
    bm.free(shared)
    assert bm.num_free == 4
    with pytest.raises(OutOfBlocks):
        bm.grow([], 17)
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free([0])


def test_pool_too_small_for_one_sequence(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Engine(model, {0}, max_batch=1, max_seq_len=64, num_blocks=3, block_size=8)
