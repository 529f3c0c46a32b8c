"""A Server test played out from the calibration's figures, to choose its load.

LoadGen's early stopping judges a Server test's 99th-percentile TTFT from its
queries: at the plan's 464 queries it must find none over the limit. So the
load must keep the slowest first token of the whole test within the limit, not
the mean: at 60% of the batch's throughput on a 2-core AVX2 VM, a test of MMLU
prompts had TTFT p50 358 ms and p99 1.8 s, and two queries over 2 s made it
INVALID. The slowest first token comes from bursts of Poisson arrivals whose
prompts queue for the prefill, which a share of capacity cannot see.

This plays the engine's own schedule (sut.engine.scheduler: while sequences
decode, each step prefills one waiting prompt, first come first served, then
decodes every running sequence) over Poisson arrivals of the data set's prompts,
with costs from the calibration (wallperf.driver.calibrate):

- a prefill of n tokens: one decode step's cost plus n x the lone request's
  prefill cost per prompt token;
- a decode step over B rows: from the lone request's step (B = 1) to the
  measured step of the Server batch (B = max_batch), linear between;
- every request decodes the run's fixed output length.

A load is safe when, over TRIALS seeded tests of the plan's query count, the
TRIAL_QUANTILE of their slowest first token is within TTFT_MARGIN of the limit
and of their TPOT p99 within the TPOT limit. The margin is for what the play
leaves out: LoadGen's threads beside the engine's, other work on the machine.
(On that VM, 240 requests at 1.2 QPS: played, TTFT p50/p90/p99 330/743/1,406 ms;
measured, 339/702/1,242 ms, slowest 2.1 s against 1.9 s played.)
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

TRIALS = 20
TRIAL_QUANTILE = 0.9
TTFT_MARGIN = 0.9
# Loads tried, as shares of the batch's measured throughput: bisection to this resolution.
LOAD_RESOLUTION = 0.01


@dataclass(frozen=True)
class EngineCosts:
    """Seconds the engine takes per step, from the calibration."""

    token_s: float  # a decode step of one row
    prefill_token_s: float  # each prompt token of a prefill, beyond a decode step's cost
    batch_step_s: float  # a decode step of max_batch rows
    max_batch: int

    def prefill(self, tokens: int) -> float:
        return self.token_s + self.prefill_token_s * tokens

    def decode(self, rows: int) -> float:
        if self.max_batch <= 1:
            return self.token_s * rows
        return self.token_s + (self.batch_step_s - self.token_s) * (rows - 1) / (self.max_batch - 1)


def play(qps: float, queries: int, lengths, tokens: int, costs: EngineCosts, seed: int = 0):
    """One simulated Server test: (TTFT seconds per query, TPOT seconds per query) in arrival
    order. `lengths`: the data set's prompt lengths, drawn uniformly as LoadGen draws samples;
    `tokens`: output tokens per query."""
    rng = random.Random(seed)
    arrivals, at = [], 0.0
    for _ in range(queries):
        at += rng.expovariate(qps)
        arrivals.append((at, lengths[rng.randrange(len(lengths))]))
    ttft, done = [0.0] * queries, [0.0] * queries
    waiting: deque = deque()
    running: deque = deque()  # (query, decode steps left), admitted in order, all decoding in step
    now, nxt = 0.0, 0
    while nxt < queries or waiting or running:
        while nxt < queries and arrivals[nxt][0] <= now:
            waiting.append(nxt)
            nxt += 1
        if not waiting and not running:
            now = arrivals[nxt][0]
            continue
        admitted = None
        cost = 0.0
        if waiting and len(running) < costs.max_batch:
            admitted = waiting.popleft()
            cost += costs.prefill(arrivals[admitted][1])
        if running:
            cost += costs.decode(len(running))
        now += cost
        for _ in range(len(running)):
            q, left = running.popleft()
            if left > 1:
                running.append((q, left - 1))
            else:
                done[q] = now
        if admitted is not None:
            ttft[admitted] = now - arrivals[admitted][0]
            if tokens > 1:
                running.append((admitted, tokens - 1))
            else:
                done[admitted] = now
    tpot = [(done[q] - arrivals[q][0] - ttft[q]) / max(tokens - 1, 1) for q in range(queries)]
    return ttft, tpot


def _quantile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def worst_case(qps: float, queries: int, lengths, tokens: int, costs: EngineCosts, trials: int = TRIALS):
    """(the TRIAL_QUANTILE of the trials' slowest TTFT, of their TPOT p99), in seconds."""
    slowest, tpot99 = [], []
    for seed in range(trials):
        ttft, tpot = play(qps, queries, lengths, tokens, costs, seed)
        slowest.append(max(ttft))
        tpot99.append(_quantile(tpot, 0.99))
    return _quantile(slowest, TRIAL_QUANTILE), _quantile(tpot99, TRIAL_QUANTILE)


def safe_load(capacity: float, queries: int, lengths, tokens: int, costs: EngineCosts,
              ttft_limit_s: float | None, tpot_limit_s: float | None, highest: float) -> float | None:
    """The highest load, as a share of `capacity` (samples/s) up to `highest`, at which the
    played tests stay within the limits (see the module docstring); None when even
    LOAD_RESOLUTION's share does not."""

    def fits(load: float) -> bool:
        ttft, tpot = worst_case(load * capacity, queries, lengths, tokens, costs)
        return ((ttft_limit_s is None or ttft <= TTFT_MARGIN * ttft_limit_s)
                and (tpot_limit_s is None or tpot <= tpot_limit_s))

    if fits(highest):
        return highest
    lo, hi = 0.0, highest
    while hi - lo > LOAD_RESOLUTION:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo if lo > 0 else None
