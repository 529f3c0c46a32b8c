"""A short calibration on the machine: the load settings of a run's performance
tests chosen from measured speed, as submitters tune them by hand.

LoadGen judges a performance test VALID only if it ran for min_duration, issued
min_query_count queries, met its latency limits, and processed enough queries for
early stopping. Fixed settings cannot do that on machines of different speeds: an
Offline run whose expected QPS is too low finishes its samples before min_duration,
a SingleStream run on a slow machine completes too few queries, and a Server run at
a fixed QPS is either too light to gather enough queries or too heavy for its limits.

So before the tests, the engine runs the run's own prompts three ways (each on a
fresh backend, as the tests get): one request alone (SingleStream's latency), and
a full batch at Offline's and at Server's max_batch (their throughputs, in samples
per second). Offline's batch is admitted shortest prompt first, as its queue
(sut.queues) admits the one big query, so that its prefill pads as little as the
test's does; Server's comes in the data set's order, as arrivals do. From those:

- Offline: `offline_expected_qps` = OFFLINE_MARGIN x the measured throughput, so
  LoadGen issues enough samples to outlast min_duration even though a whole test
  runs faster than one batch from a cold start (its batches refill as sequences
  finish, over all samples sorted by length: on a 2-core VM the default run's
  Offline test ran 1.2x the sorted batch's rate, and 1.45-1.65x an unsorted one's,
  which left a 1.5x margin short of min_duration). The test then lasts about
  1.1 x OFFLINE_MARGIN x min_duration at the measured rate.
- SingleStream: `expected_latency_ms` = the measured latency, and
  `min_query_count` = SINGLE_STREAM_QUERIES, above the 64 queries LoadGen's early
  stopping needs to judge the 90th percentile (TTFT and TPOT alike).
- Server (and Interactive): `target_qps` = SERVER_LOAD x the measured throughput at
  its batch, light enough for its latency limits, and `min_query_count` =
  SERVER_QUERIES, above the ~460 queries with none over the limits that early
  stopping needs to judge the 99th percentiles; a test then lasts
  SERVER_QUERIES / target_qps.

The settings scale with the measured speed, so the tests stay VALID on machines
from half to four times as fast as the one these constants were chosen on, within
BUDGET_S for the default run (tests/harness/driver/test_calibrate.py shows the range
on a slowed and a sped-up fake backend). What was measured and chosen is printed
and recorded in results.json (`calibration`).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from wallperf.harness.config import ScenarioConfig
from wallperf.sut.scenarios import OFFLINE, SINGLE_STREAM, scenario
from wallperf.driver.progress import say

OFFLINE_MARGIN = 2.0
SINGLE_STREAM_QUERIES = 80
SERVER_QUERIES = 480
SERVER_LOAD = 0.6
# The most of its measured throughput a Server test is asked to carry to fit the budget.
SERVER_MAX_LOAD = 0.85
# The default run's performance tests, all of them, should fit in this.
BUDGET_S = 600.0


@dataclass(frozen=True)
class Measurement:
    """What the calibration measured: seconds for one request alone, samples/s per batch size."""

    single_stream_latency_s: float
    throughput: dict  # max_batch -> samples per second
    seconds: float  # the calibration's own time

    def to_dict(self) -> dict:
        return {"single_stream_latency_s": self.single_stream_latency_s,
                "throughput_samples_per_second": {str(b): q for b, q in self.throughput.items()},
                "seconds": self.seconds}


@dataclass(frozen=True)
class Calibration:
    measurement: Measurement
    scenarios: tuple  # the ScenarioConfigs with their calibrated settings
    predicted_s: dict  # scenario -> predicted duration of its performance test

    def to_dict(self) -> dict:
        """results.json's `calibration`."""
        return {"measured": self.measurement.to_dict(),
                "settings": {sc.name: _settings(sc) for sc in self.scenarios},
                "predicted_performance_s": self.predicted_s}

    def summary(self) -> str:
        m = self.measurement
        measured = [f"one request {1e3 * m.single_stream_latency_s:.0f} ms",
                    *(f"{q:.2f} samples/s at batch {b}" for b, q in m.throughput.items())]
        parts = [f"calibrated in {m.seconds:.1f} s: {', '.join(measured)}"]
        for sc in self.scenarios:
            settings = ", ".join(f"{k} {v:g}" for k, v in _settings(sc).items())
            parts.append(f"{sc.name}: {settings} (about {self.predicted_s[sc.name]:.0f} s)")
        total = sum(self.predicted_s.values())
        if total > BUDGET_S:
            parts.append(f"this machine is slower than the settings were made for: the performance tests "
                         f"will take about {total / 60:.0f} minutes")
        return "; ".join(parts)


def _settings(sc: ScenarioConfig) -> dict:
    kind = scenario(sc.name)
    load = (("offline_expected_qps",) if kind is OFFLINE else ("expected_latency_ms",) if kind is SINGLE_STREAM
            else ("target_qps",) if kind.server_like else ())
    return {k: getattr(sc, k) for k in (*load, "min_query_count")}


