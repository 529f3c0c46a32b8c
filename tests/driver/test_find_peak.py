"""wallperf.driver.find_peak with a fake `run_one`: validity is a known function of QPS,
so the boundary the bisection must find is known in advance."""
from pathlib import Path

import pytest

from wallperf.driver.find_peak import PeakPoint, find_peak, format_curve, try_log_dir

BOUNDARY = 7.3


class FakeServer:
    """A result record as harness.loadgen.results builds it: VALID up to BOUNDARY QPS, with
    tokens/s and latencies that grow with the load; every call is remembered."""

    def __init__(self, valid=lambda qps: qps <= BOUNDARY):
        self.valid, self.calls = valid, []

    def __call__(self, qps: float) -> dict:
        self.calls.append(qps)
        ok = self.valid(qps)
        return {"valid": ok, "invalid_reasons": [] if ok else ["performance constraints not met"],
                "log_dir": f"logs/{qps}",
                "metrics": {"tokens_per_second": 10 * qps, "ttft_ms": {"p50": 1.0, "p99": 100 * qps},
                            "tpot_ms": {"p50": 1.0, "p99": 5 * qps}}}


def test_bisection_brackets_the_boundary_within_tolerance():
    fake = FakeServer()
    result = find_peak(fake, lo=1, hi=20, tolerance=0.1, max_runs=20)
    good, bad = result.bracket
    assert good <= BOUNDARY < bad and bad - good <= 0.1
    assert result.peak_qps == good and BOUNDARY - 0.1 < result.peak_qps <= BOUNDARY
    assert result.stop_reason.startswith("converged")
    assert fake.calls[:2] == [1, 20]
    # Halving 19 QPS down to 0.1 takes ceil(log2(190)) = 8 midpoints.
    assert len(fake.calls) == 2 + 8


def test_every_point_is_recorded_with_its_figures():
    fake = FakeServer()
    result = find_peak(fake, lo=2, hi=10, tolerance=1, max_runs=10)
    assert [p.qps for p in result.points] == fake.calls
    assert [p.qps for p in result.curve()] == sorted(fake.calls)
    for p in result.points:
        assert p.valid == (p.qps <= BOUNDARY)
        assert (p.tokens_per_second, p.ttft_p99_ms, p.tpot_p99_ms) == (10 * p.qps, 100 * p.qps, 5 * p.qps)
        assert p.reasons == (() if p.valid else ("performance constraints not met",))
        assert p.log_dir == f"logs/{p.qps}"
    d = result.to_dict()
    assert d["peak_qps"] == result.peak_qps and d["peak_tokens_per_second"] == 10 * result.peak_qps
    assert [c["qps"] for c in d["curve"]] == sorted(fake.calls) and d["runs"] == len(fake.calls)
    assert "peak:" in format_curve(result)


@pytest.mark.parametrize("max_runs", [1, 2, 3, 5])
def test_max_runs_is_respected(max_runs):
    fake = FakeServer()
    result = find_peak(fake, lo=1, hi=100, tolerance=0.01, max_runs=max_runs)
    assert len(fake.calls) == max_runs
    assert result.stop_reason == "max_runs reached"
    assert result.peak_qps == max(q for q in fake.calls if q <= BOUNDARY)


def test_invalid_at_lo_and_valid_at_hi_end_the_search():
    below = FakeServer()
    result = find_peak(below, lo=8, hi=20, tolerance=0.1, max_runs=10)
    assert below.calls == [8] and result.peak_qps is None and result.bracket == (None, 8)
    above = FakeServer()
    result = find_peak(above, lo=1, hi=5, tolerance=0.1, max_runs=10)
    assert above.calls == [1, 5] and result.peak_qps == 5 and result.bracket == (5, None)


def test_an_unlucky_invalid_run_closes_the_bracket_below_it():
    # VALID up to 15 but for one noisy INVALID at the first midpoint, 10.5.
    fake = FakeServer(valid=lambda qps: qps != 10.5 and qps <= 15)
    result = find_peak(fake, lo=1, hi=20, tolerance=1, max_runs=20)
    assert fake.calls[:3] == [1, 20, 10.5]
    assert all(q < 10.5 for q in fake.calls[3:])
    assert result.peak_qps == max(fake.calls[3:]) and result.bracket[1] == 10.5


def test_a_record_without_a_verdict_counts_as_invalid():
    p = PeakPoint.from_record(3.0, {"valid": None, "invalid_reasons": ["the SUT failed: x"], "metrics":
                                    {"tokens_per_second": None, "ttft_ms": None, "tpot_ms": None}})
    assert not p.valid and p.ttft_p99_ms is None and p.reasons == ("the SUT failed: x",)


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        find_peak(FakeServer(), lo=5, hi=5, tolerance=0.1, max_runs=3)
    with pytest.raises(ValueError):
        find_peak(FakeServer(), lo=1, hi=5, tolerance=0, max_runs=3)


def test_each_try_has_its_own_log_folder():
    perf = Path("out/sys/model/Server/performance")
    assert try_log_dir(perf, 2.5) == perf / "find_peak" / "qps_2.5"
    assert try_log_dir(perf, 10) == perf / "find_peak" / "qps_10"
    assert try_log_dir(perf, 1 / 3) != try_log_dir(perf, 1 / 3 + 1e-4)
