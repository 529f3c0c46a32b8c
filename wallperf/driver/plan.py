"""The plan of a calibrated run: each performance test's load settings, sized from
the machine's measured speed so that every test can be VALID and the whole run
fits its budget (BUDGET_S, ten minutes for the default run), and what it will
cost, said before the tests start.

LoadGen judges a performance test VALID only if it ran for min_duration, issued
min_query_count queries, met its latency limits, and processed enough queries for
early stopping. What each scenario needs, and what it costs at the measured speed:

- Offline: `offline_expected_qps` = OFFLINE_MARGIN x the measured throughput at
  its batch, so LoadGen issues enough samples to outlast min_duration even though
  a whole test runs faster than one batch from a cold start (its batches refill as
  sequences finish, over all samples sorted by length: on a 2-core VM the default
  run's Offline test ran 1.2x the sorted batch's rate, which left a 1.5x margin
  short of min_duration). The test lasts about 1.1 x OFFLINE_MARGIN x min_duration,
  and no less than one request alone.
- SingleStream: `expected_latency_ms` = the measured latency, and
  `min_query_count` = SINGLE_STREAM_QUERIES, the 64 queries LoadGen's early
  stopping needs to judge the 90th percentile (past them it always can: it widens
  the bound instead of failing); it lasts the longer of min_duration
  and that many requests one after another.
- Server (and Interactive): `min_query_count` = SERVER_QUERIES, above the 459
  queries with none over the limits that early stopping needs for the 99th
  percentiles, at `target_qps` = a share of the measured throughput at its batch
  between SERVER_LOAD and SERVER_MAX_LOAD, and no higher than the load at which
  the test, played out from the calibration's figures (wallperf.driver.server_sim),
  keeps its slowest first token within the TTFT limit; it lasts the longer of
  min_duration and SERVER_QUERIES / target_qps. It cannot be VALID where one
  request alone misses its TTFT or TPOT limit, or where no load keeps the played
  test within them: the plan says so.
- Accuracy tests go over the data set once (at the performance tests' speeds:
  their answers stop at EOS, no longer than the performance outputs here; a
  Server-like accuracy test is issued within ~10 s and runs at its batch's
  throughput), only in the scenarios the run checks accuracy in
  (`accuracy_in`), and every test's process loads the model first (`per_test_s`).

Sizing: the YAML's min_duration first; if the run would not fit the budget,
every min_duration drops to MIN_DURATION_S (the query counts above are what
VALID needs, so they stay), and Server takes a load up to SERVER_MAX_LOAD. If even
that smallest valid plan is over the budget, the plan says by how much and which
tests need the time, and the run goes ahead with it. All of it is a pure function
of the measurement (tests/driver/test_plan.py plays a fast machine, a 2-core AVX2
VM and one four times slower).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from wallperf.driver.server_sim import TTFT_MARGIN, EngineCosts, safe_load
from wallperf.sut.scenarios import OFFLINE, SINGLE_STREAM, scenario

OFFLINE_MARGIN = 2.0
# LoadGen's Offline test issues its one query and waits for it: about 10% over the issued samples' time.
OFFLINE_TAIL = 1.1
SINGLE_STREAM_QUERIES = 64
# LoadGen's early stopping judges a 99th percentile from 459 queries when none is over its limit.
SERVER_QUERIES = 464
SERVER_LOAD = 0.6
# The most of its measured throughput a Server test is asked to carry to fit the budget.
# (At 0.85 on a 2-core AVX2 VM the p99 TTFT came to 1.85 s against its 2 s limit, one query of 480 over
# it: LoadGen's early stopping then wanted 662.)
SERVER_MAX_LOAD = 0.75
# Where the played edge (server_sim) is below SERVER_LOAD, the load is the least that fits the
# budget, and no less than this share of the edge: a shared machine's stalls lengthen the real
# tail. On a 2-core AVX2 VM, two Server tests at 0.53 of the batch's throughput, the played edge,
# had TTFT p99 2.47 s (INVALID) and 1.18 s (VALID) the same morning.
PLAYED_SHARE = 0.85
# The default run, everything from the wall's measurement to the last report, should fit in this.
BUDGET_S = 600.0
# The shortest min_duration the plan gives a test to fit the budget.
MIN_DURATION_S = 10.0


@dataclass(frozen=True)
class Overheads:
    """What the run costs beside its tests' LoadGen time."""

    spent_s: float = 0.0  # gone before the tests: the wall's measurement, the calibration
    per_test_s: float = 0.0  # one test process's start: model load, prompts
    modes: tuple = ("performance",)
    accuracy_samples: int = 0  # an accuracy test goes over the data set once
    # The scenarios that get an accuracy test (RunConfig.accuracy_scenarios); None: every one.
    accuracy_in: tuple | None = None


