"""A short calibration on the machine: how fast the engine runs the run's own
prompts, measured in at most about CALIBRATION_BUDGET_S, from which
wallperf.driver.plan sizes the performance tests, as submitters tune them by hand.

Fixed settings cannot be VALID on machines of different speeds (an Offline run
whose expected QPS is too low finishes before min_duration, a SingleStream run on
a slow machine completes too few queries, a Server run at a fixed QPS is too light
for early stopping or too heavy for its limits), and the run must still fit its
ten minutes. On a 2-core AVX2 VM, where a full batch of 32 MMLU prompts took
minutes to prefill, timing whole batches made the calibration itself take 376 s
with nothing printed. So each part is timed only until it can be extrapolated,
within its share of the budget, and each says what it does as it starts:

1. a short request to warm up (code paths, allocator, the kernel's first build);
2. one request alone (SingleStream): the time to its first token (the median
   of it and FIRST_TOKEN_REPEATS more first tokens of its prompt on the same
   backend), then its median decode step: latency = TTFT + (tokens - 1) x step;
3. a full batch at Offline's and at Server's max_batch (their throughputs):
   the time until every request has its first token (the prefill), then the
   median decode step over the whole batch, stopped after FULL_STEPS of them:
   a batch lasts prefill + (tokens - 1) x step. Offline's batch is admitted
   shortest prompt first, as its queue (sut.queues) admits the one big query;
   Server's in the data set's order, as arrivals come.

A part cut short by its time share is extrapolated and says so (`notes`): the
prefill from the share of requests that had their first token; a decode step
never seen over the whole batch from the widest one seen, and at least one
request's token (its weights read) plus each row's math at what a prompt token
cost in that request's prefill. Each part runs on a fresh backend, as each
test gets.
What was measured is printed and recorded in results.json (`calibration`).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field

from wallperf.driver.plan import Overheads, Plan, plan
from wallperf.driver.progress import Heartbeat, say
from wallperf.sut.backends import backend_spec
from wallperf.sut.scenarios import OFFLINE, scenario

CALIBRATION_BUDGET_S = 60.0
# The single request's share of the budget; the batches share what is left.
SINGLE_SHARE = 0.3
# Decode steps over the whole batch after which its rate is known well enough.
FULL_STEPS = 16
WARMUP_TOKENS = 2
# More first tokens of the lone request's prompt, timed on its warm backend: its TTFT (and
# from it the prefill's cost per prompt token, which sets Server's load) is their median.
# One prefill alone read 278 ms on a 2-core AVX2 VM where the same prompt's steady
# prefill takes 200 ms, and that one figure cut Server's load from ~0.5 to 0.28.
FIRST_TOKEN_REPEATS = 2


@dataclass(frozen=True)
class BatchTiming:
    """One batch of requests decoded together from one start."""

    batch: int
    first_token_s: float  # until every request had its first token
    step_s: float  # one decode step over the whole batch
    tokens: int  # per request
    note: str | None = None  # how it was extrapolated, when cut short

    @property
    def seconds(self) -> float:
        return self.first_token_s + (self.tokens - 1) * self.step_s

    @property
    def samples_per_second(self) -> float:
        return self.batch / self.seconds


def time_batch(make_backend, prompts, params, batch: int, shortest_first: bool = False,
               limit_s: float = math.inf, fallback_step_s: float | None = None,
               min_decode_steps: int = 0, first_token_repeats: int = 0) -> BatchTiming:
    """Time `batch` requests (the first `batch` prompts, cycled, admitted in that order or
    `shortest_first`) until their rate is known, or `limit_s` has passed and at least
    `min_decode_steps` decode steps were seen (see the module docstring);
    `fallback_step_s` stands for the batch's step when none was seen. A lone request
    (`batch` 1) first times `first_token_repeats` first tokens of its prompt alone on the
    same backend, and its TTFT is the median of those and its own."""
    chosen = [prompts[i % len(prompts)] for i in range(batch)]
    if shortest_first:
        chosen.sort(key=len)
    backend = make_backend(batch)
    firsts, all_first_s, full_steps, decode_steps, note, cut = 0, None, [], [], None, False
    repeats = []  # the lone request's prompt's other first tokens
    try:
        if batch == 1 and first_token_repeats:
            one = dataclasses.replace(params, max_new_tokens=1, min_new_tokens=min(params.min_new_tokens, 1))
            begun = time.perf_counter()
            for r in range(first_token_repeats):
                if repeats and time.perf_counter() - begun + repeats[0] > limit_s / 2:
                    break  # a slow machine: half its share for these at most
                backend.add_request(-1 - r, chosen[0], one)
                began = time.perf_counter()
                while backend.has_unfinished():
                    backend.step()
                repeats.append(time.perf_counter() - began)
        for i, prompt in enumerate(chosen):
            backend.add_request(i, prompt, params)
        start = last = time.perf_counter()
        while backend.has_unfinished():
            events = backend.step()
            now = time.perf_counter()
            took, last = now - last, now
            new_firsts = sum(1 for e in events if e.index == 1)
            firsts += new_firsts
            if events and not new_firsts:
                decode_steps.append((len(events), took))
                if all_first_s is not None and len(events) == batch:
                    full_steps.append(took)
            if all_first_s is None and firsts >= batch:
                all_first_s = now - start
            cut = now - start >= limit_s and len(decode_steps) >= min_decode_steps
            if len(full_steps) >= FULL_STEPS or cut:
                break
        elapsed = time.perf_counter() - start
        unfinished = backend.has_unfinished()
    finally:
        if hasattr(backend, "close"):
            backend.close()
    if all_first_s is None and unfinished:
        all_first_s = elapsed * batch / max(firsts, 1)
        note = f"cut at {elapsed:.0f} s with {firsts} of {batch} first tokens: prefill extrapolated"
    elif all_first_s is None:  # finished, yet not every request reported a first token
        all_first_s = elapsed
    if repeats and firsts >= batch:
        all_first_s = statistics.median([all_first_s, *repeats])
    if full_steps:
        step = statistics.median(full_steps)
        if cut and unfinished:
            note = f"cut at {elapsed:.0f} s after {len(full_steps)} decode steps: the rest extrapolated"
    elif decode_steps:
        rows, step = max(decode_steps)
        step = max(step, fallback_step_s or 0.0)
        note = (note or f"cut at {elapsed:.0f} s") + f"; decode step of {rows} rows stands for {batch}"
    else:
        step = fallback_step_s if fallback_step_s is not None else all_first_s
        note = (note or f"cut at {elapsed:.0f} s") + "; no decode step seen: estimated from the lone request's token and prefill"
    return BatchTiming(batch, all_first_s, step, params.max_new_tokens, note)


@dataclass(frozen=True)
class Measurement:
    """What the calibration measured: one request alone, samples/s per batch size."""

    single_stream_latency_s: float
    throughput: dict  # max_batch -> samples per second
    seconds: float  # the calibration's own time
    ttft_s: float | None = None  # one request alone: to its first token
    token_s: float | None = None  # one request alone: each token after the first
    notes: tuple = field(default_factory=tuple)  # what was extrapolated
    # For playing a Server test out (wallperf.driver.server_sim): each prompt token of the lone
    # request's prefill beyond a decode step, the decode step per batch size, the prompts'
    # lengths and the output tokens per request.
    prefill_token_s: float | None = None
    batch_step_s: dict = field(default_factory=dict)
    prompt_lengths: tuple = ()
    tokens: int | None = None

    def to_dict(self) -> dict:
        return {"single_stream_latency_s": self.single_stream_latency_s, "ttft_s": self.ttft_s,
                "token_s": self.token_s, "prefill_token_s": self.prefill_token_s,
                "throughput_samples_per_second": {str(b): q for b, q in self.throughput.items()},
                "decode_step_s": {str(b): s for b, s in self.batch_step_s.items()},
                "seconds": self.seconds, "notes": list(self.notes)}

    def summary(self) -> str:
        parts = [f"one request {1e3 * self.single_stream_latency_s:.0f} ms"
                 + (f" (TTFT {1e3 * self.ttft_s:.0f} ms, {1e3 * self.token_s:.1f} ms a token)"
                    if self.ttft_s is not None else ""),
                 *(f"{q:.2f} samples/s at batch {b}" for b, q in self.throughput.items())]
        text = f"calibrated in {self.seconds:.1f} s: {', '.join(parts)}"
        return text + ("; extrapolated: " + "; ".join(self.notes) if self.notes else "")


def measure(make_backend, prompts, params, batches, sorted_batches=(),
            budget_s: float = CALIBRATION_BUDGET_S) -> Measurement:
    """A warm-up request, one request alone, then each batch size in `batches` (those in
    `sorted_batches` admitted shortest prompt first), within about `budget_s`."""
    started = time.perf_counter()
    sizes = sorted(set(batches))
    steps = 2 + len(sizes)

    def left() -> float:
        return max(budget_s - (time.perf_counter() - started), 0.0)

    say(f"calibrating 1/{steps}: a short request to warm up (a first run also builds the compiled kernels)")
    warm = dataclasses.replace(params, max_new_tokens=WARMUP_TOKENS, min_new_tokens=min(params.min_new_tokens,
                                                                                         WARMUP_TOKENS))
    with Heartbeat(f"calibrating 1/{steps}"):
        time_batch(make_backend, prompts, warm, 1)
    share = SINGLE_SHARE * left() if sizes else left()
    say(f"calibrating 2/{steps}: one request alone, {params.max_new_tokens} tokens (at most ~{share:.0f} s)")
    # A decode step at batch 1 costs little beside a prefill: always see a few.
    with Heartbeat(f"calibrating 2/{steps}"):
        single = time_batch(make_backend, prompts, params, 1, limit_s=share, min_decode_steps=3,
                            first_token_repeats=FIRST_TOKEN_REPEATS)
    # Where a batch is cut before its first full decode step: its weights read once (one
    # token alone), plus each row's math at what a prompt token cost in the prefill.
    per_row_s = single.first_token_s / len(prompts[0])
    notes = [f"one request: {single.note}"] if single.note else []
    throughput, steps_s = {}, {}
    for i, b in enumerate(sizes):
        share = left() / (len(sizes) - i)
        how = "shortest prompt first" if b in sorted_batches else "in arrival order"
        say(f"calibrating {3 + i}/{steps}: a batch of {b}, {how} (at most ~{share:.0f} s)")
        with Heartbeat(f"calibrating {3 + i}/{steps}"):
            timing = time_batch(make_backend, prompts, params, b, shortest_first=b in sorted_batches,
                                limit_s=share, fallback_step_s=single.step_s + b * per_row_s)
        throughput[b], steps_s[b] = timing.samples_per_second, timing.step_s
        if timing.note:
            notes.append(f"batch {b}: {timing.note}")
    return Measurement(single.seconds, throughput, time.perf_counter() - started, ttft_s=single.first_token_s,
                       token_s=single.step_s, notes=tuple(notes),
                       prefill_token_s=max(single.first_token_s - single.step_s, 0.0) / len(prompts[0]),
                       batch_step_s=steps_s, prompt_lengths=tuple(len(p) for p in prompts),
                       tokens=params.max_new_tokens)


@dataclass(frozen=True)
class Calibration:
    measurement: Measurement
    plan: Plan

    @property
    def scenarios(self) -> tuple:
        """The ScenarioConfigs with their planned settings."""
        return self.plan.scenarios

    @property
    def predicted_s(self) -> dict:
        """scenario -> predicted seconds of its performance test."""
        return {k.split(" ")[0]: v for k, v in self.plan.predicted_s.items() if k.endswith(" performance")}

    def to_dict(self) -> dict:
        """results.json's `calibration`."""
        from wallperf.driver.plan import settings_of

        return {"measured": self.measurement.to_dict(),
                "settings": {sc.name: settings_of(sc) for sc in self.scenarios},
                "predicted_performance_s": {k: round(v, 1) for k, v in self.predicted_s.items()},
                "plan": self.plan.to_dict()}

    def summary(self) -> str:
        return self.measurement.summary() + "\n" + self.plan.text()


