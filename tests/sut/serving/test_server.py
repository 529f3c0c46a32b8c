"""`wallperf serve` (sut.server) over real HTTP on loopback.

The fast tests serve a tiny synthetic Llama with a tiny byte-level BPE
tokenizer; the reference for every answer is the native engine's own greedy
`Engine.generate` on the same prompt ids (an engine of its own, not the
server's). The slow test does the same on the real SmolLM2.
"""
import http.client
import json
import threading
from pathlib import Path

import pytest
import torch

from wallperf.sut.loading.load import LoadedModel
from wallperf.sut.engine.engine import Engine, SamplingParams
from wallperf.sut.models.llama import LlamaConfig
from wallperf.sut.serving.server import start_server
from wallperf.sut.loading.tokenizer import Tokenizer
from wallperf.sut.loading.weights import build_model
from wallperf.sut.models.llama import synthetic_state_dict

MAX_SEQ_LEN = 128


def _byte_alphabet() -> list[str]:
    # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest shift past U+00FF.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w"]
TOKENS = SPECIALS + _byte_alphabet() + ["he", "ll", "hell", "hello", "Ġw"]


def tiny_tokenizer(eos_token_id: int = 2) -> Tokenizer:
    return Tokenizer.from_vocab(TOKENS, MERGES, [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)),
                                pre="smollm", bos_token_id=1, eos_token_id=eos_token_id)


def tiny_loaded_model() -> tuple[LoadedModel, list, int]:
    """A 2-layer Llama over the tiny vocabulary, whose EOS is a token it emits on its own;
    also a prompt and the 0-based position where greedy decoding of it first emits EOS."""
    cfg = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=128,
                      vocab_size=len(TOKENS), rms_eps=1e-5, max_position=256)
    model = build_model(cfg, synthetic_state_dict(cfg, seed=0, dtype=torch.float32), torch.float32)
    probe = tiny_tokenizer().encode("hello world")
    out = Engine(model, {2}, max_batch=1, max_seq_len=MAX_SEQ_LEN).generate(
        probe, SamplingParams(max_new_tokens=12, ignore_eos=True))
    at = next(i for i, t in enumerate(out) if i >= 2 and out.index(t) == i)
    return LoadedModel(Path("tiny.gguf"), cfg, model, tiny_tokenizer(eos_token_id=out[at]), "float32"), probe, at


def reference_tokens(loaded: LoadedModel, prompt, params: SamplingParams) -> list[int]:
    engine = Engine(loaded.model, loaded.tokenizer.eos_token_ids, max_batch=1, max_seq_len=MAX_SEQ_LEN)
    return engine.generate(prompt, params)


def prompt_of(length: int, seed: int, vocab: int = len(TOKENS)) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# One torch thread: tiny GEMMs gain nothing from a second on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded_model()


@pytest.fixture(scope="module")
def served(tiny):
    loaded = tiny[0]
    server, url, stop = start_server(loaded, "127.0.0.1", 0, max_batch=4, max_seq_len=MAX_SEQ_LEN,
                                     model_name="tiny")
    yield server.server_address[1], loaded
    stop()


