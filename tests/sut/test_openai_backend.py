"""wallperf.sut.backends.openai against real servers on loopback.

The reference is the native backend on the same tiny model, driven the same
way the LoadGen adapter drives any backend; the servers are `wallperf serve`
(sut.server) and, for what it cannot do (text-only streams, refusing token
ids, stalling), the mock of wallperf.bench.client and a socket that never answers.
"""
import json
import socket
import time

import pytest
from serving.test_server import MAX_SEQ_LEN, prompt_of, tiny_loaded_model

from wallperf.bench.client import MockOptions, mock_token_ids, start_mock_server
from wallperf.sut.backends.native import NativeBackend
from wallperf.sut.backends.openai import OpenAIBackend
from wallperf.sut.engine.engine import SamplingParams
from wallperf.sut.serving.server import start_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = {100 + i: prompt_of(2 + 5 * i, seed=40 + i) for i in range(6)}


def drive(backend, requests: dict, deadline_s: float = 60) -> dict:
    """As the adapter does: admit while there are free slots, step until every request
    has finished; the events of each request in order."""
    pending, events = list(requests.items()), {rid: [] for rid in requests}
    end = time.monotonic() + deadline_s
    while pending or backend.has_unfinished():
        assert time.monotonic() < end, "the backend did not finish its requests in time"
        while pending and backend.free_slots > 0:
            rid, (prompt, params) = pending.pop(0)
            backend.add_request(rid, prompt, params)
        for ev in backend.step():
            events[ev.request_id].append(ev)
    for rid, evs in events.items():
        assert [ev.index for ev in evs] == list(range(1, len(evs) + 1)), rid
        assert [ev.finished for ev in evs] == [False] * (len(evs) - 1) + [True], rid
    return events


def tokens(events: dict) -> dict:
    return {rid: [ev.token_id for ev in evs] for rid, evs in events.items()}


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded_model()[0]


@pytest.fixture
def serve(tiny):
    """Start `wallperf serve` on the tiny model (port 0); stop them all after the test."""
    stops = []

    def start():
        _, url, stop = start_server(tiny, "127.0.0.1", 0, max_batch=4, max_seq_len=MAX_SEQ_LEN, model_name="tiny")
        stops.append(stop)
        return url, stop

    yield start
    for stop in stops:
        try:
            stop()
        except OSError:
            pass


def requests_of(**params) -> dict:
    return {rid: (prompt, SamplingParams(**params)) for rid, prompt in PROMPTS.items()}


@pytest.mark.parametrize("params", [dict(max_new_tokens=9, min_new_tokens=2, ignore_eos=True),
                                    dict(max_new_tokens=30, min_new_tokens=2)], ids=["fixed", "eos"])
def test_tokens_equal_the_native_backends(tiny, serve, params):
    url, _ = serve()
    requests = requests_of(**params)
    want = tokens(drive(NativeBackend(tiny, max_batch=3, max_seq_len=MAX_SEQ_LEN), requests))
    with OpenAIBackend([url], "tiny", max_concurrency=3, timeout_s=30, retries=0, tokenizer=tiny.tokenizer) as b:
        got = tokens(drive(b, requests))
        stats = b.stats()
    assert got == want
    assert stats["requests"] == stats["completed"] == len(PROMPTS)
    assert stats["failures"] == stats["token_count_mismatches"] == stats["usage_missing"] == 0
    assert stats["token_ids_from"] == {"server": len(PROMPTS), "retokenized": 0}


@pytest.mark.parametrize("routing", ["round_robin", "least_outstanding"])
def test_requests_spread_over_two_servers(tiny, serve, routing):
    urls = [serve()[0], serve()[0]]
    requests = requests_of(max_new_tokens=5, ignore_eos=True)
    want = tokens(drive(NativeBackend(tiny, max_batch=4, max_seq_len=MAX_SEQ_LEN), requests))
    with OpenAIBackend(urls, "tiny", max_concurrency=4, timeout_s=30, retries=0, routing=routing) as b:
        assert tokens(drive(b, requests)) == want
        per_endpoint = b.stats()["attempts_per_endpoint"]
    if routing == "round_robin":
        assert per_endpoint == {urls[0]: 3, urls[1]: 3}
    else:
        assert sum(per_endpoint.values()) == 6 and min(per_endpoint.values()) >= 1