def settings_of(sc) -> dict:
    """The load settings the plan chooses for scenario config `sc`."""
    kind = scenario(sc.name)
    load = (("offline_expected_qps",) if kind is OFFLINE else ("expected_latency_ms",) if kind is SINGLE_STREAM
            else ("target_qps",) if kind.server_like else ())
    return {k: getattr(sc, k) for k in ("min_duration_s", *load, "min_query_count")}


@dataclass(frozen=True)
class Plan:
    scenarios: tuple  # the ScenarioConfigs with their planned settings
    predicted_s: dict  # "<scenario> <mode>" -> seconds of LoadGen time
    overheads: Overheads
    budget_s: float
    smallest: bool  # the durations were cut to MIN_DURATION_S to fit
    cannot_be_valid: tuple  # why a test cannot be VALID on this machine, whatever its settings
    original: tuple  # the ScenarioConfigs it was given (to plan again with other overheads)
    notes: tuple = ()  # how a Server-like test's load was chosen

    @property
    def total_s(self) -> float:
        o = self.overheads
        return o.spent_s + o.per_test_s * len(self.predicted_s) + sum(self.predicted_s.values())

    @property
    def fits(self) -> bool:
        return self.total_s <= self.budget_s

    def over_budget_reasons(self) -> list[str]:
        """The biggest shares of the time, largest first: why the run cannot fit."""
        by_name = {sc.name: sc for sc in self.scenarios}
        parts = []
        for key, seconds in sorted(self.predicted_s.items(), key=lambda kv: -kv[1]):
            name, mode = key.split(" ")
            sc, kind = by_name[name], scenario(name)
            if mode == "accuracy":
                why = f"{self.overheads.accuracy_samples} samples"
            elif kind is SINGLE_STREAM:
                why = f"{sc.min_query_count} queries one after another, {sc.expected_latency_ms / 1e3:.1f} s each"
            elif kind.server_like:
                why = f"{sc.min_query_count} queries for early stopping at {sc.target_qps:g} QPS"
            else:
                why = f"min_duration {sc.min_duration_s:g} s"
            parts.append(f"{key} {seconds:.0f} s ({why})")
        o = self.overheads
        parts.append(f"{len(self.predicted_s)} test processes starting at {o.per_test_s:.0f} s each, "
                     f"{o.spent_s:.0f} s before the tests")
        return parts

    def text(self) -> str:
        """The plan, said before the tests start."""
        lines = [f"plan: {len(self.predicted_s)} tests, about {self.total_s / 60:.1f} min in all "
                 f"(budget {self.budget_s / 60:.0f} min)"
                 + (f"; every min_duration cut to the least, {MIN_DURATION_S:g} s"
                    + (", to fit" if self.fits else "") if self.smallest else "")]
        for sc in self.scenarios:
            settings = ", ".join(f"{k} {v:g}" for k, v in settings_of(sc).items() if v is not None)
            for key, seconds in self.predicted_s.items():
                if key.split(" ")[0] == sc.name:
                    lines.append(f"  {key}: about {seconds:.0f} s" + (f" ({settings})" if key.endswith(
                        "performance") else ""))
        o = self.overheads
        if "accuracy" in o.modes and o.accuracy_in is not None and len(o.accuracy_in) < len(self.scenarios):
            lines.append(f"  accuracy is checked in {', '.join(o.accuracy_in) or 'no scenario'} only "
                         "(accuracy_scenarios: first; the engine's tokens do not depend on the batch)")
        lines.append(f"  beside them: {o.spent_s:.0f} s already spent (wall, calibration), "
                     f"{o.per_test_s:.0f} s to start each test's process")
        lines.extend(f"  {note}" for note in self.notes)
        if not self.fits:
            lines.append(f"  OVER BUDGET: even the smallest valid plan takes about {self.total_s / 60:.1f} min, "
                         f"{(self.total_s - self.budget_s) / 60:.1f} min over; the time goes to: "
                         + "; ".join(self.over_budget_reasons()) + ". Running it anyway.")
        for why in self.cannot_be_valid:
            lines.append(f"  CANNOT BE VALID: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"budget_s": self.budget_s, "predicted_total_s": round(self.total_s, 1), "fits": self.fits,
                "smallest_valid_plan": self.smallest, "predicted_s": {k: round(v, 1) for k, v in
                                                                      self.predicted_s.items()},
                "spent_before_tests_s": round(self.overheads.spent_s, 1),
                "per_test_process_s": round(self.overheads.per_test_s, 1),
                "over_budget_reasons": [] if self.fits else self.over_budget_reasons(),
                "cannot_be_valid": list(self.cannot_be_valid), "notes": list(self.notes)}