def post(port, body, conn=None):
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", body if isinstance(body, bytes) else json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def post_stream(port, body) -> tuple[dict, list]:
    """Headers and the parsed `data:` payloads of a streamed completion ([DONE] as the string)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = []
    for line in resp:
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            events.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    conn.close()
    return dict(resp.getheaders()), events


def test_completion_equals_engine_generate(served):
    port, loaded = served
    prompt = prompt_of(9, seed=1)
    want = reference_tokens(loaded, prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))
    status, body = post(port, {"model": "tiny", "prompt": prompt, "max_tokens": 10, "ignore_eos": True,
                               "temperature": 0})
    assert status == 200
    (choice,) = body["choices"]
    assert choice["token_ids"] == want
    assert choice["text"] == loaded.tokenizer.decode(want)
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 10, "total_tokens": 19}
    assert body["object"] == "text_completion" and body["model"] == "tiny"


def test_stream_carries_one_token_per_chunk_then_usage_then_done(served):
    port, loaded = served
    prompt = prompt_of(5, seed=2)
    want = reference_tokens(loaded, prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
    headers, events = post_stream(port, {"prompt": prompt, "max_tokens": 8, "ignore_eos": True,
                                         "stream_options": {"include_usage": True}})
    assert headers["Content-Type"] == "text/event-stream"
    assert events[-1] == "[DONE]"
    *tokens, usage, _ = events
    assert [c["choices"][0]["token_ids"] for c in tokens] == [[t] for t in want]
    assert "".join(c["choices"][0]["text"] for c in tokens) == loaded.tokenizer.decode(want)
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 7 + ["length"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert usage["usage"]["prompt_tokens"] == 5
    # Without include_usage there is no usage chunk.
    _, events = post_stream(port, {"prompt": prompt, "max_tokens": 3})
    assert len(events) == 4 and all("usage" not in e for e in events[:-1])


def test_text_prompt_is_the_tokenizers_ids(served):
    port, loaded = served
    ids = loaded.tokenizer.encode("hello world, hello")
    _, by_text = post(port, {"prompt": "hello world, hello", "max_tokens": 6, "ignore_eos": True})
    _, by_ids = post(port, {"prompt": ids, "max_tokens": 6, "ignore_eos": True})
    assert by_text["usage"]["prompt_tokens"] == len(ids)
    assert by_text["choices"][0]["token_ids"] == by_ids["choices"][0]["token_ids"]


def test_eos_min_tokens_and_ignore_eos(served, tiny):
    port, loaded = served
    _, probe, eos_at = tiny
    eos = loaded.tokenizer.eos_token_id
    _, stop = post(port, {"prompt": probe, "max_tokens": 12})
    assert stop["choices"][0]["finish_reason"] == "stop"
    assert stop["choices"][0]["token_ids"][-1] == eos
    assert stop["usage"]["completion_tokens"] == eos_at + 1
    for extra in ({"min_tokens": eos_at + 3}, {"ignore_eos": True}):
        params = SamplingParams(max_new_tokens=12, min_new_tokens=extra.get("min_tokens", 0),
                                ignore_eos=extra.get("ignore_eos", False))
        _, body = post(port, {"prompt": probe, "max_tokens": 12, **extra})
        assert body["choices"][0]["token_ids"] == reference_tokens(loaded, probe, params)
        assert len(body["choices"][0]["token_ids"]) > eos_at + 1


def test_concurrent_requests_are_batched_and_each_exact(served):
    port, loaded = served
    prompts = [prompt_of(3 + 4 * i, seed=10 + i) for i in range(7)]
    answers = [None] * len(prompts)

    def one(i):
        answers[i] = post_stream(port, {"prompt": prompts[i], "max_tokens": 6 + i, "ignore_eos": True})[1]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, events in enumerate(answers):
        want = reference_tokens(loaded, prompts[i], SamplingParams(max_new_tokens=6 + i, ignore_eos=True))
        assert [t for e in events[:-1] for t in e["choices"][0]["token_ids"]] == want


BAD_BODIES = {
    "sampling": ({"prompt": [5, 6], "temperature": 0.7}, "temperature"),
    "no prompt": ({"max_tokens": 4}, "prompt"),
    "empty prompt": ({"prompt": []}, "prompt"),
    "id outside vocab": ({"prompt": [5, len(TOKENS)]}, "prompt"),
    "two prompts": ({"prompt": [[5], [6]]}, "prompt"),
    "max_tokens 0": ({"prompt": [5], "max_tokens": 0}, "max_tokens"),
    "max_tokens text": ({"prompt": [5], "max_tokens": "4"}, "max_tokens"),
    "min above max": ({"prompt": [5], "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    "too long": ({"prompt": [5] * 100, "max_tokens": 40}, "max_tokens"),
    "n": ({"prompt": [5], "n": 2}, "n"),
    "logprobs": ({"prompt": [5], "logprobs": 2}, "logprobs"),
    "stream_options alone": ({"prompt": [5], "stream_options": {"include_usage": True}}, "stream_options"),
    "stream not bool": ({"prompt": [5], "stream": "yes"}, "stream"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_request_is_400_with_the_field_named(served, case):
    port, _ = served
    body, param = BAD_BODIES[case]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    status, reply = post(port, body, conn)
    assert status == 400
    assert reply["error"]["param"] == param and reply["error"]["message"]
    # The connection stays usable for the next request.
    assert post(port, {"prompt": [5], "max_tokens": 1}, conn)[0] == 200


def test_other_errors(served):
    port, _ = served
    assert post(port, b"{not json")[0] == 400
    status, reply = post(port, {"model": "gpt-4", "prompt": [5]})
    assert status == 404 and "gpt-4" in reply["error"]["message"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", b"{}", {"Content-Length": "2"})
    assert conn.getresponse().status == 404


def test_models_lists_the_served_model(served):
    port, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/models")
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 200
    assert [m["id"] for m in body["data"]] == ["tiny"] and body["data"][0]["max_model_len"] == MAX_SEQ_LEN


@pytest.mark.slow
def test_smollm2_served_equals_engine_generate(smollm2_gguf_path):
    from wallperf.sut.loading.load import load_model

    loaded = load_model(smollm2_gguf_path, "bfloat16")
    tok = loaded.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}]))
    want = reference_tokens(loaded, prompt, SamplingParams(max_new_tokens=5))
    server, url, stop = start_server(loaded, "127.0.0.1", 0, max_batch=2, max_seq_len=MAX_SEQ_LEN)
    try:
        _, events = post_stream(server.server_address[1], {"prompt": prompt, "max_tokens": 5,
                                                           "stream_options": {"include_usage": True}})
    finally:
        stop()
    assert [t for e in events[:-2] for t in e["choices"][0]["token_ids"]] == want
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == tok.decode(want)
    assert events[-2]["usage"]["completion_tokens"] == len(want)


def test_engine_on_the_callers_thread_serves_and_stops(tiny):
    """`wallperf serve` runs the engine on its main thread (engine_thread=False):
    requests are answered while the caller runs the loop, and request_stop ends it."""
    loaded = tiny[0]
    server, url, stop = start_server(loaded, "127.0.0.1", 0, max_batch=2, max_seq_len=MAX_SEQ_LEN,
                                     model_name="tiny", engine_thread=False)
    loop = server.service.loop
    caller = threading.Thread(target=loop.run)  # stands in for the main thread
    caller.start()
    try:
        prompt = prompt_of(7, seed=11)
        want = reference_tokens(loaded, prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
        status, body = post(server.server_address[1], {"model": "tiny", "prompt": prompt, "max_tokens": 6,
                                                       "ignore_eos": True})
        assert status == 200 and body["choices"][0]["token_ids"] == want
    finally:
        loop.request_stop()
        caller.join(timeout=10)
        stop()
    assert not caller.is_alive()
