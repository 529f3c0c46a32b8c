"""The calibration on machines from half to four times as fast as the one its constants
were chosen on, played by a fake backend slowed down or sped up.

The fake (conftest's StepBackend) decodes one token per running request per step; a
step over a batch of b takes (STEP_S + PER_ROW_S * b) / speed, so at speed 1 one request decodes at ~5.3 ms
per token like SmolLM2 on a 2-core VM. First with a virtual clock, against
LoadGen's rules restated here (Offline must outlast min_duration, SingleStream needs
64 queries and Server ~460 for early stopping) and the 10-minute budget; then under
real LoadGen at 1/10 of the time scale (steps and min_duration), where every
performance test must come out VALID (about 25 s, so marked slow). The latency
limits keep their real values there: scaled down too, a stall of a shared machine
would decide the verdict.
"""
import dataclasses
import json

import mlperf_loadgen as lg
import numpy as np
import pytest

from wallperf.harness.config import load_run, load_scenario_config
from wallperf.driver import calibrate as calibrate_module
from wallperf.driver.calibrate import calibrate, calibrated_run
from wallperf.driver.options import RunOptions
from wallperf.harness.loadgen.qsl import LoadGenQSL
from wallperf.harness.loadgen.settings import build_test_settings, log_settings
from wallperf.sut.adapter import LoadGenSUT
from wallperf.sut.engine.engine import SamplingParams
from wallperf.sut.queues import queue_for

STEP_S, PER_ROW_S = 0.0048, 0.0005
TOKENS = 64
PARAMS = SamplingParams(max_new_tokens=TOKENS, min_new_tokens=TOKENS, ignore_eos=True)
PROMPTS = [np.arange(1, 120 + i, dtype=np.int32) for i in range(57)]
# What early stopping needs, at the least (LoadGen's messages: 64 queries for SingleStream's 90th
# percentile; about 460 with none over the limits for Server's 99th).
EARLY_STOPPING = {"SingleStream": 64, "Server": 460}
# The default run's 57 accuracy samples, the model load and the wall measurement come on top.
OTHER_WORK_S = 120.0


def fake(step_backend, batch, speed, clock=None, scale=1.0):
    """The machine played at `speed`: a step over b requests takes (STEP_S + PER_ROW_S * b) / speed."""
    return step_backend(batch, lambda b: (STEP_S + PER_ROW_S * b) / speed * scale, clock)


def default_scenarios():
    return [load_scenario_config(name) for name in ("Offline", "Server", "SingleStream")]


@pytest.mark.parametrize("speed", [0.5, 1.0, 2.0, 4.0])
def test_settings_meet_loadgens_rules_within_the_budget(speed, monkeypatch, step_backend):
    clock = [0.0]
    monkeypatch.setattr(calibrate_module.time, "perf_counter", lambda: clock[0])
    cal = calibrate(default_scenarios(), lambda b: fake(step_backend, b, speed, clock), PROMPTS, PARAMS)
    by_name = {sc.name: sc for sc in cal.scenarios}
    m = cal.measurement
    # The fake's own speeds, by hand: one request takes 64 steps of (STEP_S + PER_ROW_S) / speed.
    assert m.single_stream_latency_s == pytest.approx(TOKENS * (STEP_S + PER_ROW_S) / speed)
    offline_rate = 32 / (TOKENS * (STEP_S + 32 * PER_ROW_S) / speed)
    server_rate = 16 / (TOKENS * (STEP_S + 16 * PER_ROW_S) / speed)
    assert m.throughput == {16: pytest.approx(server_rate), 32: pytest.approx(offline_rate)}

    offline = by_name["Offline"]
    # LoadGen issues expected QPS x min_duration samples: a machine 30% faster than measured still
    # takes longer than min_duration to finish them.
    assert offline.offline_expected_qps * offline.min_duration_s / (1.3 * offline_rate) > offline.min_duration_s
    single = by_name["SingleStream"]
    assert single.min_query_count >= EARLY_STOPPING["SingleStream"]
    assert single.expected_latency_ms == pytest.approx(1e3 * m.single_stream_latency_s, rel=1e-3)
    server = by_name["Server"]
    assert server.min_query_count >= EARLY_STOPPING["Server"]
    assert server.target_qps <= 0.85 * server_rate  # load the latency limits can bear
    durations = {
        "Offline": 1.1 * offline.offline_expected_qps * offline.min_duration_s / offline_rate,
        "SingleStream": max(single.min_duration_s, single.min_query_count * m.single_stream_latency_s),
        "Server": max(server.min_duration_s, server.min_query_count / server.target_qps),
    }
    assert cal.predicted_s == pytest.approx(durations, rel=1e-2)
    assert sum(durations.values()) + m.seconds + OTHER_WORK_S <= 600


