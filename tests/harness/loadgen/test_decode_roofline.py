"""Decode-phase MBU from LoadGen's TPOT: bytes per step over time per output token."""
import pytest

from wallperf.harness.loadgen.results import decode_roofline


def test_decode_mbu_from_tpot_median_and_p99():
    # 276 MB per step at 10 ms per token is 27.6 GB/s; against a 46 GB/s wall, 60%.
    out = decode_roofline(276e6, 46.0, {"p50": 10.0, "p90": 11.0, "p99": 12.0})
    assert out["decode_achieved_bandwidth_gbps"] == pytest.approx(27.6)
    assert out["decode_mbu"] == pytest.approx(0.6)
    assert out["decode_mbu_at_p99"] == pytest.approx(276e6 / 0.012 / 46e9)


@pytest.mark.parametrize("tpot", [None, {}, {"p50": None, "p99": None}, {"p50": 0.0}])
def test_no_tpot_gives_no_decode_figures(tpot):
    assert decode_roofline(1e6, 10.0, tpot) == {"decode_achieved_bandwidth_gbps": None, "decode_mbu": None,
                                                 "decode_mbu_at_p99": None}
