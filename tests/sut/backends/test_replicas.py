"""sut.backends.replicas: two `wallperf serve` replicas of a tiny model as one backend,
driven as the LoadGen adapter drives any backend. The references: the native
engine's greedy tokens for the same prompts, and a port that refuses every
connection (its requests, and only its, must fail, on it)."""
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from test_server import MAX_SEQ_LEN, prompt_of, tiny_loaded_model  # noqa: E402

from wallperf.sut.backends.native import NativeBackend  # noqa: E402
from wallperf.sut.backends.replicas import ReplicaBackend  # noqa: E402
from wallperf.sut.engine.engine import SamplingParams  # noqa: E402
from wallperf.sut.serving.server import start_server  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PARAMS = SamplingParams(max_new_tokens=7, min_new_tokens=2, ignore_eos=True)
PROMPTS = {10 + i: prompt_of(2 + 3 * i, seed=i) for i in range(8)}


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded_model()[0]


@pytest.fixture(scope="module")
def urls(tiny):
    started = [start_server(tiny, "127.0.0.1", 0, max_batch=4, max_seq_len=MAX_SEQ_LEN, model_name="tiny")
               for _ in range(2)]
    yield [url for _, url, _ in started]
    for _, _, stop in started:
        stop()


def drive(backend) -> dict:
    pending, out = list(PROMPTS.items()), {rid: [] for rid in PROMPTS}
    end = time.monotonic() + 60
    while pending or backend.has_unfinished():
        assert time.monotonic() < end
        while pending and backend.free_slots > 0:
            rid, prompt = pending.pop(0)
            backend.add_request(rid, prompt, PARAMS)
        for ev in backend.step():
            out[ev.request_id].append(ev.token_id)
    return out


def test_replicas_answer_as_the_native_engine_and_count_per_replica(tiny, urls):
    want = drive(NativeBackend(tiny, max_batch=4, max_seq_len=MAX_SEQ_LEN))
    with ReplicaBackend(urls, "tiny", max_concurrency=4, retries=0, tokenizer=tiny.tokenizer) as b:
        got = drive(b)
        stats = b.stats()
    assert got == want
    per = stats["replicas"]
    assert set(per) == set(urls)
    assert sum(r["requests"] for r in per.values()) == stats["requests"] == len(PROMPTS)
    assert all(r["completed"] > 0 and r["ttft_ms"] is not None for r in per.values())
    assert stats["failures"] == 0


def test_a_failing_replica_fails_its_own_requests_only(tiny, urls):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with ReplicaBackend([urls[0], dead], "tiny", max_concurrency=2, retries=1, tokenizer=tiny.tokenizer) as b:
        drive(b)
        stats = b.stats()
    bad, good = stats["replicas"][dead], stats["replicas"][urls[0]]
    assert bad["failures"] == bad["requests"] > 0 and bad["completed"] == 0
    assert good["failures"] == 0 and good["completed"] == good["requests"]
    assert stats["failures"] == bad["requests"] and bad["requests"] + good["requests"] == len(PROMPTS)
    # Retried on its own replica (retries=1), never on the other one.
    assert stats["attempts_per_endpoint"][urls[0]] == good["requests"]