def _detail(log_dir) -> dict:
    values = {}
    for line in (log_dir / "mlperf_log_detail.txt").read_text().splitlines():
        if line.startswith(":::MLLOG "):
            entry = json.loads(line[len(":::MLLOG "):])
            values[entry["key"]] = entry["value"]
    return values


@pytest.mark.slow
@pytest.mark.parametrize("speed", [0.5, 4.0])
def test_calibrated_tests_are_valid_under_loadgen(speed, tmp_path, step_backend):
    scale = 1 / 10  # the fake's steps and the tests' min_duration

    def scaled(sc):
        return dataclasses.replace(sc, min_duration_s=sc.min_duration_s * scale)

    def make(batch):
        return fake(step_backend, batch, speed, scale=scale)

    cal = calibrate([scaled(sc) for sc in default_scenarios()], make, PROMPTS, PARAMS)
    for sc in cal.scenarios:
        log_dir = tmp_path / sc.name
        log_dir.mkdir()
        settings = build_test_settings(sc, "performance", "llama3_1-8b", len(PROMPTS))
        backend = make(1 if sc.name == "SingleStream" else sc.max_batch)
        with LoadGenQSL(len(PROMPTS), len(PROMPTS)) as qsl, \
                LoadGenSUT(backend, queue_for(sc.name, [len(p) for p in PROMPTS]), PROMPTS, PARAMS,
                           report_first_token=sc.name != "Offline") as sut:
            sut.run_test(lambda: lg.StartTestWithLogSettings(sut.handle, qsl.handle, settings,
                                                             log_settings(log_dir)))
        detail = _detail(log_dir)
        assert detail["result_validity"] == "VALID", (sc.name, speed, {k: v for k, v in detail.items()
                                                                        if "met" in k or "early" in k})


def test_the_run_is_calibrated_unless_it_keeps_its_settings(tmp_path, monkeypatch, step_backend):
    clock = [0.0]
    monkeypatch.setattr(calibrate_module.time, "perf_counter", lambda: clock[0])
    resolved = load_run()  # conf/runs/default.yaml

    def run_with(**options):
        return calibrated_run(resolved, RunOptions(tmp_path, **options), lambda b: fake(step_backend, b, 1.0, clock),
                              PROMPTS, PARAMS)

    assert run_with() == (resolved, None)  # calibrate defaults to off for callers other than the CLI
    calibrated, cal = run_with(calibrate=True)
    assert [sc.name for sc in calibrated.scenarios] == [sc.name for sc in resolved.scenarios]
    assert {sc.name: sc for sc in calibrated.scenarios}["Server"].min_query_count == 464
    assert cal.to_dict()["settings"]["Server"]["min_query_count"] == 464
    # A peak search sets Server's QPS itself: Server keeps the YAML's settings, the others are calibrated.
    searched, cal = run_with(calibrate=True, find_peak=True)
    by_name = {sc.name: sc for sc in searched.scenarios}
    assert by_name["Server"] == {sc.name: sc for sc in resolved.scenarios}["Server"]
    assert by_name["SingleStream"].min_query_count == 64 and "Server" not in cal.to_dict()["settings"]


def test_offlines_batch_is_admitted_shortest_first_and_servers_in_arrival_order(step_backend):
    """Offline's queue sorts its one query by prompt length, so its batches pad little;
    the calibration times Offline's batch the same way, and Server's as arrivals come."""
    admitted = {}

    def make(batch):
        backend = step_backend(batch)
        order = admitted.setdefault(batch, [])
        real_add = backend.add_request
        backend.add_request = lambda rid, prompt, params: (order.append(len(prompt)), real_add(rid, prompt, params))
        return backend

    prompts = [np.arange(n, dtype=np.int32) + 1 for n in (300, 120, 250, 104, 364, 135)]
    scenarios = default_scenarios()
    calibrate(scenarios, make, prompts, PARAMS)
    cycled = [len(prompts[i % len(prompts)]) for i in range(32)]
    assert admitted[32] == sorted(cycled)  # Offline's max_batch
    assert admitted[16] == cycled[:16]  # Server's, in the data set's order