def _checks_accuracy(overheads: Overheads, name: str) -> bool:
    return overheads.accuracy_in is None or name in overheads.accuracy_in


def _latency_problems(sc, m) -> list[str]:
    """Why a Server-like test cannot meet its limits whatever its load: one request alone misses them."""
    found = []
    if not scenario(sc.name).server_like:
        return found
    if m.ttft_s is not None and sc.ttft_ms is not None and 1e3 * m.ttft_s > sc.ttft_ms:
        found.append(f"{sc.name}: one request alone takes {1e3 * m.ttft_s:.0f} ms to its first token, over the "
                     f"p99 TTFT limit of {sc.ttft_ms:g} ms")
    if m.token_s is not None and sc.tpot_ms is not None and 1e3 * m.token_s > sc.tpot_ms:
        found.append(f"{sc.name}: one request alone takes {1e3 * m.token_s:.0f} ms a token, over the p99 "
                     f"TPOT limit of {sc.tpot_ms:g} ms")
    return found


def _plan(scenarios, m, budget_s: float, overheads: Overheads, floor: float | None, played: dict) -> Plan:
    """The plan with every min_duration at the YAML's (floor None) or at `floor`; `played`: each
    Server-like scenario's played load (_played_loads)."""
    modes = overheads.modes
    accuracy = "accuracy" in modes
    n = overheads.accuracy_samples
    chosen, predicted = [], {}
    for sc in scenarios:
        if floor is not None:
            sc = dataclasses.replace(sc, min_duration_s=min(sc.min_duration_s, floor))
        kind = scenario(sc.name)
        if kind is OFFLINE:
            rate = m.throughput[sc.max_batch]
            qps = OFFLINE_MARGIN * rate
            sc = dataclasses.replace(sc, offline_expected_qps=round(qps, 3))
            # No test is over before its slowest request: at least one request's latency (few samples
            # issued on a slow machine run below the full batch's rate).
            latency = m.single_stream_latency_s
            perf, acc = max(OFFLINE_TAIL * qps * sc.min_duration_s / rate, latency), max(n / rate, latency)
        elif kind is SINGLE_STREAM:
            queries = max(sc.min_query_count, SINGLE_STREAM_QUERIES)
            latency = m.single_stream_latency_s
            sc = dataclasses.replace(sc, expected_latency_ms=round(1e3 * latency, 1), min_query_count=queries)
            perf, acc = max(sc.min_duration_s, queries * latency), n * latency
        elif kind.server_like:
            # Its load is chosen below, from what the others leave of the budget.
            sc = dataclasses.replace(sc, min_query_count=_server_queries(sc))
            perf = acc = 0.0
        else:
            perf, acc = sc.min_duration_s, n * m.single_stream_latency_s
        chosen.append(sc)
        if "performance" in modes:
            predicted[f"{sc.name} performance"] = perf
        if accuracy and _checks_accuracy(overheads, sc.name) and not kind.server_like:
            predicted[f"{sc.name} accuracy"] = acc
    server = [i for i, sc in enumerate(chosen) if scenario(sc.name).server_like]

    def own_accuracy(j):
        # LoadGen issues an accuracy test's samples within ~10 s (harness.loadgen.settings): it runs at
        # the batch's throughput, and its last answer comes a request later.
        checked = accuracy and _checks_accuracy(overheads, chosen[j].name)
        return n / m.throughput[chosen[j].max_batch] + m.single_stream_latency_s if checked else None

    notes, problems = [], []
    for at, i in enumerate(server):
        sc, pending = chosen[i], server[at:]
        capacity = m.throughput[sc.max_batch]
        # Its share of what the budget leaves after the tests planned so far and the Server-like
        # tests' accuracy runs.
        accuracies = [a for a in map(own_accuracy, pending) if a is not None]
        taken = (overheads.spent_s + overheads.per_test_s * (len(predicted) + len(accuracies))
                 + sum(predicted.values()) + sum(accuracies))
        share = max(budget_s - taken, 1.0) / len(pending)
        need = sc.min_query_count / share / capacity  # the load that fills the budget's share
        load = min(max(SERVER_LOAD, need), SERVER_MAX_LOAD)
        safe = played.get(sc.name)
        if safe is not None:
            why = ""
            if safe < load:
                # The played edge is below SERVER_LOAD: keep a margin below it where the budget allows.
                load = min(safe, max(need, PLAYED_SHARE * safe))
                why = (", below what the budget asks" if need > safe else
                       f"; {load / safe:.0%} of that, as the budget allows (the played test has no noise)")
            notes.append(f"{sc.name}: load {load:.2f} of {capacity:.2f} samples/s; a test of "
                         f"{sc.min_query_count} queries played out from the calibration keeps its slowest first "
                         f"token within {TTFT_MARGIN:.0%} of the {sc.ttft_ms:g} ms TTFT limit up to {safe:.2f}"
                         + why)
        elif sc.name in played:
            problems.append(f"{sc.name}: no load keeps a played test of {sc.min_query_count} queries within its "
                            f"TTFT limit of {sc.ttft_ms:g} ms and TPOT limit of {sc.tpot_ms:g} ms")
        qps = round(load * capacity, 3)
        chosen[i] = sc = dataclasses.replace(sc, target_qps=qps)
        if "performance" in modes:
            predicted[f"{sc.name} performance"] = max(sc.min_duration_s, sc.min_query_count / qps)
        if own_accuracy(i) is not None:
            predicted[f"{sc.name} accuracy"] = own_accuracy(i)
    problems = tuple(p for sc in chosen for p in _latency_problems(sc, m)) + tuple(problems)
    return Plan(tuple(chosen), predicted, overheads, budget_s, floor is not None, problems, tuple(scenarios),
                tuple(notes))


