"""The hf backend (HF transformers' LlamaForCausalLM on the native engine's
weights, static left-padded batches) against the native engine: the same
greedy tokens, whatever the batch and its padding; min_new_tokens and
ignore_eos as the native engine honours them; and a missing transformers
reported as a configuration error that names the package to install.
"""
import json
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from wallperf.sut.backends import MissingPackage, create  # noqa: E402
from wallperf.sut.backends.hf import HFBackend, build_hf_model  # noqa: E402
from wallperf.sut.engine.engine import Engine, SamplingParams  # noqa: E402
from wallperf.sut.models.llama import LlamaConfig  # noqa: E402
from wallperf.sut.loading.weights import build_model  # noqa: E402
from wallperf.sut.models.llama import synthetic_state_dict

EOS = 2


# One torch thread: tiny GEMMs gain nothing from a second on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(tied: bool, bias: bool = False):
    """bias=True: Qwen2's layout (Q/K/V biases), which HF runs as Qwen2ForCausalLM."""
    cfg = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=96, vocab_size=128,
                      rope_theta=100000.0, tie_embeddings=tied, max_position=256, attention_bias=bias)
    model = build_model(cfg, synthetic_state_dict(cfg, seed=5, dtype=torch.float32), torch.float32)
    return SimpleNamespace(model=model, config=cfg, tokenizer=SimpleNamespace(eos_token_ids={EOS}),
                           device="cpu")


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def _native(loaded, prompt, params):
    engine = Engine(loaded.model, loaded.tokenizer.eos_token_ids, max_batch=1, max_seq_len=96, num_blocks=8)
    return engine.generate(prompt, params)


def _drain(backend):
    """Step until idle: {request id: tokens}, and the events of each step."""
    tokens, events = {}, []
    while backend.has_unfinished():
        step = backend.step()
        events.append(step)
        for ev in step:
            out = tokens.setdefault(ev.request_id, [])
            assert ev.index == len(out) + 1
            out.append(ev.token_id)
    return tokens, events


def _run(backend, prompts, params):
    """Every request at once; per request its tokens, and the events as they came."""
    for i, p in enumerate(prompts):
        backend.add_request(i, p, params)
    tokens, events = _drain(backend)
    return [tokens[i] for i in range(len(prompts))], events


@pytest.mark.parametrize("tied, bias", [(True, False), (False, False), (False, True)])
def test_split_weights_give_hf_the_native_logits(tied, bias):
    loaded = _tiny(tied, bias)
    hf = build_hf_model(loaded.model)
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if bias else "LlamaForCausalLM")
    ids = torch.tensor(_prompts([21]))
    with torch.no_grad():
        got = hf(ids).logits[0, -1].float()
    from wallperf.sut.engine.paged_cache import PagedKVCache

    cache = PagedKVCache(2, 4, 8, 2, 16, torch.float32)
    positions = torch.arange(21).unsqueeze(0)
    cache.bind([[0, 1, 2]], positions, torch.ones_like(positions, dtype=torch.bool))
    want = loaded.model(ids, positions, cache)[0, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied, bias", [(True, False), (False, False), (False, True)])
def test_left_padded_batch_gives_the_native_tokens(tied, bias):
    loaded = _tiny(tied, bias)
    prompts = _prompts([5, 17, 9, 30])
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12, ignore_eos=True)
    want = [_native(loaded, p, params) for p in prompts]
    batched, events = _run(HFBackend(loaded, max_batch=4, max_seq_len=96), prompts, params)
    assert batched == want
    # One prefill, then 11 decode steps of the whole batch.
    assert len(events) == 12 and all(len(step) == 4 for step in events)
    alone = [_run(HFBackend(loaded, max_batch=1, max_seq_len=96), [p], params)[0][0] for p in prompts]
    assert alone == want


