"""The engine's decode counters (decode_steps, decode_tokens, decode_context_tokens),
which set the roofline's batch and context, against counts worked out from the
request plan alone: prompts of known lengths, each decoding a fixed number of tokens
(EOS ignored), in a KV pool large enough that nothing is preempted.

The first token of a request comes from its prefill; each later token is one decode
of one sequence, attending over the prompt and every token before it (the context of
token k, 1-based, is prompt + k - 1)."""
import pytest
import torch

from wallperf.sut.engine.engine import Engine, SamplingParams
from wallperf.sut.models.llama import LlamaConfig, synthetic_state_dict
from wallperf.sut.loading.weights import build_model

CFG = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=128, vocab_size=128,
                  rms_eps=1e-5, max_position=256)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, synthetic_state_dict(CFG, seed=3, dtype=torch.float32), torch.float32)


def _context_sum(prompt_len: int, new_tokens: int) -> int:
    return sum(prompt_len + k - 1 for k in range(2, new_tokens + 1))


def _engine(model, max_batch):
    return Engine(model, eos_token_ids=[0], max_batch=max_batch, max_seq_len=64, num_blocks=64, block_size=8)


def test_counters_of_one_batch_decoded_together(model):
    # (prompt tokens, tokens to generate): lengths close enough to share one padded prefill.
    plan = [(9, 7), (10, 3), (9, 9), (11, 4)]
    engine = _engine(model, max_batch=4)
    for i, (p, n) in enumerate(plan):
        engine.add_request(i, list(range(1, p + 1)), SamplingParams(n, n, ignore_eos=True))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    stats = engine.stats
    longest = max(n for _, n in plan)
    # One step prefills all four, then one decode step per further token of the longest.
    assert steps == longest
    assert stats.decode_steps == longest - 1
    assert stats.decode_tokens == sum(n - 1 for _, n in plan) == 19
    assert stats.decode_context_tokens == sum(_context_sum(p, n) for p, n in plan)
    assert stats.preemptions == 0
    # 19 decoded tokens over 8 steps; their mean context.
    assert stats.mean_decode_batch == pytest.approx(19 / 8)
    assert stats.mean_decode_context == pytest.approx(stats.decode_context_tokens / 19)


def test_counters_of_requests_one_at_a_time(model):
    plan = [(6, 5), (3, 8), (10, 2)]
    engine = _engine(model, max_batch=1)
    for i, (p, n) in enumerate(plan):
        engine.add_request(i, list(range(1, p + 1)), SamplingParams(n, n, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
    stats = engine.stats
    assert stats.decode_steps == stats.decode_tokens == sum(n - 1 for _, n in plan) == 12
    assert stats.decode_context_tokens == _context_sum(6, 5) + _context_sum(3, 8) + _context_sum(10, 2)
    assert stats.mean_decode_batch == 1.0
