"""The time-to-first-token path under real LoadGen: FirstTokenComplete goes out at the
step that produced the first token, long before the request finishes, and LoadGen's
own detail log then shows a TTFT median below the latency median.

A spy backend (conftest's StepBackend) takes STEP_S per step and emits one token per
running request, so a request of N tokens takes N steps; it records what each request
has emitted, and the LoadGen calls are wrapped to note when each was made. An adapter that reported the
first token only at completion (TTFT = the whole latency) fails both tests.
"""
import json
import time

import mlperf_loadgen as lg
import numpy as np
import pytest

from wallperf.harness.loadgen.qsl import LoadGenQSL
from wallperf.harness.loadgen.settings import log_settings
from wallperf.sut.adapter import LoadGenSUT
from wallperf.sut.engine.engine import SamplingParams
from wallperf.sut.queues import queue_for

STEP_S = 0.01
TOKENS = 8


class Calls(list):
    """(kind, time, query id, tokens the backend had emitted for it) of every response sent."""

    backend = None


@pytest.fixture
def calls(monkeypatch) -> Calls:
    log = Calls()

    def spy(kind, real):
        def wrapped(responses):
            now = time.monotonic()
            for r in responses:
                log.append((kind, now, r.id, log.backend.emitted.get(r.id)))
            return real(responses)
        return wrapped

    monkeypatch.setattr(lg, "FirstTokenComplete", spy("first", lg.FirstTokenComplete))
    monkeypatch.setattr(lg, "QuerySamplesComplete", spy("complete", lg.QuerySamplesComplete))
    return log


def run_server(tmp_path, calls: Calls, step_backend, n: int = 16) -> None:
    """A real LoadGen Server test (token latencies) over the spy backend."""
    calls.backend = step_backend(max_batch=4, step_seconds=lambda batch: STEP_S)
    prompts = [np.array([i + 1], dtype=np.int32) for i in range(n)]
    settings = lg.TestSettings()
    settings.scenario = lg.TestScenario.Server
    settings.mode = lg.TestMode.PerformanceOnly
    settings.use_token_latencies = True
    settings.server_target_qps = 10
    settings.ttft_latency = 2_000_000_000
    settings.tpot_latency = 200_000_000
    settings.min_duration_ms = 1000
    settings.min_query_count = 12
    params = SamplingParams(max_new_tokens=TOKENS, min_new_tokens=TOKENS, ignore_eos=True)
    with LoadGenQSL(n, n) as qsl, \
            LoadGenSUT(calls.backend, queue_for("Server", [1] * n), prompts, params, report_first_token=True) as sut:
        sut.run_test(lambda: lg.StartTestWithLogSettings(sut.handle, qsl.handle, settings, log_settings(tmp_path)))
    assert sut.stats.error is None


def _detail(tmp_path) -> dict:
    values = {}
    for line in (tmp_path / "mlperf_log_detail.txt").read_text().splitlines():
        if line.startswith(":::MLLOG "):
            entry = json.loads(line[len(":::MLLOG "):])
            values[entry["key"]] = entry["value"]
    return values


def test_first_token_is_sent_at_the_first_token(tmp_path, calls, step_backend):
    run_server(tmp_path, calls, step_backend)
    first = {qid: (t, emitted) for kind, t, qid, emitted in calls if kind == "first"}
    complete = {qid: (t, emitted) for kind, t, qid, emitted in calls if kind == "complete"}
    assert complete and first.keys() == complete.keys()
    for qid, (t_first, emitted_then) in first.items():
        # Sent while the backend had emitted exactly one token of this request...
        assert emitted_then == 1, f"query {qid}: first token reported after {emitted_then} tokens"
        t_done, emitted_at_end = complete[qid]
        assert emitted_at_end == TOKENS
        # ...and the other TOKENS - 1 steps (STEP_S each, slept) came after it.
        assert t_done - t_first >= (TOKENS - 1) * STEP_S * 0.9


def test_detail_log_ttft_median_is_below_the_latency_median(tmp_path, calls, step_backend):
    run_server(tmp_path, calls, step_backend)
    detail = _detail(tmp_path)
    ttft_p50 = detail["result_first_token_50.00_percentile_latency_ns"]
    latency_p50 = detail["result_50.00_percentile_latency_ns"]
    # Latency covers TOKENS steps, TTFT about one (plus queueing): far apart, not a rounding.
    assert ttft_p50 < latency_p50 - (TOKENS - 2) * STEP_S * 1e9