def batch_throughput(make_backend, prompts, params, batch: int, shortest_first: bool = False) -> float:
    """Samples per second of `batch` requests decoded together from one start: the
    first `batch` prompts (cycled), admitted in that order or `shortest_first`."""
    chosen = [prompts[i % len(prompts)] for i in range(batch)]
    if shortest_first:
        chosen.sort(key=len)
    backend = make_backend(batch)
    try:
        for i, prompt in enumerate(chosen):
            backend.add_request(i, prompt, params)
        start = time.perf_counter()
        while backend.has_unfinished():
            backend.step()
        return batch / (time.perf_counter() - start)
    finally:
        if hasattr(backend, "close"):
            backend.close()


def measure(make_backend, prompts, params, batches, sorted_batches=()) -> Measurement:
    """One request alone (after one to warm up), then each batch size in `batches`,
    those in `sorted_batches` admitted shortest prompt first."""
    started = time.perf_counter()
    batch_throughput(make_backend, prompts, params, 1)
    latency = 1 / batch_throughput(make_backend, prompts, params, 1)
    throughput = {b: batch_throughput(make_backend, prompts, params, b, shortest_first=b in sorted_batches)
                  for b in sorted(set(batches))}
    return Measurement(latency, throughput, time.perf_counter() - started)


def choose(scenarios, m: Measurement, budget_s: float = BUDGET_S) -> Calibration:
    """Calibrated scenario configs for measurement `m` (see the module docstring)."""
    chosen, predicted = [], {}
    others = 0.0
    for sc in scenarios:
        kind = scenario(sc.name)
        if kind is OFFLINE:
            qps = OFFLINE_MARGIN * m.throughput[sc.max_batch]
            sc = dataclasses.replace(sc, offline_expected_qps=round(qps, 3))
            predicted[sc.name] = 1.1 * qps * sc.min_duration_s / m.throughput[sc.max_batch]
        elif kind is SINGLE_STREAM:
            queries = max(sc.min_query_count, SINGLE_STREAM_QUERIES)
            sc = dataclasses.replace(sc, expected_latency_ms=round(1e3 * m.single_stream_latency_s, 1),
                                     min_query_count=queries)
            predicted[sc.name] = max(sc.min_duration_s, queries * m.single_stream_latency_s)
        elif not kind.server_like:
            predicted[sc.name] = sc.min_duration_s
        if not kind.server_like:
            others += predicted[sc.name]
        chosen.append(sc)
    server = [i for i, sc in enumerate(chosen) if scenario(sc.name).server_like]
    for i in server:
        sc = chosen[i]
        capacity = m.throughput[sc.max_batch]
        queries = max(sc.min_query_count, SERVER_QUERIES)
        # The load that fits this test's share of what the budget leaves, within the bounds.
        share = max(budget_s - others, 1.0) / len(server)
        load = min(max(SERVER_LOAD, queries / share / capacity), SERVER_MAX_LOAD)
        qps = round(load * capacity, 3)
        chosen[i] = dataclasses.replace(sc, target_qps=qps, min_query_count=queries)
        predicted[sc.name] = max(sc.min_duration_s, queries / qps)
    return Calibration(m, tuple(chosen), {k: round(v, 1) for k, v in predicted.items()})


def calibrate(scenarios, make_backend, prompts, params) -> Calibration:
    """Measure this machine through `make_backend(max_batch)` and choose the settings."""
    batches = [sc.max_batch for sc in scenarios if scenario(sc.name) is OFFLINE or scenario(sc.name).server_like]
    # Offline's batch is admitted as its queue admits; a Server test sharing its batch size
    # then gets the sorted (faster) rate, bounded by SERVER_LOAD's margin.
    offline = {sc.max_batch for sc in scenarios if scenario(sc.name) is OFFLINE}
    return choose(scenarios, measure(make_backend, prompts, params, batches, sorted_batches=offline))


def calibrated_run(resolved, opts, make_backend, prompts, params):
    """(the run with calibrated scenarios, the Calibration), or (the run as it is, None)
    when the run asked for none (opts.calibrate), measures nothing, leads other ranks, or
    drives a remote server (whose load is its operator's to set)."""
    run = resolved.run
    if not opts.calibrate or "performance" not in run.modes or run.tp > 1 or run.backend == "openai":
        return resolved, None
    scenarios = [sc for sc in resolved.scenarios if not (opts.find_peak and scenario(sc.name).server_like)]
    say("calibrating the performance tests' load on this machine (--no-calibrate keeps the YAML's)")
    calibration = calibrate(scenarios, make_backend, prompts, params)
    say(calibration.summary())
    by_name = {sc.name: sc for sc in calibration.scenarios}
    return (dataclasses.replace(resolved, scenarios=tuple(by_name.get(sc.name, sc) for sc in resolved.scenarios)),
            calibration)
