"""The run's plan as a pure function of a calibration: fake measurements of a fast
machine, of the 2-core AVX2 VM as the issue measured its eager bf16 engine (TTFT
2.3 s, 64 ms a token), and of one four times slower. Each performance test's
settings are held to LoadGen's VALID rules restated here (Offline outlasts
min_duration, SingleStream 64 queries and Server ~460 for early stopping, Server
below its measured capacity), its predicted time to a sum done by hand, and the
whole run to its ten-minute budget; where even the smallest valid plan is over,
the plan must say how long and why before the tests start."""
import dataclasses

import pytest

from wallperf.driver.calibrate import Measurement
from wallperf.driver.plan import (BUDGET_S, MIN_DURATION_S, OFFLINE_MARGIN, Overheads, plan, settings_of)
from wallperf.harness.config import load_scenario_config

TOKENS = 64
SAMPLES = 57  # the default run's MMLU questions, one per subject
# LoadGen's early stopping: 64 queries for SingleStream's 90th percentile, ~460 with none over for Server's 99th.
EARLY_STOPPING = {"SingleStream": 64, "Server": 460}
# The default run: the wall and the calibration before the tests, a model load per test process.
OVERHEADS = Overheads(spent_s=75.0, per_test_s=6.0, modes=("performance", "accuracy"), accuracy_samples=SAMPLES)


def machine(ttft_s, token_s, row_s, speed=1.0):
    """What the calibration measures on a machine whose one request takes `ttft_s` to its first
    token and `token_s` a token after it, a batch prefilling each prompt in `ttft_s` and decoding a
    step of b rows in token_s + row_s * b; all `speed` times faster."""
    ttft, token, row = ttft_s / speed, token_s / speed, row_s / speed

    def rate(b):
        return b / (b * ttft + (TOKENS - 1) * (token + row * b))
    return Measurement(ttft + (TOKENS - 1) * token, {16: rate(16), 32: rate(32)}, 40.0, ttft_s=ttft, token_s=token)


THIS_VM = machine(2.3, 0.064, 0.002)  # eager bf16 on the 2-core AVX2 Zen 3 of the issue
FAST = machine(2.3, 0.064, 0.002, speed=40.0)  # a compiled kernel on a bigger CPU
SLOW = machine(2.3, 0.064, 0.002, speed=0.25)


def default_scenarios():
    return [load_scenario_config(name) for name in ("Offline", "Server", "SingleStream")]


def by_hand(scenarios, m: Measurement, overheads: Overheads) -> dict:
    """Each test's seconds, restated from LoadGen's behaviour: Offline's issued samples at the
    measured rate (+10%), SingleStream's queries one after another, Server's queries at its QPS,
    and the accuracy tests going over the data set once."""
    out = {}
    for sc in scenarios:
        rate = m.throughput.get(sc.max_batch)
        if sc.name == "Offline":
            # ... and never shorter than its one slowest request.
            out["Offline performance"] = max(1.1 * sc.offline_expected_qps * sc.min_duration_s / rate,
                                             m.single_stream_latency_s)
            out["Offline accuracy"] = max(SAMPLES / rate, m.single_stream_latency_s)
        elif sc.name == "SingleStream":
            out["SingleStream performance"] = max(sc.min_duration_s, sc.min_query_count * m.single_stream_latency_s)
            out["SingleStream accuracy"] = SAMPLES * m.single_stream_latency_s
        else:
            out["Server performance"] = max(sc.min_duration_s, sc.min_query_count / sc.target_qps)
            # LoadGen issues an accuracy test's samples within ~10 s: they run at the batch's throughput.
            out["Server accuracy"] = SAMPLES / rate + m.single_stream_latency_s
    return out


def assert_valid_settings(p, m: Measurement):
    s = {sc.name: sc for sc in p.scenarios}
    offline, single, server = s["Offline"], s["SingleStream"], s["Server"]
    # Offline: a machine 30% faster than measured still takes longer than min_duration on its samples.
    rate = m.throughput[offline.max_batch]
    assert offline.offline_expected_qps * offline.min_duration_s / (1.3 * rate) > offline.min_duration_s
    assert single.min_query_count >= EARLY_STOPPING["SingleStream"]
    assert single.expected_latency_ms == pytest.approx(1e3 * m.single_stream_latency_s, rel=1e-3)
    assert server.min_query_count >= EARLY_STOPPING["Server"]
    # At 0.85 of its capacity a Server test on the 2-core VM had one query of 480 over its TTFT limit.
    assert server.target_qps <= 0.75 * m.throughput[server.max_batch] + 1e-3
    assert all(sc.min_duration_s >= MIN_DURATION_S for sc in p.scenarios)