def choose(scenarios, m: Measurement, overheads: Overheads = Overheads(), **budget) -> Calibration:
    """The planned scenario configs for measurement `m` (wallperf.driver.plan)."""
    return Calibration(m, plan(scenarios, m, overheads=overheads, **budget))


def calibrate(scenarios, make_backend, prompts, params, overheads: Overheads = Overheads()) -> Calibration:
    """Measure this machine through `make_backend(max_batch)` and plan the tests."""
    kinds = [(sc, scenario(sc.name)) for sc in scenarios]
    batches = [sc.max_batch for sc, kind in kinds if kind is OFFLINE or kind.server_like]
    # Offline's batch is admitted as its queue admits; a Server test sharing its batch size
    # then gets the sorted (faster) rate, bounded by SERVER_LOAD's margin.
    offline = {sc.max_batch for sc, kind in kinds if kind is OFFLINE}
    return choose(scenarios, measure(make_backend, prompts, params, batches, sorted_batches=offline), overheads)


def calibrated_run(resolved, opts, make_backend, prompts, params):
    """(the run with calibrated scenarios, the Calibration), or (the run as it is, None)
    when the run asked for none (opts.calibrate), measures nothing, leads other ranks, or
    drives a remote server (whose load is its operator's to set)."""
    run = resolved.run
    if not opts.calibrate or "performance" not in run.modes or run.tp > 1 or backend_spec(run.backend).weights == "remote":
        return resolved, None
    scenarios = [sc for sc in resolved.scenarios if not (opts.find_peak and scenario(sc.name).server_like)]
    say(f"calibrating the performance tests' load on this machine, in at most about {CALIBRATION_BUDGET_S:.0f} s "
        f"(--no-calibrate keeps the YAML's)")
    calibration = calibrate(scenarios, make_backend, prompts, params,
                            Overheads(modes=tuple(run.modes), accuracy_samples=len(prompts),
                                      accuracy_in=accuracy_scenarios(resolved)))
    say(calibration.measurement.summary())
    return planned_run(resolved, calibration), calibration


def accuracy_scenarios(resolved) -> tuple:
    """The names of the scenarios this run gives an accuracy test (RunConfig.accuracy_scenarios)."""
    if "accuracy" not in resolved.run.modes:
        return ()
    names = tuple(sc.name for sc in resolved.scenarios)
    return names if resolved.run.accuracy_scenarios == "all" else names[:1]


def replan(calibration: Calibration, spent_s: float, per_test_s: float) -> Calibration:
    """The plan again, with what the run has spent before its tests (the wall, the
    calibration) and what starting a test's process costs, both measured by the parent."""
    o = dataclasses.replace(calibration.plan.overheads, spent_s=spent_s, per_test_s=per_test_s)
    return choose(calibration.plan.original, calibration.measurement, o, budget_s=calibration.plan.budget_s)


def planned_run(resolved, calibration: Calibration):
    """`resolved` with the planned settings of the scenarios `calibration` planned."""
    by_name = {sc.name: sc for sc in calibration.scenarios}
    return dataclasses.replace(resolved, scenarios=tuple(by_name.get(sc.name, sc) for sc in resolved.scenarios))
