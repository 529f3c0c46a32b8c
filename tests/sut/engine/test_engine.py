"""wallperf.sut.engine.engine on a tiny synthetic Llama, against a plain greedy loop over HF
transformers' LlamaForCausalLM holding the same weights (full forward, no cache).

The synthetic state dict uses HF names, so HF loads it as is; the reference
loop follows HF's generation rules (MinNewTokensLengthLogitsProcessor: EOS is
banned while fewer than min_new_tokens tokens exist; stop after EOS).
"""
import pytest
import torch
import transformers

from wallperf.sut.engine.engine import Engine, SamplingParams, TokenEvent
from wallperf.sut.models.llama import LlamaConfig
from wallperf.sut.loading.weights import build_model
from wallperf.sut.models.llama import synthetic_state_dict

CFG = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=128, vocab_size=128,
                  rms_eps=1e-5, max_position=256)
MAX_SEQ_LEN = 64


# One torch thread: tiny GEMMs gain nothing from a second on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    sd = synthetic_state_dict(CFG, seed=0, dtype=torch.float32)
    ours = build_model(CFG, sd, torch.float32)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size, intermediate_size=CFG.ffn_size,
        num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads, num_key_value_heads=CFG.n_kv_heads,
        max_position_embeddings=CFG.max_position, rms_norm_eps=CFG.rms_eps, rope_theta=CFG.rope_theta,
        tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(sd, strict=True)
    return ours, hf


def reference(hf, prompt, max_new_tokens, eos=None, min_new_tokens=0, ignore_eos=False) -> list:
    ids, out = list(prompt), []
    with torch.no_grad():
        while len(out) < max_new_tokens:
            logits = hf(torch.tensor([ids])).logits[0, -1]
            if eos is not None and len(out) < min_new_tokens:
                logits[eos] = float("-inf")
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
            if eos is not None and not ignore_eos and token == eos:
                break
    return out