def test_a_fast_machine_keeps_the_yamls_durations_and_fits():
    p = plan(default_scenarios(), FAST, overheads=OVERHEADS)
    assert_valid_settings(p, FAST)
    assert not p.smallest and [sc.min_duration_s for sc in p.scenarios] == [30, 30, 20]
    assert p.predicted_s == pytest.approx(by_hand(p.scenarios, FAST, OVERHEADS), rel=1e-2)
    assert p.total_s == pytest.approx(75 + 6 * 6 + sum(p.predicted_s.values()))
    assert p.fits and p.total_s <= BUDGET_S and not p.cannot_be_valid
    assert "OVER BUDGET" not in p.text() and p.text().startswith("plan: 6 tests, about")


def test_durations_are_cut_to_the_least_when_that_makes_it_fit():
    full = plan(default_scenarios(), FAST, overheads=OVERHEADS)
    # A budget the YAML's durations miss by a little: the plan cuts every min_duration to MIN_DURATION_S.
    tight = plan(default_scenarios(), FAST, budget_s=full.total_s - 10, overheads=OVERHEADS)
    assert tight.smallest and tight.fits
    assert {sc.min_duration_s for sc in tight.scenarios} == {MIN_DURATION_S}
    assert_valid_settings(tight, FAST)
    assert tight.predicted_s == pytest.approx(by_hand(tight.scenarios, FAST, OVERHEADS), rel=1e-2)
    assert "cut to the least" in tight.text()


@pytest.mark.parametrize("m, name", [(THIS_VM, "this VM"), (SLOW, "4x slower")])
def test_a_slow_machine_is_told_how_long_and_why_before_it_starts(m, name):
    p = plan(default_scenarios(), m, overheads=OVERHEADS)
    assert_valid_settings(p, m)  # still the smallest VALID settings, not invalid ones that fit
    assert p.smallest and not p.fits
    assert p.predicted_s == pytest.approx(by_hand(p.scenarios, m, OVERHEADS), rel=1e-2)
    text = p.text()
    assert f"OVER BUDGET: even the smallest valid plan takes about {p.total_s / 60:.1f} min" in text
    # The biggest share is named first: 80 SingleStream queries of one request's latency each.
    biggest = max(p.predicted_s, key=p.predicted_s.get)
    assert p.over_budget_reasons()[0].startswith(f"{biggest} {p.predicted_s[biggest]:.0f} s")
    assert "SingleStream performance" in text and "64 queries one after another" in text
    # One request's first token takes 2.3 s here (9.2 s at 4x slower): Server's 2000 ms p99 TTFT is out of reach.
    assert any(why.startswith(f"Server: one request alone takes {1e3 * m.ttft_s:.0f} ms to its first token")
               for why in p.cannot_be_valid)
    assert "CANNOT BE VALID: Server" in text
    record = p.to_dict()
    assert record["fits"] is False and record["over_budget_reasons"] and record["cannot_be_valid"]


def test_the_plan_scales_with_the_machine():
    fast, this, slow = (plan(default_scenarios(), m, overheads=OVERHEADS) for m in (FAST, THIS_VM, SLOW))

    def of(p, name):
        return {sc.name: sc for sc in p.scenarios}[name]
    assert of(slow, "SingleStream").expected_latency_ms == pytest.approx(
        4 * of(this, "SingleStream").expected_latency_ms, rel=1e-3)
    # Both at the heaviest load they may carry: the QPS scales with the speed.
    assert of(this, "Server").target_qps == pytest.approx(4 * of(slow, "Server").target_qps, rel=1e-2)
    assert fast.total_s < this.total_s < slow.total_s


def test_performance_only_runs_plan_no_accuracy_tests():
    o = dataclasses.replace(OVERHEADS, modes=("performance",))
    p = plan(default_scenarios(), FAST, overheads=o)
    assert set(p.predicted_s) == {"Offline performance", "Server performance", "SingleStream performance"}
    assert settings_of(p.scenarios[0]) == {"min_duration_s": 30, "offline_expected_qps":
                                           p.scenarios[0].offline_expected_qps, "min_query_count": 1}
    assert p.scenarios[0].offline_expected_qps == pytest.approx(OFFLINE_MARGIN * FAST.throughput[32], rel=1e-3)


def test_accuracy_in_the_first_scenario_only_plans_one_accuracy_test_and_says_so():
    only_offline = dataclasses.replace(OVERHEADS, accuracy_in=("Offline",))
    every = plan(default_scenarios(), THIS_VM, overheads=OVERHEADS)
    p = plan(default_scenarios(), THIS_VM, overheads=only_offline)
    assert set(p.predicted_s) == {"Offline performance", "Offline accuracy", "Server performance",
                                  "SingleStream performance"}
    assert p.total_s == pytest.approx(75 + 6 * 4 + sum(p.predicted_s.values()))
    assert "accuracy is checked in Offline only" in p.text()
    assert "accuracy is checked" not in every.text()
    # The time the other accuracy tests took goes to Server's load, never above its cap.
    s = {sc.name: sc for sc in p.scenarios}
    assert s["Server"].target_qps >= {sc.name: sc for sc in every.scenarios}["Server"].target_qps
    assert_valid_settings(p, THIS_VM)
