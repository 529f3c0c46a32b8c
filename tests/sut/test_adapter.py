"""The LoadGen SUT adapter under real LoadGen, with a scripted backend.

The backend emits token (sample_index * 10 + step) so every response can be
checked against what it must contain; LoadGen's own accuracy log is the record.
"""
import json

import mlperf_loadgen as lg
import numpy as np
import pytest

from wallperf.harness.loadgen.qsl import LoadGenQSL
from wallperf.harness.loadgen.settings import log_settings
from wallperf.sut.adapter import LoadGenSUT
from wallperf.sut.engine.engine import SamplingParams, TokenEvent
from wallperf.sut.queues import queue_for


class ScriptedBackend:
    """Emits one token per running request per step; fails on request if asked."""

    def __init__(self, max_batch, fail_after_steps=None):
        self.max_batch, self.running, self.steps = max_batch, {}, 0
        self.fail_after_steps = fail_after_steps
        self.peak_batch = 0

    @property
    def free_slots(self):
        return self.max_batch - len(self.running)

    def has_unfinished(self):
        return bool(self.running)

    def add_request(self, request_id, prompt_ids, params):
        self.running[request_id] = [int(prompt_ids[0]), params, 0]

    def step(self):
        self.steps += 1
        if self.fail_after_steps is not None and self.steps > self.fail_after_steps:
            raise RuntimeError("device lost")
        self.peak_batch = max(self.peak_batch, len(self.running))
        events = []
        for rid, state in list(self.running.items()):
            state[2] += 1
            done = state[2] >= state[1].max_new_tokens
            events.append(TokenEvent(rid, state[0] * 10 + state[2], state[2], done))
            if done:
                del self.running[rid]
        return events


def run_loadgen(tmp_path, scenario, backend, n_samples=8, max_new_tokens=4, params=None):
    prompts = [np.array([i], dtype=np.int32) for i in range(n_samples)]
    settings = lg.TestSettings()
    settings.scenario = {"Server": lg.TestScenario.Server, "Offline": lg.TestScenario.Offline,
                         "SingleStream": lg.TestScenario.SingleStream}[scenario]
    settings.mode = lg.TestMode.AccuracyOnly
    settings.use_token_latencies = True
    settings.server_target_qps = 200
    settings.offline_expected_qps = 100
    params = params or SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=2)
    with LoadGenQSL(n_samples, n_samples) as qsl, \
            LoadGenSUT(backend, queue_for(scenario, [1] * n_samples), prompts, params,
                       report_first_token=scenario != "Offline") as sut:
        sut.run_test(lambda: lg.StartTestWithLogSettings(sut.handle, qsl.handle, settings, log_settings(tmp_path)))
    return sut, json.loads((tmp_path / "mlperf_log_accuracy.json").read_text())


@pytest.mark.parametrize("scenario", ["Server", "SingleStream", "Offline"])
def test_every_sample_answered_with_all_its_tokens(tmp_path, scenario):
    backend = ScriptedBackend(max_batch=1 if scenario == "SingleStream" else 4)
    sut, entries = run_loadgen(tmp_path, scenario, backend)
    assert sut.stats.error is None
    assert sorted(e["qsl_idx"] for e in entries) == list(range(8))
    for e in entries:
        tokens = np.frombuffer(bytes.fromhex(e["data"]), dtype="<i4").tolist()
        i = e["qsl_idx"]
        assert tokens == [i * 10 + k for k in (1, 2, 3, 4)]
        assert e["token_count"] == 4
        if scenario == "Offline":
            assert "token_data" not in e
        else:
            # LoadGen logs what FirstTokenComplete carried: the first token.
            first = np.frombuffer(bytes.fromhex(e["token_data"]), dtype="<i4").tolist()
            assert first == [i * 10 + 1]
    detail = (tmp_path / "mlperf_log_detail.txt").read_text()
    assert '"is_error": true' not in detail
    if scenario == "SingleStream":
        assert backend.peak_batch == 1


def test_backend_failure_ends_the_test_and_is_reported(tmp_path):
    backend = ScriptedBackend(max_batch=4, fail_after_steps=3)
    sut, entries = run_loadgen(tmp_path, "Server", backend)
    assert sut.stats.error == "RuntimeError: device lost"
    # LoadGen still got an answer for every sample, so the test could end.
    assert sorted(e["qsl_idx"] for e in entries) == list(range(8))


@pytest.mark.parametrize("scenario", ["Server", "Offline"])
def test_per_sample_lengths_and_each_querys_timing(tmp_path, scenario):
    lengths = [2, 3, 4, 5, 6, 7, 8, 9]
    params = [SamplingParams(max_new_tokens=n, min_new_tokens=n, ignore_eos=True) for n in lengths]
    sut, entries = run_loadgen(tmp_path, scenario, ScriptedBackend(max_batch=3), params=params)
    assert {e["qsl_idx"]: e["token_count"] for e in entries} == dict(enumerate(lengths))
    assert sorted(q.sample_index for q in sut.queries.values()) == list(range(8))
    for q in sut.queries.values():
        assert q.n_tokens == lengths[q.sample_index]
        assert q.issued <= q.first_token <= q.done
        assert q.tpot_s == pytest.approx((q.done - q.first_token) / (q.n_tokens - 1))
