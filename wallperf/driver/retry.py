"""A second try for a planned performance test that came out INVALID, when the
run's budget still has room for it.

A calibrated run (the default `wallperf run`) sizes each test so that it can be
VALID on a quiet machine (wallperf.driver.plan). A shared machine is not always
quiet, and the plan cannot see its noise coming: one default run's Server test
lost ~25 s to the hypervisor mid-test and 94 of its 464 queries broke their
limits; two Server tests at the same load the same morning came out INVALID
and VALID; a neighbour's memory traffic slows every step without showing as
steal. So a test that came out INVALID gets one more try, if the try fits:

- a Server-like test at RETRY_LOAD of its load (its queries at the lower load
  take longer): a tail over the limits is what noise does to it;
- an Offline test that ended before its min_duration with
  offline_expected_qps x RETRY_OFFLINE_QPS, so LoadGen issues more samples;
- any other at the same settings.

The try runs only when its predicted time, plus starting its process, fits in
what the budget leaves after the time spent and the tests still to come. It
does not run for a test whose SUT or requests failed (a fault, which a second
try would repeat), nor in a --submission run, nor where the run was not
planned (no calibration: the YAML's or the user's own settings).

Nothing is lost: the INVALID attempt's record goes to results.json's `retried`
list, with its LoadGen logs moved beside the new ones (performance/invalid_1),
and the new record says what it retries and what changed (`retry_of`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from wallperf.driver.plan import settings_of
from wallperf.sut.scenarios import OFFLINE, scenario

# A retried Server-like test's target_qps, as a share of the INVALID one's.
RETRY_LOAD = 0.85
# A retried Offline test's offline_expected_qps, as a multiple of the one that ended too soon.
RETRY_OFFLINE_QPS = 1.5
# LoadGen's last queries finish after the last is issued: a Server-like test's predicted
# length is its issue time plus this share.
SERVER_TAIL = 1.1

# INVALID reasons that a second try would repeat (wallperf.driver.one_test).
_FAULTS = ("the SUT failed", "LoadGen error", "LoadGen logged no result")


@dataclass(frozen=True)
class Retry:
    scenario: object  # the ScenarioConfig the try runs with
    predicted_s: float  # its LoadGen time, as predicted
    changed: dict  # setting -> (before, after); empty: the same settings


def _fault(record: dict) -> str | None:
    for reason in record.get("invalid_reasons") or ():
        if reason.startswith(_FAULTS) or " requests failed: " in reason:
            return reason
    return None


def retry_settings(sc, record: dict) -> tuple[object, float]:
    """The settings of a second try of INVALID performance test `record` (run with `sc`),
    and its predicted LoadGen seconds."""
    kind = scenario(sc.name)
    elapsed = float(record.get("elapsed_s") or 0.0)
    if kind.server_like and sc.target_qps:
        qps = round(RETRY_LOAD * sc.target_qps, 3)
        tried = dataclasses.replace(sc, target_qps=qps)
        return tried, SERVER_TAIL * max(sc.min_duration_s, tried.min_query_count / qps)
    reasons = " ".join(record.get("invalid_reasons") or ())
    if kind is OFFLINE and sc.offline_expected_qps and "minimum duration" in reasons:
        tried = dataclasses.replace(sc, offline_expected_qps=round(RETRY_OFFLINE_QPS * sc.offline_expected_qps, 3))
        # It issues RETRY_OFFLINE_QPS times the samples, at the rate the attempt ran at.
        return tried, RETRY_OFFLINE_QPS * max(elapsed, sc.min_duration_s)
    return sc, max(elapsed, sc.min_duration_s)


def plan_retry(sc, record: dict, *, budget_s: float, elapsed_s: float, still_to_run_s: float,
               per_test_s: float, submission: bool = False, cannot_be_valid: tuple = ()) -> tuple[Retry | None, str]:
    """Whether INVALID performance test `record` gets a second try, and why (or why not).

    `elapsed_s`: the run's time so far; `still_to_run_s`: the predicted time of the tests
    still to come, their processes' starts included; `per_test_s`: one test process's start;
    `cannot_be_valid`: the plan's reasons why a test cannot be VALID on this machine."""
    if record.get("valid") or record.get("mode") != "performance":
        return None, "the test is VALID" if record.get("valid") else "not a performance test"
    if submission:
        return None, "not retried: a --submission run keeps each test's first result"
    known = [why for why in cannot_be_valid if why.startswith(f"{sc.name}:")]
    if known:
        return None, f"not retried: the plan said it cannot be VALID here ({known[0]})"
    fault = _fault(record)
    if fault:
        return None, f"not retried: a second try would repeat the fault ({fault})"
    tried, predicted = retry_settings(sc, record)
    before, after = settings_of(sc), settings_of(tried)
    changed = {k: (before[k], after[k]) for k in after if before.get(k) != after[k]}
    left = budget_s - elapsed_s - still_to_run_s
    need = predicted + per_test_s
    if need > left:
        return None, (f"not retried: a second try needs about {need:.0f} s and the budget of {budget_s / 60:.0f} min "
                      f"leaves {max(left, 0.0):.0f} s")
    what = ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changed.items()) or "the same settings"
    return Retry(tried, predicted, changed), (f"retrying once with {what} (about {need:.0f} s; the budget "
                                                   f"leaves {left:.0f} s)")