def test_static_batches_and_stats():
    loaded = _tiny(True)
    backend = HFBackend(loaded, max_batch=2, max_seq_len=96)
    assert backend.free_slots == 2 and not backend.has_unfinished()
    short, long_ = SamplingParams(max_new_tokens=2, ignore_eos=True), SamplingParams(5, ignore_eos=True)
    prompts = _prompts([4, 6, 8])
    backend.add_request(0, prompts[0], short)
    backend.add_request(1, prompts[1], long_)
    backend.add_request(2, prompts[2], short)
    assert backend.free_slots == -1
    _, events = _drain(backend)
    ids = [[ev.request_id for ev in step] for step in events]
    # Requests 0 and 1 form the first batch; 0 finishes after 2 tokens and emits
    # nothing more while 1 goes on; 2 waits for the next batch.
    assert ids == [[0, 1], [0, 1], [1], [1], [1], [2], [2]]
    assert [ev.finished for ev in events[1]] == [True, False]
    s = backend.stats
    # Decode steps: 4 of the first batch, 1 of the second; tokens only of rows still going.
    assert (s.decode_steps, s.decode_tokens) == (5, 1 + 4 + 1)
    assert s.decode_context_tokens == (4 + 1) + sum(6 + k for k in range(1, 5)) + (8 + 1)


def test_min_new_tokens_and_ignore_eos_as_the_native_engine():
    loaded = _tiny(True)
    prompt = _prompts([11], seed=7)[0]
    free = _native(loaded, prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
    # Make a token the model picks early, but not first, the EOS id.
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    assert k < 3
    eos = free[k]
    loaded.tokenizer = SimpleNamespace(eos_token_ids={eos})
    cases = [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, min_new_tokens=4),
             SamplingParams(max_new_tokens=8, ignore_eos=True)]
    for params in cases:
        want = _native(loaded, prompt, params)
        got, events = _run(HFBackend(loaded, max_batch=1, max_seq_len=96), [prompt], params)
        assert got[0] == want, params
        assert events[-1][-1].finished
    assert len(_run(HFBackend(loaded, 1, 96), [prompt], cases[0])[0][0]) == k + 1
    suppressed = _run(HFBackend(loaded, 1, 96), [prompt], cases[1])[0][0]
    assert eos not in suppressed[:4] and len(suppressed) > 4
    assert len(_run(HFBackend(loaded, 1, 96), [prompt], cases[2])[0][0]) == 8


def test_missing_transformers_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingPackage, match=r"transformers.*pip install 'wallperf\[peers\]'"):
        create("hf", _tiny(True), max_batch=1, max_seq_len=64)


def test_cli_reports_a_missing_peer_package_without_traceback(monkeypatch, tmp_path, capsys):
    from wallperf.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)
    rc = main(["run", "--backend", "hf", "--scenario", "SingleStream", "--out", str(tmp_path / "out"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "transformers" in err and "pip install 'wallperf[peers]'" in err and "Traceback" not in err


# -- the real SmolLM2 model (slow) -------------------------------------------

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 17 * 23?"]


@pytest.mark.slow
def test_smollm2_hf_backend_batch_matches_native(smollm2_gguf_path):
    from wallperf.sut.loading.load import load_model

    loaded = load_model(smollm2_gguf_path, "float32")
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # the batch is really padded
    params = SamplingParams(max_new_tokens=24, min_new_tokens=2)
    want = []
    for p in prompts:
        engine = Engine(loaded.model, tok.eos_token_ids, max_batch=1, max_seq_len=len(p) + 24)
        want.append(engine.generate(p, params))
    got, _ = _run(HFBackend(loaded, max_batch=3, max_seq_len=128), prompts, params)
    assert got == want


@pytest.mark.slow
def test_wallperf_run_backend_hf_end_to_end(tmp_path, smollm2_gguf_path, mmlu_path):
    from wallperf.cli import main

    out = tmp_path / "out"
    rc = main(["run", "--backend", "hf", "--scenario", "Offline", "--mode", "both", "--max-samples", "4",
               "--output-tokens", "8", "--duration", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    perf, acc = results["runs"]
    assert {perf["backend"], acc["backend"]} == {"hf"}
    assert perf["mode"] == "performance" and perf["metrics"]["tokens_per_second"] > 0
    rf = perf["roofline"]
    # bf16 weights as HF holds them: SmolLM2's parameters at 2 bytes each (and its KV).
    assert rf["dtype"] == "bfloat16" and rf["bytes_per_step"] > 2 * 134e6
    assert 0 < rf["mbu"] < 1.5
    assert acc["mmlu"]["total"] == 4 and acc["compliance"]["test06"]["passed"]