def prompt_of(length: int, seed: int) -> list:
    return torch.randint(0, CFG.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [prompt_of(n, seed) for seed, n in enumerate([3, 17, 9, 30, 1])]
MAX_NEW = [12, 5, 20, 8, 15]


@pytest.fixture(scope="module")
def batch_case(models):
    """EOS = a token prompt 0 emits on its own, so one request stops early at EOS;
    and the reference tokens of every prompt."""
    _, hf = models
    eos = reference(hf, PROMPTS[0], MAX_NEW[0])[3]
    want = [reference(hf, p, n, eos=eos) for p, n in zip(PROMPTS, MAX_NEW)]
    assert any(w[-1] == eos for w in want) and any(len(w) == n for w, n in zip(want, MAX_NEW))
    return eos, want


def run_all(engine: Engine, requests: dict) -> dict:
    """Add every request, step until done; the events of each request, in order."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    events = {rid: [] for rid in requests}
    while engine.has_unfinished():
        assert len(engine.running) <= engine.max_batch
        for ev in engine.step():
            assert isinstance(ev, TokenEvent)
            events[ev.request_id].append(ev)
    return events


ENGINE_SETUPS = {
    "default": dict(),
    # Prompts split into prefill chunks that share steps with decodes.
    "chunked_prefill": dict(max_tokens_per_step=8),
    # A pool of one max_seq_len, too small for three sequences at once: the latest
    # admitted is preempted and recomputed.
    "preemption": dict(block_size=4, num_blocks=16),
}


@pytest.mark.parametrize("setup", list(ENGINE_SETUPS))
def test_batched_generation_matches_reference_and_one_at_a_time(models, batch_case, setup):
    ours, _ = models
    eos, want = batch_case
    engine = Engine(ours, {eos}, max_batch=3, max_seq_len=MAX_SEQ_LEN, **ENGINE_SETUPS[setup])
    events = run_all(engine, {rid: (p, SamplingParams(max_new_tokens=n))
                              for rid, (p, n) in enumerate(zip(PROMPTS, MAX_NEW))})
    for rid, w in enumerate(want):
        assert [ev.token_id for ev in events[rid]] == w, f"request {rid}"
        assert [ev.index for ev in events[rid]] == list(range(1, len(w) + 1))
        assert [ev.finished for ev in events[rid]] == [False] * (len(w) - 1) + [True]
    assert engine.free_slots == 3 and not engine.running
    if setup == "preemption":
        assert engine.stats.preemptions > 0
    if setup == "default":
        single = Engine(ours, {eos}, max_batch=1, max_seq_len=MAX_SEQ_LEN)
        for p, n, w in zip(PROMPTS, MAX_NEW, want):
            assert single.generate(p, SamplingParams(max_new_tokens=n)) == w


def test_waiting_requests_are_admitted_as_slots_free(models):
    ours, _ = models
    engine = Engine(ours, {0}, max_batch=3, max_seq_len=MAX_SEQ_LEN)
    prompts = [prompt_of(8, seed) for seed in range(5)]
    for rid, p in enumerate(prompts):
        engine.add_request(rid, p, SamplingParams(max_new_tokens=MAX_NEW[rid], ignore_eos=True))
    first = engine.step()
    # Three prefills in the first step (nothing decodes yet), one token each; two requests wait.
    assert sorted(ev.request_id for ev in first) == [0, 1, 2]
    assert all(ev.index == 1 for ev in first)
    assert len(engine.running) == 3 and len(engine.waiting) == 2
    seen = {ev.request_id for ev in first}
    while engine.has_unfinished():
        seen |= {ev.request_id for ev in engine.step()}
    assert seen == {0, 1, 2, 3, 4}


def test_while_sequences_decode_a_step_prefills_one_prompt_first_come_first_served(models):
    """A waiting request gets its first token after the prompts before it only, not when a
    padded batch of every waiting prompt is done (Server's TTFT), and decodes go on meanwhile."""
    ours, _ = models
    engine = Engine(ours, {0}, max_batch=4, max_seq_len=MAX_SEQ_LEN)
    engine.add_request(0, prompt_of(6, 0), SamplingParams(max_new_tokens=10, ignore_eos=True))
    engine.step()
    for rid in (1, 2, 3):
        engine.add_request(rid, prompt_of(6, rid), SamplingParams(max_new_tokens=3, ignore_eos=True))
    for rid in (1, 2, 3):
        events = engine.step()
        # The next waiting request's first token, and request 0's next one.
        assert sorted((ev.request_id, ev.index) for ev in events if ev.index == 1) == [(rid, 1)]
        assert [ev.request_id for ev in events].count(0) == 1
    assert not engine.waiting


def test_a_prompt_that_would_pad_the_batch_past_the_slack_waits(models):
    """Rows of a prefill batch are as wide as its widest: a short prompt beside a long one
    would be computed as long, so it waits for the next step."""
    from wallperf.sut.engine.scheduler import PAD_SLACK

    ours, _ = models
    engine = Engine(ours, {0}, max_batch=4, max_seq_len=MAX_SEQ_LEN)
    lengths = [20, 19, 4, 20]  # 3 x 20 <= 1.25 x 59, but 3 x 20 > 1.25 x 43 with the 4-token one
    assert 2 * 20 <= PAD_SLACK * 39 and 3 * 20 > PAD_SLACK * 43
    for rid, n in enumerate(lengths):
        engine.add_request(rid, prompt_of(n, rid), SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert sorted(ev.request_id for ev in engine.step()) == [0, 1]
    assert [seq.request_id for seq in engine.waiting] == [2, 3]  # first come, first served: 3 does not jump


def test_min_new_tokens_suppresses_eos(models):
    ours, hf = models
    prompt = PROMPTS[1]
    first = reference(hf, prompt, 1)[0]
    engine = Engine(ours, {first}, max_batch=2, max_seq_len=MAX_SEQ_LEN)
    # Without min_new_tokens the model's first choice is EOS and ends the request.
    assert engine.generate(prompt, SamplingParams(max_new_tokens=10)) == [first]

    want = reference(hf, prompt, 10, eos=first, min_new_tokens=3)
    got = engine.generate(prompt, SamplingParams(max_new_tokens=10, min_new_tokens=3))
    assert got == want
    assert len(got) >= 3 and first not in got[:3]


def test_ignore_eos_decodes_exactly_max_new_tokens(models):
    ours, hf = models
    prompt = PROMPTS[2]
    first = reference(hf, prompt, 1)[0]
    engine = Engine(ours, {first}, max_batch=1, max_seq_len=MAX_SEQ_LEN)
    got = engine.generate(prompt, SamplingParams(max_new_tokens=11, ignore_eos=True))
    assert got == reference(hf, prompt, 11) and len(got) == 11 and got[0] == first


def test_events_of_one_request(models):
    ours, _ = models
    engine = Engine(ours, {0}, max_batch=2, max_seq_len=MAX_SEQ_LEN)
    events = run_all(engine, {7: (PROMPTS[3], SamplingParams(max_new_tokens=6, ignore_eos=True)),
                              8: (PROMPTS[4], SamplingParams(max_new_tokens=1))})
    assert [ev.index for ev in events[7]] == [1, 2, 3, 4, 5, 6]
    assert [ev.finished for ev in events[7]] == [False] * 5 + [True]
    (only,) = events[8]
    assert only.index == 1 and only.finished


def test_prompt_filling_max_seq_len_exactly(models):
    ours, hf = models
    prompt = prompt_of(MAX_SEQ_LEN - 10, seed=11)
    engine = Engine(ours, {0}, max_batch=1, max_seq_len=MAX_SEQ_LEN)
    got = engine.generate(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert got == reference(hf, prompt, 10)


def test_limits_raise_value_error(models):
    ours, _ = models
    engine = Engine(ours, {0}, max_batch=2, max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.add_request(0, prompt_of(MAX_SEQ_LEN - 9, seed=1), SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request(1, [], SamplingParams(max_new_tokens=10))
    assert not engine.has_unfinished() and engine.free_slots == 2
    with pytest.raises(ValueError, match="max_seq_len"):
        Engine(ours, {0}, max_batch=1, max_seq_len=CFG.max_position + 1)
    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=3, min_new_tokens=4),
                dict(max_new_tokens=3, min_new_tokens=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_free_slots_accounting(models):
    ours, _ = models
    engine = Engine(ours, {0}, max_batch=3, max_seq_len=MAX_SEQ_LEN)
    assert engine.free_slots == 3 and not engine.has_unfinished()
    engine.add_request(0, prompt_of(5, 10), SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.add_request(1, prompt_of(5, 11), SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert engine.free_slots == 1 and engine.has_unfinished()
    engine.step()  # both prefilled together (nothing decodes yet): one token each
    assert engine.free_slots == 1
    engine.step()  # request 1 has its 2 tokens: its slot is free again
    assert engine.free_slots == 2
    engine.add_request(2, prompt_of(5, 12), SamplingParams(max_new_tokens=1))
    assert engine.free_slots == 1
    engine.step()  # request 2 prefilled and finished at once, request 0 at 3 tokens
    assert engine.free_slots == 2
    engine.step()
    assert engine.free_slots == 3 and not engine.has_unfinished()


def test_a_long_prompt_does_not_pad_a_prefill_batch_past_the_budget(models, batch_case):
    """Prefill chunks run as one padded batch: rows x the widest chunk stays within the
    step's token budget, so one long prompt among short ones is not computed once per
    row; every request still gets the reference's tokens."""
    ours, _ = models
    eos, want = batch_case
    engine = Engine(ours, {eos}, max_batch=5, max_seq_len=MAX_SEQ_LEN, max_tokens_per_step=32)
    padded = []
    prefill = engine._prefill

    def spy(chunks, events):
        padded.append((len(chunks), max(n for _, n in chunks)))
        return prefill(chunks, events)

    engine._prefill = spy
    # Prompts of 3, 17, 9, 30 and 1 tokens arrive together.
    events = run_all(engine, {rid: (p, SamplingParams(max_new_tokens=n))
                              for rid, (p, n) in enumerate(zip(PROMPTS, MAX_NEW))})
    for rid, w in enumerate(want):
        assert [ev.token_id for ev in events[rid]] == w, f"request {rid}"
    # Each prefill step's budget is 32 less the decoding rows of that step.
    assert padded and all(rows * width <= 32 for rows, width in padded), padded
    # Unbounded, the first step would pad 4 rows to the 30-token prompt (120 positions).
    assert padded[0][0] * padded[0][1] <= 32 and sum(rows for rows, _ in padded) >= len(PROMPTS)
