"""audit.endpoints on hand-built requests whose figures are worked out here by hand,
by the definitions of MLPerf Endpoints (endpoints_rules.md 4.1)."""
import pytest

from wallperf.audit.endpoints import achieved_concurrency, point_figures, self_check


def req(sent, first, last, tokens, *, scheduled=None, done=None, in_window=None, url="a", error=None, cut=False):
    r = {"scheduled": sent if scheduled is None else scheduled, "sent": sent, "first": first, "last": last,
         "done": last if done is None else done, "tokens": tokens,
         "tokens_in_window": tokens if in_window is None else in_window, "error": error, "url": url}
    if cut:
        r["cut_at_window_end"] = True
    return r


def test_figures_by_the_rules_definitions():
    # Window 0-10 s. Ten requests, TPOT 10..100 ms: p90 of [10, 20, ..., 100] (linear) is 91 ms.
    reqs = [req(i, i + 0.1 * (i + 1), i + 0.1 * (i + 1) + 0.01 * (i + 1) * 10, 11) for i in range(10)]
    p = point_figures(reqs, (0.0, 10.0), target=1, limits_ms=(550.0, 55.0))
    assert p["tpot_ms"]["p90"] == pytest.approx(91.0)
    assert p["tokens_per_second_per_user"] == pytest.approx(1000 / 91.0)
    assert p["system_tokens_per_second"] == pytest.approx(110 / 10)
    assert p["ttft_ms"]["p50"] == pytest.approx(550.0)
    # Within TTFT 550 ms and TPOT 55 ms: requests 0-4 (TTFT 100-500, TPOT 10-50).
    assert p["goodput"]["share"] == pytest.approx(0.5)
    assert p["replicas"]["a"]["requests"] == 10


def test_achieved_concurrency_is_the_time_average_in_flight():
    # In a 0-10 s window: one request in flight 0-10 (1.0), one 5-15 (cut at 10: 0.5), one 2-4 (0.2).
    reqs = [req(0, 1, 10, 5), req(5, 6, 15, 5, cut=True, done=15), req(2, 3, 4, 5)]
    assert achieved_concurrency(reqs, (0.0, 10.0)) == pytest.approx(1.7)


def test_a_client_that_sent_late_or_held_too_few_is_invalid():
    # Two users, each request 1 s, but sent 0.1 s after it was due: 10% short of the target.
    reqs = [req(t + 0.1, t + 0.2, t + 1.1, 10, scheduled=t) for t in (0.0, 1.1, 2.2) for _ in range(2)]
    check = self_check(reqs, (0.0, 3.3), target=2, loop_lags_s=[0.001] * 10)
    assert check["send_lag_ms"]["p99"] == pytest.approx(100.0)
    assert not check["valid"]
    assert any("sent late" in r for r in check["reasons"])
    assert any("short by 9.1%" in r for r in check["reasons"])
    on_time = [req(t, t + 0.1, t + 1.0, 10, scheduled=t) for t in (0.0, 1.0, 2.0) for _ in range(2)]
    assert self_check(on_time, (0.0, 3.0), target=2, loop_lags_s=[0.001] * 10)["valid"]


def test_failures_are_counted_on_their_replica_and_invalidate():
    reqs = [req(0, 0.1, 1, 5, url="good"), req(0, None, None, 0, done=0.01, url="bad", error="HTTP 500: boom")]
    p = point_figures(reqs, (0.0, 1.0), target=2)
    assert not p["valid"]
    assert p["invalid_reasons"][0].startswith("1 requests failed: bad: HTTP 500: boom")
    assert p["replicas"]["bad"]["failures"] == 1 and p["replicas"]["good"]["failures"] == 0
    assert sum(r["requests"] for r in p["replicas"].values()) == p["requests"] == 2


def test_latencies_cover_the_issued_samples_the_tail_included():
    # Window 0-10 s. A warm-up request (not counted), one counted inside the window, and one the
    # client counted after the window to complete the pass: the latencies are the two counted ones.
    warm = {**req(-1.0, -0.5, 2.0, 11), "counted": False}
    inside = {**req(1.0, 1.2, 3.2, 11), "counted": True}
    tail = {**req(12.0, 12.6, 13.6, 11), "counted": True}
    p = point_figures([warm, inside, tail], (0.0, 10.0), target=1)
    assert p["measured"] == 2
    # TTFT 200 and 600 ms (p50 400); TPOT 200 and 100 ms.
    assert p["ttft_ms"]["p50"] == pytest.approx(400.0)
    assert p["tpot_ms"]["p50"] == pytest.approx(150.0)