def _server_queries(sc) -> int:
    return max(sc.min_query_count, SERVER_QUERIES)


def _played_loads(scenarios, m) -> dict:
    """Per Server-like scenario whose test the calibration measured enough to play out: the
    highest share of its batch's throughput at which the played test meets its limits, or None
    where none does. The others are left out: only the shares bound their load."""
    played = {}
    for sc in scenarios:
        step_s = m.batch_step_s.get(sc.max_batch)
        if (not scenario(sc.name).server_like or None in (m.prefill_token_s, m.token_s, m.tokens, step_s)
                or not m.prompt_lengths):
            continue
        costs = EngineCosts(m.token_s, m.prefill_token_s, step_s, sc.max_batch)
        played[sc.name] = safe_load(m.throughput[sc.max_batch], _server_queries(sc), m.prompt_lengths, m.tokens,
                                    costs, sc.ttft_ms / 1e3 if sc.ttft_ms is not None else None,
                                    sc.tpot_ms / 1e3 if sc.tpot_ms is not None else None, SERVER_MAX_LOAD)
    return played


def plan(scenarios, m, budget_s: float = BUDGET_S, overheads: Overheads = Overheads()) -> Plan:
    """The run's plan for measurement `m` (wallperf.driver.calibrate.Measurement): the YAML's
    durations if they fit `budget_s`, else the smallest valid plan (see the module docstring)."""
    played = _played_loads(scenarios, m)  # the same whatever the durations: played once
    first = _plan(scenarios, m, budget_s, overheads, None, played)
    if first.fits or "performance" not in overheads.modes:
        return first
    return _plan(scenarios, m, budget_s, overheads, MIN_DURATION_S, played)