def test_killed_server_fails_requests_with_reasons_and_final_events(serve):
    url, stop = serve()
    n, max_new, timeout_s = 8, 120, 5
    pending = [(i, prompt_of(4, seed=i)) for i in range(n)]
    events = {i: [] for i in range(n)}
    b = OpenAIBackend([url], "tiny", max_concurrency=4, timeout_s=timeout_s, retries=1)
    killed = None
    while pending or b.has_unfinished():
        while pending and b.free_slots > 0:
            rid, prompt = pending.pop(0)
            b.add_request(rid, prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
        for ev in b.step():
            events[ev.request_id].append(ev)
        # Kill the server once a first token is out: four requests are mid-stream, four wait.
        if killed is None and any(events.values()):
            stop()
            killed = time.monotonic()
        assert killed is None or time.monotonic() - killed < 30, "requests did not end after the kill"
    b.close()
    stats = b.stats()
    # Every request ended with a final event: the full answer, or what LoadGen already had
    # (nothing, or the first token) and one placeholder token.
    assert all(evs[-1].finished and len(evs) in (1, 2, max_new) for evs in events.values())
    assert stats["failures"] >= 4 and stats["completed"] + stats["failures"] == n
    assert sum(stats["failure_reasons"].values()) == stats["failures"]
    assert any("ConnectionRefused" in r for r in stats["failure_reasons"]), stats["failure_reasons"]
    # Refused connections are retried once; a broken stream is not (LoadGen has its first token).
    assert stats["retries"] >= 4
    assert [e["reason"] for e in stats["failure_examples"]] and len(stats["failure_examples"]) <= 10


def test_silent_server_times_out_and_the_request_still_finishes():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    # Connections complete in the backlog; nothing ever answers them.
    listener.listen(16)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with OpenAIBackend([url], "m", max_concurrency=2, timeout_s=0.5, retries=1) as b:
            t0 = time.monotonic()
            events = drive(b, {1: ([5, 6], SamplingParams(max_new_tokens=4))}, deadline_s=10)
            elapsed = time.monotonic() - t0
            stats = b.stats()
    finally:
        listener.close()
    assert [(e.index, e.finished) for e in events[1]] == [(1, False), (2, True)]  # two placeholders
    assert elapsed < 3
    assert stats["failure_reasons"] == {"timeout: no data within 0.5 s": 1} and stats["retries"] == 1


def test_api_key_goes_in_the_header_and_nowhere_else(monkeypatch):
    secret = "sk-test-8d1f0c9e7b"
    monkeypatch.setenv("WALLPERF_TEST_KEY", secret)
    server, url, stop = start_mock_server()
    try:
        with OpenAIBackend([url], "mock", max_concurrency=2, timeout_s=10, retries=0,
                           api_key_env="WALLPERF_TEST_KEY") as b:
            drive(b, {1: ([5], SamplingParams(max_new_tokens=3)), 2: ([6], SamplingParams(max_new_tokens=3))})
            assert secret not in repr(b) and secret not in json.dumps(b.stats())
    finally:
        stop()
    assert server.authorization == [f"Bearer {secret}"] * 2


def test_text_only_stream_is_retokenized(tiny):
    # Each token's text is one character, which the tiny tokenizer maps back to one id.
    _, url, stop = start_mock_server(MockOptions(token_ids=False, token_text="a"))
    try:
        with OpenAIBackend([url], "mock", max_concurrency=2, timeout_s=10, retries=0,
                           tokenizer=tiny.tokenizer) as b:
            got = tokens(drive(b, {1: ([5], SamplingParams(max_new_tokens=6))}))
            stats = b.stats()
    finally:
        stop()
    assert got == {1: tiny.tokenizer.encode("a") * 6}
    assert stats["token_ids_from"] == {"server": 0, "retokenized": 1} and stats["token_count_mismatches"] == 0


def test_retokenized_count_off_from_usage_is_recorded(tiny):
    # Two characters per token, with no merge for them: twice the ids the usage counts.
    _, url, stop = start_mock_server(MockOptions(token_ids=False, token_text="ab"))
    try:
        with OpenAIBackend([url], "mock", max_concurrency=1, timeout_s=10, retries=0,
                           tokenizer=tiny.tokenizer) as b:
            drive(b, {1: ([5], SamplingParams(max_new_tokens=4))})
            stats = b.stats()
    finally:
        stop()
    assert stats["token_count_mismatches"] == 1
    assert stats["mismatch_examples"] == [{"request_id": 1, "streamed": 8, "usage": 4}]


def test_server_refusing_token_ids_gets_text(tiny):
    server, url, stop = start_mock_server(MockOptions(accept_token_prompts=False))
    try:
        with OpenAIBackend([url], "mock", max_concurrency=1, timeout_s=10, retries=0,
                           tokenizer=tiny.tokenizer) as b:
            got = tokens(drive(b, {1: ([5, 6], SamplingParams(max_new_tokens=3)),
                                   2: ([7], SamplingParams(max_new_tokens=3))}))
            stats = b.stats()
    finally:
        stop()
    assert got == {1: mock_token_ids(3), 2: mock_token_ids(3)}
    assert stats["text_prompt_fallbacks"] == 1 and stats["failures"] == 0
    # One refused request with ids, then text only.
    assert len(server.authorization) == 3


def test_loadgen_gets_every_answer_through_the_backend(tmp_path, tiny, serve):
    """The backend under the real LoadGen adapter (Server, accuracy mode): the accuracy
    log holds exactly the native engine's tokens for every sample."""
    import mlperf_loadgen as lg
    import numpy as np

    from wallperf.harness.loadgen.qsl import LoadGenQSL
    from wallperf.harness.loadgen.settings import log_settings
    from wallperf.sut.adapter import LoadGenSUT
    from wallperf.sut.queues import queue_for

    url, _ = serve()
    prompts = [np.array(p, dtype=np.int32) for p in PROMPTS.values()]
    params = SamplingParams(max_new_tokens=7, min_new_tokens=2, ignore_eos=True)
    want = tokens(drive(NativeBackend(tiny, max_batch=2, max_seq_len=MAX_SEQ_LEN),
                        {i: (p, params) for i, p in enumerate(prompts)}))
    settings = lg.TestSettings()
    settings.scenario, settings.mode = lg.TestScenario.Server, lg.TestMode.AccuracyOnly
    settings.use_token_latencies, settings.server_target_qps = True, 50
    backend = OpenAIBackend([url], "tiny", max_concurrency=2, timeout_s=30, retries=0)
    with backend, LoadGenQSL(len(prompts), len(prompts)) as qsl, \
            LoadGenSUT(backend, queue_for("Server", [len(p) for p in prompts]), prompts, params, True) as sut:
        sut.run_test(lambda: lg.StartTestWithLogSettings(sut.handle, qsl.handle, settings, log_settings(tmp_path)))
    assert sut.stats.error is None and backend.stats()["failures"] == 0
    entries = json.loads((tmp_path / "mlperf_log_accuracy.json").read_text())
    got = {e["qsl_idx"]: np.frombuffer(bytes.fromhex(e["data"]), dtype="<i4").tolist() for e in entries}
    assert got == want
    assert all(e["token_count"] == 7 for e in entries)


def test_an_endpoint_shows_only_scheme_host_port_and_path():
    """User-info with reserved characters and a query key: the request still reaches the
    host, and nothing of the credentials is in repr, stats or failure reasons."""
    server, url, stop = start_mock_server()
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    messy = f"http://bob:p@ss/w#rd?x\"y z@{host_port}/v1?api_key=qk-0123456789"
    try:
        with OpenAIBackend([messy], "mock", max_concurrency=1, timeout_s=10, retries=0) as b:
            drive(b, {1: ([5], SamplingParams(max_new_tokens=3))})
            shown = repr(b) + json.dumps(b.stats())
    finally:
        stop()
    assert f"http://{host_port}/v1" in shown and b.stats()["completed"] == 1
    for secret in ("p@ss", "w#rd", 'x"y z', "bob", "qk-0123456789", "api_key"):
        assert secret not in shown, secret
