"""The played Server test (wallperf.driver.server_sim) against queueing theory, and the
plan's use of it: a Server load no higher than the played test keeps within the TTFT limit."""
import dataclasses

import pytest

from wallperf.driver.calibrate import Measurement
from wallperf.driver.plan import plan
from wallperf.driver.server_sim import TTFT_MARGIN, EngineCosts, play, safe_load, worst_case
from wallperf.harness.config import load_scenario_config


def test_prompts_alone_queue_as_the_pollaczek_khinchine_formula_says():
    """One-token outputs: no decoding, each request one prefill of fixed length, so the engine is an
    M/D/1 queue. Mean wait = rho D / (2 (1 - rho)) (Pollaczek-Khinchine), TTFT = wait + D."""
    costs = EngineCosts(token_s=0.01, prefill_token_s=0.001, batch_step_s=0.05, max_batch=16)
    service = costs.prefill(190)  # 0.2 s
    for rho in (0.3, 0.7):
        ttft, _ = play(rho / service, 40_000, [190], 1, costs, seed=3)
        want = rho * service / (2 * (1 - rho)) + service
        assert sum(ttft) / len(ttft) == pytest.approx(want, rel=0.04)


def test_a_lone_request_takes_its_prefill_then_one_row_steps():
    costs = EngineCosts(token_s=0.012, prefill_token_s=0.0015, batch_step_s=0.06, max_batch=16)
    ttft, tpot = play(1e-4, 3, [100], 64, costs)  # arrivals hours apart
    assert ttft == pytest.approx([0.012 + 0.15] * 3)
    assert tpot == pytest.approx([0.012] * 3)
    assert costs.decode(16) == pytest.approx(0.06) and costs.decode(1) == pytest.approx(0.012)


def test_requests_decoding_together_share_each_step():
    """Two requests at once: the second's prefill waits for the first's; then both decode in
    steps of two rows (costs.decode(2)), the first alone for the step of the second's prefill."""
    costs = EngineCosts(token_s=0.01, prefill_token_s=0.001, batch_step_s=0.01 + 15 * 0.002, max_batch=16)
    ttft, tpot = play(1e6, 2, [100], 3, costs)  # both arrive within microseconds
    first, second = 0.11, 0.11 + (0.11 + 0.01)  # the second's prefill step also decodes the first
    assert ttft == pytest.approx([first, second], abs=1e-4)
    # The first: tokens at the second's step (0.12 s later) and one more step of two rows (0.012).
    assert tpot[0] == pytest.approx((0.12 + 0.012) / 2, abs=1e-4)


def test_the_safe_load_is_the_highest_the_margin_allows():
    costs = EngineCosts(token_s=0.0114, prefill_token_s=0.00166, batch_step_s=0.045, max_batch=16)
    lengths = [121, 155, 135, 175, 241, 192, 123, 313, 364, 104, 110, 150]
    load = safe_load(2.0, 464, lengths, 64, costs, ttft_limit_s=2.0, tpot_limit_s=0.2, highest=0.75)
    assert 0.2 < load < 0.75
    assert worst_case(load * 2.0, 464, lengths, 64, costs)[0] <= TTFT_MARGIN * 2.0
    assert worst_case((load + 0.03) * 2.0, 464, lengths, 64, costs)[0] > TTFT_MARGIN * 2.0
    # A limit no load can meet: a prompt alone takes longer.
    assert safe_load(2.0, 464, lengths, 64, costs, ttft_limit_s=0.5, tpot_limit_s=0.2, highest=0.75) is None


def _vm(**change):
    """The 2-core AVX2 VM's calibration in the default run, with what playing a Server test needs."""
    m = Measurement(0.928, {16: 2.02, 32: 2.04}, 20.0, ttft_s=0.2126, token_s=0.0114,
                    prefill_token_s=(0.2126 - 0.0114) / 121, batch_step_s={16: 0.045, 32: 0.08},
                    prompt_lengths=(121, 155, 135, 175, 241, 192, 123, 313, 364, 104, 110, 150), tokens=64)
    return dataclasses.replace(m, **change)


def test_the_plan_takes_no_server_load_above_the_played_one():
    scenarios = [load_scenario_config(n) for n in ("Offline", "Server", "SingleStream")]
    m = _vm()
    p = plan(scenarios, m)
    server = next(sc for sc in p.scenarios if sc.name == "Server")
    safe = safe_load(2.02, server.min_query_count, m.prompt_lengths, 64,
                     EngineCosts(0.0114, m.prefill_token_s, 0.045, 16), 2.0, 0.2, 0.75)
    assert server.target_qps <= round(safe * 2.02, 3) + 1e-9
    assert any("played out from the calibration" in line for line in p.text().splitlines())
    assert p.to_dict()["notes"]
    # Without the figures (an older calibration), only the shares bound it, as before.
    bare = plan(scenarios, _vm(prefill_token_s=None))
    assert not bare.notes


def test_a_limit_no_load_meets_is_said_before_the_tests():
    server = dataclasses.replace(load_scenario_config("Server"), ttft_ms=500.0)
    p = plan([server], _vm())
    assert any("no load keeps a played test" in why for why in p.cannot_be_valid)
    assert "CANNOT BE VALID" in p.text()


@pytest.mark.parametrize("budget_s,edge,want", [
    (600.0, 0.52, "need"),  # the budget's load lies between 85% of the edge and the edge: it is taken
    (3000.0, 0.52, "floor"),  # a long budget: 85% of the edge, not the budget's light load
    (200.0, 0.52, "edge"),  # the budget asks more than the edge: the edge, over budget
    (600.0, 0.70, "SERVER_LOAD"),  # an edge above SERVER_LOAD: SERVER_LOAD as before
])
def test_below_server_load_the_plan_keeps_a_margin_under_the_played_edge(monkeypatch, budget_s, edge, want):
    """A shared machine's stalls lengthen the real tail past the played one, so where the played
    edge is below SERVER_LOAD the Server test runs at the least load that fits the budget, at
    most the edge and at least PLAYED_SHARE of it."""
    from wallperf.driver import plan as plan_module

    monkeypatch.setattr(plan_module, "_played_loads", lambda scenarios, m: {"Server": edge})
    scenarios = [load_scenario_config(n) for n in ("Offline", "Server", "SingleStream")]
    m = _vm()
    p = plan_module.plan(scenarios, m, budget_s=budget_s)
    server = next(sc for sc in p.scenarios if sc.name == "Server")
    load = server.target_qps / m.throughput[16]
    others = p.total_s - p.predicted_s["Server performance"]
    need = server.min_query_count / (budget_s - others) / m.throughput[16]  # fills the budget exactly
    expected = {"need": need, "floor": plan_module.PLAYED_SHARE * edge, "edge": edge,
                "SERVER_LOAD": plan_module.SERVER_LOAD}[want]
    assert load == pytest.approx(expected, abs=2e-3)
    assert load <= edge + 1e-9
    if want == "need":
        assert plan_module.PLAYED_SHARE * edge < need < edge and p.fits
    if want == "floor":
        assert need < plan_module.PLAYED_SHARE * edge
