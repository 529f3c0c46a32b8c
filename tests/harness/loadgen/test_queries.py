"""Issued lengths and goodput from per-query timings, against hand-worked figures."""
import pytest

from wallperf.harness.loadgen.queries import goodput, issued_lengths
from wallperf.sut.adapter import QueryTiming


def _q(sample, issued, first, done, n):
    return QueryTiming(sample, issued, first, done, n)


QUERIES = [
    # TTFT 0.1 s, TPOT (1.1 - 0.1) / 10 = 0.1 s
    _q(0, 0.0, 0.1, 1.1, 11),
    # TTFT 3 s (over a 2 s limit), TPOT 0.05 s
    _q(1, 1.0, 4.0, 4.5, 11),
    # TTFT 0.5 s, TPOT (2.5 - 0.5) / 4 = 0.5 s (over a 0.2 s limit)
    _q(2, 0.0, 0.5, 2.5, 5),
    # TTFT 0.2 s, TPOT 0.01 s
    _q(0, 2.0, 2.2, 2.21, 2),
    # issued, never finished: not counted
    _q(1, 3.0, None, None, 0),
]


def test_timing_follows_loadgens_definitions():
    q = QUERIES[0]
    assert q.ttft_s == pytest.approx(0.1) and q.tpot_s == pytest.approx(0.1)
    assert QUERIES[4].ttft_s is None and QUERIES[4].tpot_s is None


def test_goodput_counts_queries_within_both_limits():
    g = goodput(QUERIES, ttft_limit_ms=2000, tpot_limit_ms=200, tokens_per_second=100.0)
    assert g["queries"] == 4 and g["within_limits"] == 2 and g["share"] == 0.5
    # Good tokens: 11 + 2 of 11 + 11 + 5 + 2 = 29.
    assert g["tokens_per_second"] == pytest.approx(100.0 * 13 / 29)
    assert g["ttft_ms"]["p50"] == pytest.approx(350.0)
    # The two over a limit, in issue order, timed from the first issue (0.0 s).
    assert g["over_limits"] == [{"issued_s": 0.0, "sample_index": 2, "ttft_ms": 500.0, "tpot_ms": 500.0},
                                {"issued_s": 1.0, "sample_index": 1, "ttft_ms": 3000.0, "tpot_ms": 50.0}]
    assert g["over_limits_left_out"] == 0


def test_over_limit_queries_listed_are_bounded():
    many = [_q(i % 3, float(i), i + 5.0, i + 6.0, 11) for i in range(40)]  # TTFT 5 s each
    g = goodput(many, ttft_limit_ms=2000, tpot_limit_ms=None, tokens_per_second=1.0)
    assert len(g["over_limits"]) == 32 and g["over_limits_left_out"] == 8
    assert [o["issued_s"] for o in g["over_limits"]] == [float(i) for i in range(32)]


def test_no_limits_means_every_query_is_good():
    g = goodput(QUERIES, None, None, 10.0)
    assert g["share"] == 1.0 and g["tokens_per_second"] == pytest.approx(10.0) and g["over_limits"] == []
    assert goodput([QUERIES[4]], 1, 1, 1.0) is None


def test_issued_lengths_count_every_issue_of_a_sample():
    prompts = [[0] * 10, [0] * 20, [0] * 30]
    out = issued_lengths(QUERIES, prompts, output_lengths=[100, 200, 300])
    # Samples issued: 0, 1, 2, 0, 1.
    assert out["input"] == {"count": 5, "min": 10, "mean": 18.0, "p50": 20.0, "p90": 26.0, "max": 30}
    assert out["output_target"]["mean"] == 180.0
    # Completed answers: 11, 11, 5, 2 tokens.
    assert out["output"]["count"] == 4 and out["output"]["max"] == 11 and out["output"]["min"] == 2
    assert "output_target" not in issued_lengths(QUERIES, prompts)