def test_calibration_is_bounded_on_a_slow_machine_and_says_what_it_does(monkeypatch, step_backend, capsys):
    """A machine 500x slower than the fake's baseline (2.6 s a step alone, 10 s at batch 32): each part is
    cut at its share of CALIBRATION_BUDGET_S and extrapolated, which for this fake is exact."""
    clock = [0.0]
    monkeypatch.setattr(calibrate_module.time, "perf_counter", lambda: clock[0])
    speed = 0.002
    cal = calibrate(default_scenarios(), lambda b: fake(step_backend, b, speed, clock), PROMPTS, PARAMS)
    m = cal.measurement
    longest_step = (STEP_S + 32 * PER_ROW_S) / speed
    # Each of the three timed parts may overrun its share by one step; the warm-up is two steps alone.
    assert m.seconds <= calibrate_module.CALIBRATION_BUDGET_S + 3 * longest_step
    assert m.single_stream_latency_s == pytest.approx(TOKENS * (STEP_S + PER_ROW_S) / speed)
    assert m.ttft_s == pytest.approx((STEP_S + PER_ROW_S) / speed)
    for b in (16, 32):
        assert m.throughput[b] == pytest.approx(b / (TOKENS * (STEP_S + b * PER_ROW_S) / speed))
    assert len(m.notes) == 3 and all("cut at" in note for note in m.notes)
    err = capsys.readouterr().err
    for part in ("1/4: a short request to warm up", "2/4: one request alone, 64 tokens",
                 "3/4: a batch of 16, in arrival order", "4/4: a batch of 32, shortest prompt first"):
        assert f"wallperf: calibrating {part}" in err


def test_a_fast_machine_stops_each_batch_once_its_rate_is_known(monkeypatch, step_backend):
    clock = [0.0]
    monkeypatch.setattr(calibrate_module.time, "perf_counter", lambda: clock[0])
    steps = []

    def make(batch):
        backend = fake(step_backend, batch, 1.0, clock)
        real_step = backend.step
        backend.step = lambda: (steps.append(batch), real_step())[1]
        return backend

    calibrate(default_scenarios(), make, PROMPTS, PARAMS)
    # One step for the first tokens, then FULL_STEPS decode steps over the whole batch, not all 64.
    assert steps.count(32) == steps.count(16) == 1 + calibrate_module.FULL_STEPS


class PrefillBackend:
    """Prefills two waiting requests a step (PREFILL_S each) beside decoding the running ones."""

    PREFILL_S, DECODE_S = 2.0, 0.05

    def __init__(self, clock):
        self.clock, self.waiting, self.running = clock, [], {}

    def add_request(self, rid, prompt, params):
        self.waiting.append(rid)

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def step(self):
        from wallperf.sut.engine.engine import TokenEvent

        admitted, self.waiting = self.waiting[:2], self.waiting[2:]
        events = [TokenEvent(rid, 1, k + 1, False) for rid, k in self.running.items()]
        self.running = {rid: k + 1 for rid, k in self.running.items()}
        events += [TokenEvent(rid, 1, 1, False) for rid in admitted]
        self.running.update({rid: 1 for rid in admitted})
        self.clock[0] += self.PREFILL_S * len(admitted) + self.DECODE_S
        return events


def test_a_batch_cut_in_its_prefill_is_extrapolated_and_says_so(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(calibrate_module.time, "perf_counter", lambda: clock[0])
    timing = calibrate_module.time_batch(lambda b: PrefillBackend(clock), PROMPTS, PARAMS, 32, limit_s=20.0,
                                         fallback_step_s=0.3)
    # Cut after 5 steps (4.05 s each, 20.25 s) with 10 of 32 first tokens: the prefill scales to 32, and the
    # step over the whole batch, never seen, is the fallback.
    assert timing.first_token_s == pytest.approx(20.25 * 32 / 10)
    assert timing.step_s == 0.3
    assert timing.seconds == pytest.approx(20.25 * 32 / 10 + (TOKENS - 1) * 0.3)
    assert "cut at 20 s with 10 of 32 first tokens" in timing.note and "no decode step seen" in timing.note


def test_the_lone_requests_ttft_is_the_median_of_three_first_tokens(monkeypatch, step_backend):
    """A first prefill slowed by the machine (one figure 40% high, as seen on a 2-core VM) must
    not set the prefill's cost per token, from which Server's load is played: the lone request's
    prompt is timed twice more on the same backend, and its TTFT is the median."""
    clock = [0.0]
    monkeypatch.setattr(calibrate_module.time, "perf_counter", lambda: clock[0])
    prefills = iter([0.20, 0.21, 0.28])  # two repeats', then the timed request's
    backend = step_backend(1, lambda b: 0.0144, clock)
    real_step = backend.step

    def step():
        if any(backend.emitted[rid] == 0 for rid in backend.running):
            clock[0] += next(prefills)
        return real_step()

    backend.step = step
    timing = calibrate_module.time_batch(lambda b: backend, PROMPTS, PARAMS, 1, min_decode_steps=3,
                                         first_token_repeats=2)
    assert timing.first_token_s == pytest.approx(0.21 + 0.0144)
    assert timing.step_s == pytest.approx(0.0144)
    assert backend.emitted[-1] == backend.emitted[-2] == 1  # the repeats: one token each
    # Without repeats the one TTFT stands.
    assert calibrate_module.time_batch(lambda b: step_backend(1, lambda b: 0.0144, clock), PROMPTS, PARAMS, 1,
                                       first_token_repeats=0).first_token_s == pytest.approx(0.0144)
