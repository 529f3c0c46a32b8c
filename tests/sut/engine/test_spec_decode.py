"""Speculative decoding in the native engine is greedy decoding, bit for bit.

The reference is the same engine without speculation, each request decoded alone
(batch 1): its tokens and the float32 logits behind each of them. A scripted
drafter proposes the reference's own continuation, corrupted at a chosen draft
position, so that rejection at the first, a middle and the last drafted position,
full acceptance and EOS inside a draft are each forced rather than hoped for;
the ngram and draft-model drafters run on top. Planted bugs (an off-by-one in
the accepted count, a verify pass whose logits are one ulp off) must fail the
same comparison.
"""
import pytest
import torch

from wallperf.sut.engine import speculative
from wallperf.sut.engine.engine import Engine, SamplingParams, Sequence, Speculation
from wallperf.sut.engine.speculative import DraftModelDrafter, NgramDrafter, accepted_prefix
from wallperf.sut.loading.weights import build_model
from wallperf.sut.models.llama import LlamaConfig, synthetic_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=128, vocab_size=96,
                  rms_eps=1e-5, max_position=256, attention_bias=True)
MAX_SEQ_LEN = 96
K = 4


def prompt_of(length: int, seed: int) -> list:
    return torch.randint(0, CFG.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# Mixed lengths, one long enough to cross KV blocks while drafting.
PROMPTS = [prompt_of(n, seed) for seed, n in enumerate([5, 23, 1, 40, 11])]
MAX_NEW = [30, 17, 25, 12, 40]


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def model(request):
    return build_model(CFG, synthetic_state_dict(CFG, seed=0, dtype=request.param), request.param)


def run(engine, requests: dict) -> tuple[dict, dict]:
    """Tokens and logits per request under continuous batching: each request joins once
    the one before it has its first token, so it is prefilled alone (as in the batch-1
    reference: a padded prefill batch is other arithmetic) and then verified beside
    the others at their own, different lengths."""
    tokens, logits = {r: [] for r in requests}, {r: [] for r in requests}
    engine.on_logits = lambda rid, row: logits[rid].append(row.clone())
    pending = list(requests.items())
    while pending or engine.has_unfinished():
        if pending and (not engine.has_unfinished() or tokens[last]):
            last, (prompt, params) = pending.pop(0)
            engine.add_request(last, prompt, params)
        for ev in engine.step():
            tokens[ev.request_id].append(ev.token_id)
    return tokens, logits


def reference(model, eos, requests: dict) -> tuple[dict, dict]:
    """Greedy decoding without speculation, one request at a time."""
    tokens, logits = {}, {}
    for rid, req in requests.items():
        t, lg = run(Engine(model, eos, max_batch=1, max_seq_len=MAX_SEQ_LEN), {rid: req})
        tokens[rid], logits[rid] = t[rid], lg[rid]
    return tokens, logits


def first_difference(want: tuple, got: tuple) -> str | None:
    """None when tokens and logits match bit for bit, else where they first differ."""
    for rid in want[0]:
        if want[0][rid] != got[0][rid]:
            return f"request {rid}: tokens {want[0][rid]} != {got[0][rid]}"
        for i, (a, b) in enumerate(zip(want[1][rid], got[1][rid])):
            if not torch.equal(a, b):
                return f"request {rid}: logits of token {i} differ by up to {float((a - b).abs().max())}"
    return None


class ScriptedDrafter:
    """Drafts the reference's continuation, with a wrong token at draft position `wrong_at`."""

    name = "scripted"

    def __init__(self, ref_tokens: dict, wrong_at: int | None):
        self.ref, self.wrong_at = ref_tokens, wrong_at
        self.proposed = []

    def propose(self, seqs, ks):
        out = []
        for s, k in zip(seqs, ks):
            d = list(self.ref[s.request_id][len(s.output_ids):len(s.output_ids) + k])
            if self.wrong_at is not None and self.wrong_at < len(d):
                d[self.wrong_at] = (d[self.wrong_at] + 1) % CFG.vocab_size
            out.append(d)
        self.proposed.append(out)
        return out

    def release(self, seq):
        pass


def requests_for(eos=None, min_new=0):
    return {rid: (p, SamplingParams(max_new_tokens=n, min_new_tokens=min(min_new, n)))
            for rid, (p, n) in enumerate(zip(PROMPTS, MAX_NEW))}


def spec_engine(model, eos, drafter, k=K, max_batch=len(PROMPTS), adaptive=False):
    return Engine(model, eos, max_batch=max_batch, max_seq_len=MAX_SEQ_LEN,
                  speculation=Speculation(drafter, k, adaptive))


def rows_independent(model) -> bool:
    return Engine(model, [0], max_batch=1, max_seq_len=MAX_SEQ_LEN).runner.rows_independent


def test_accepted_prefix_is_the_common_prefix():
    assert accepted_prefix([], []) == 0
    assert accepted_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert accepted_prefix([1, 2, 3], [1, 5, 3, 4]) == 1
    assert accepted_prefix([7], [1, 2]) == 0


def test_ngram_lookup_matches_a_brute_force_search():
    drafter = NgramDrafter(max_n=3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        tokens = torch.randint(0, 4, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
        want = []
        for n in range(min(3, len(tokens) - 1), 0, -1):
            hits = [s for s in range(len(tokens) - n) if tokens[s:s + n] == tokens[-n:]]
            if hits:
                want = tokens[hits[-1] + n:hits[-1] + n + 4]
                break
        assert drafter._lookup(tokens, 4) == want, tokens


@pytest.mark.parametrize("wrong_at", [None, 0, 1, K - 1], ids=["all-accepted", "first", "middle", "last"])
def test_rejection_anywhere_gives_greedy_tokens_and_logits(model, wrong_at):
    eos = [3]
    want = reference(model, eos, requests_for())
    drafter = ScriptedDrafter(want[0], wrong_at)
    engine = spec_engine(model, eos, drafter, max_batch=1)
    got = run(engine, requests_for())
    assert first_difference(want, got) is None, first_difference(want, got)
    stats = engine.spec_stats.summary()
    if wrong_at is None:
        assert stats["acceptance_rate"] == 1.0
    else:
        # Accepted exactly up to the corrupted position wherever a full draft was proposed.
        assert stats["acceptance_by_position"][wrong_at] == 0.0
        assert all(r == 1.0 for r in stats["acceptance_by_position"][:wrong_at])


def test_eos_inside_a_draft_ends_the_request(model):
    """The reference hits EOS mid-output; the drafter proposes it and tokens past it."""
    free = reference(model, [], requests_for())
    # Pick a token each request emits early as EOS, so that every run stops at it.
    eos = [free[0][0][5]]
    want = reference(model, eos, requests_for())
    assert any(len(want[0][r]) < MAX_NEW[r] and want[0][r][-1] == eos[0] for r in want[0]), want[0]
    drafter = ScriptedDrafter(free[0], None)
    got = run(spec_engine(model, eos, drafter, max_batch=1), requests_for())
    assert first_difference(want, got) is None, first_difference(want, got)
    drafted_eos = [d for step in drafter.proposed for d in step if eos[0] in d[:-1]]
    assert drafted_eos, "no draft carried EOS before its end"


def test_min_new_tokens_bans_eos_inside_drafts(model):
    free = reference(model, [], requests_for())
    eos = [free[0][0][2]]
    want = reference(model, eos, requests_for(min_new=8))
    got = run(spec_engine(model, eos, ScriptedDrafter(free[0], None), max_batch=1), requests_for(min_new=8))
    assert first_difference(want, got) is None, first_difference(want, got)


def test_a_mixed_batch_verifies_exactly(model):
    """Five requests of mixed lengths verified together, each against its batch-1 reference."""
    if not rows_independent(model):
        pytest.skip("this device's eager GEMMs depend on the row count, so batched greedy decoding is "
                    "itself batch-dependent; the batch-1 tests cover the replay path")
    eos = [3]
    want = reference(model, eos, requests_for())
    for wrong_at in (None, 0, 2):
        got = run(spec_engine(model, eos, ScriptedDrafter(want[0], wrong_at)), requests_for())
        assert first_difference(want, got) is None, (wrong_at, first_difference(want, got))


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed-k", "adaptive-k"])
def test_ngram_and_draft_model_drafters_are_exact(model, adaptive):
    eos = [3]
    # Repetitive prompts give prompt lookup something to find.
    reqs = {rid: (p * 3, SamplingParams(max_new_tokens=n)) for rid, (p, n) in enumerate(zip(PROMPTS[:3], MAX_NEW))}
    want = reference(model, eos, reqs)
    same = build_model(CFG, synthetic_state_dict(CFG, seed=0, dtype=model.embed_tokens.weight.dtype),
                       model.embed_tokens.weight.dtype)
    other = build_model(CFG, synthetic_state_dict(CFG, seed=7, dtype=torch.float32), torch.float32)
    for drafter in (NgramDrafter(), DraftModelDrafter(same, 1, MAX_SEQ_LEN, K, "cpu"),
                    DraftModelDrafter(other, 1, MAX_SEQ_LEN, K, "cpu"),
                    DraftModelDrafter(same, 1, MAX_SEQ_LEN, K, "cpu", context=10),
                    DraftModelDrafter(same, 1, MAX_SEQ_LEN, K, "cpu", vocab=40)):
        engine = spec_engine(model, eos, drafter, max_batch=1, adaptive=adaptive)
        got = run(engine, reqs)
        assert first_difference(want, got) is None, (drafter.name, first_difference(want, got))
        assert drafter.name != "draft-model" or not any(drafter.blocks.ref_counts), "draft blocks leaked"
    # The target's own weights as the drafter: every draft holds.
    engine = spec_engine(model, eos, DraftModelDrafter(same, 1, MAX_SEQ_LEN, K, "cpu"), max_batch=1)
    run(engine, reqs)
    assert engine.spec_stats.summary()["acceptance_rate"] == 1.0


@pytest.mark.parametrize("context", [None, 12, 3])
def test_a_draft_models_drafts_are_its_greedy_continuation_of_its_context(context):
    """Its first drafts for a new sequence are the draft model's own greedy tokens
    after the sequence's last `context` tokens (all of them without one), as the
    engine without speculation decodes them from that prompt."""
    draft = build_model(CFG, synthetic_state_dict(CFG, seed=7, dtype=torch.float32), torch.float32)
    prompt = prompt_of(40, 11)
    seq = Sequence(0, prompt, SamplingParams(max_new_tokens=8), output_ids=[5])
    got = DraftModelDrafter(draft, 1, MAX_SEQ_LEN, K, "cpu", context=context).propose([seq], [K])[0]
    seen = (prompt + [5])[-context:] if context else prompt + [5]
    want = Engine(draft, [], 1, MAX_SEQ_LEN).generate(seen, SamplingParams(max_new_tokens=K))
    assert got == want
    assert seq.draft_cached == len(prompt) + 1 + K - 1


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_a_draft_vocabulary_keeps_drafts_to_its_first_ids_and_their_argmax(fused, monkeypatch):
    """--draft-vocab N: each draft is the draft model's greedy token among ids < N (its
    argmax over those logits), on the fused step (whose head then reads N rows) and on
    the eager one; a step reads N rows of the head's bytes, not the vocabulary's."""
    from wallperf.audit.speculative import draft_step_bytes, weight_bytes

    monkeypatch.setenv("WALLPERF_FUSED_DECODE", "1" if fused else "0")
    draft = build_model(CFG, synthetic_state_dict(CFG, seed=7, dtype=torch.bfloat16), torch.bfloat16)
    limited = DraftModelDrafter(draft, 1, MAX_SEQ_LEN, K, "cpu", vocab=24)
    if fused and limited.runner.fused is None:
        pytest.skip("no fused decode step on this machine")
    full = DraftModelDrafter(draft, 1, MAX_SEQ_LEN, K, "cpu")
    prompt = prompt_of(30, 4)
    seq = Sequence(0, prompt, SamplingParams(max_new_tokens=8), output_ids=[5])
    got = limited.propose([seq], [K])[0]
    assert len(got) == K and all(t < 24 for t in got)
    # The reference: the full head's logits over the same tokens, argmax within the first 24.
    ref_seq = Sequence(1, prompt, SamplingParams(max_new_tokens=8), output_ids=[5])
    table = []
    full.blocks.grow(table, len(prompt) + 1 + K)
    context, want = prompt + [5], []
    for _ in range(K):
        logits = full.runner.verify([(context, 0, table)])[0][-1]
        want.append(int(logits[:24].argmax()))
        context = context + [want[-1]]
    assert got == want
    head_row = CFG.hidden_size * 2  # bf16
    assert limited.head_bytes_skipped == (CFG.vocab_size - 24) * head_row
    assert draft_step_bytes(limited) == weight_bytes(draft) - (CFG.vocab_size - 24) * head_row
    assert draft_step_bytes(full) == weight_bytes(draft)
    assert full.vocab is None and ref_seq.draft_cached == 0
    assert DraftModelDrafter(draft, 1, MAX_SEQ_LEN, K, "cpu", vocab=CFG.vocab_size + 1).vocab is None
    with pytest.raises(ValueError, match="vocab must be at least 16"):
        DraftModelDrafter(draft, 1, MAX_SEQ_LEN, K, "cpu", vocab=8)


def test_a_catch_up_skipping_the_head_writes_what_full_steps_write():
    """A drafter's catch-up on a prompt skips the head in calls holding no last token;
    its cache and its draft must be those of decode steps computing every logit."""
    model = build_model(CFG, synthetic_state_dict(CFG, seed=0, dtype=torch.bfloat16), torch.bfloat16)
    a, b = (DraftModelDrafter(model, 1, MAX_SEQ_LEN, K, "cpu") for _ in range(2))
    if a.runner.fused is None:
        pytest.skip("no fused decode step on this machine")
    prompt = prompt_of(70, 5)
    ta, tb = [], []
    a.blocks.grow(ta, len(prompt))
    b.blocks.grow(tb, len(prompt))
    got = a._catch_up([(prompt, 0, ta)])
    full = b.runner.verify([(prompt, 0, tb)])[0]
    assert got == [int(full[-1].argmax())]
    assert torch.equal(a.cache.k, b.cache.k) and torch.equal(a.cache.v, b.cache.v)


def test_planted_off_by_one_in_the_accepted_count_is_caught(model, monkeypatch):
    if not rows_independent(model):
        pytest.skip("replay stops at the first rejection, so there is no row past it to accept by mistake")
    eos = [3]
    want = reference(model, eos, requests_for())
    real = speculative.accepted_prefix
    monkeypatch.setattr("wallperf.sut.engine.engine.accepted_prefix", lambda d, t: min(len(d), real(d, t) + 1))
    got = run(spec_engine(model, eos, ScriptedDrafter(want[0], 1), max_batch=1), requests_for())
    assert first_difference(want, got) is not None


def test_planted_verify_numerics_are_caught(model, monkeypatch):
    """A verify pass one ulp off (as a different GEMM order would be) keeps most
    tokens but not the logits' bits."""
    eos = [3]
    want = reference(model, eos, requests_for())
    engine = spec_engine(model, eos, ScriptedDrafter(want[0], None), max_batch=1)
    real = engine.runner.verify
    monkeypatch.setattr(engine.runner, "verify", lambda rows, keep=None: [
        torch.nextafter(lg, torch.full_like(lg, float("inf"))) for lg in real(rows, keep)])
    got = run(engine, requests_for())
    assert first_difference(want, got) is not None


def test_drafts_need_room_in_the_pool():
    model = build_model(CFG, synthetic_state_dict(CFG, seed=0, dtype=torch.float32), torch.float32)
    with pytest.raises(ValueError, match="drafted tokens"):
        Engine(model, [3], max_batch=1, max_seq_len=32, block_size=16, num_blocks=2,
               speculation=Speculation(NgramDrafter(), 4))
    with pytest.raises(ValueError, match="num_draft_tokens"):
        Speculation(NgramDrafter(), 0)
    with pytest.raises(ValueError, match="context"):
        DraftModelDrafter(model, 1, 32, 4, "cpu", context=0)
