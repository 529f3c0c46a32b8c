"""Engine.abort: an aborted request leaves the queues and frees its blocks at
once, whether it was waiting, prefilling or decoding; the requests beside it
decode exactly what they would have alone (the reference: `generate` on an
engine of their own)."""
import pytest
import torch

from wallperf.sut.engine.engine import Engine, SamplingParams
from wallperf.sut.models.llama import LlamaConfig, synthetic_state_dict
from wallperf.sut.loading.weights import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=128, vocab_size=97,
                      max_position=256)
    return build_model(cfg, synthetic_state_dict(cfg, seed=3, dtype=torch.float32), torch.float32)


def engine_for(model, max_batch=2):
    return Engine(model, {0}, max_batch=max_batch, max_seq_len=128, block_size=4, num_blocks=64)


def prompt(seed: int, n: int = 9) -> list[int]:
    return torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_abort_mid_decode_frees_blocks_and_leaves_the_others_alone(model):
    engine = engine_for(model)
    for rid in range(3):  # the third waits: max_batch is 2
        engine.add_request(rid, prompt(rid), PARAMS)
    out = {rid: [] for rid in range(3)}
    for _ in range(4):
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    decoding = next(s for s in engine.running if s.request_id == 0)
    held = len(decoding.block_table)
    free_before = engine.blocks.num_free
    assert held > 0 and engine.abort(0) == held
    assert engine.blocks.num_free == free_before + held
    assert all(s.request_id != 0 for s in [*engine.running, *engine.waiting])
    assert engine.abort(0) is None  # once only
    while engine.has_unfinished():
        for ev in engine.step():
            assert ev.request_id != 0
            out[ev.request_id].append(ev.token_id)
    for rid in (1, 2):
        assert out[rid] == engine_for(model, max_batch=1).generate(prompt(rid), PARAMS)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_abort_while_waiting_and_of_an_unknown_request(model):
    engine = engine_for(model, max_batch=1)
    engine.add_request(7, prompt(7), PARAMS)
    assert engine.abort(7) == 0 and not engine.has_unfinished()
    assert engine.abort(12345) is None
    assert engine.blocks.num_free == engine.blocks.num_blocks
