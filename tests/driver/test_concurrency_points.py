"""Point placement against the MLPerf Endpoints rules (endpoints_rules.md 5.4-5.5,
6.2): the rules' worked examples, and their reference algorithm's formulas
evaluated here independently for the cases the examples round by hand."""
import math

import pytest

from wallperf.driver.concurrency_points import check_points, place_points, regions, window_s


@pytest.mark.parametrize("c_min,c_max,low_end,medium_end", [
    (32, 8192, 52, 437),   # the rules' Example A
    (1, 256, 7, 41),       # the rules' Example B
])
def test_regions_match_the_rules_worked_examples(c_min, c_max, low_end, medium_end):
    r = regions(c_min, c_max)
    assert (r.low_end, r.medium_end) == (low_end, medium_end)
    assert r.margin_end == math.ceil(1.1 * c_max)
    assert r.to_dict()["high"] == [medium_end + 1, c_max]


def test_example_c_follows_the_reference_algorithm():
    # The rules' Example C prints 116 for the medium region's end, from 2^6.652 rounded by hand
    # to 100.4; the reference algorithm (which the rules make authoritative) gives 16 + 100.53.
    step = math.log2(1024 - 16) / 3
    assert 100.5 < 2 ** (2 * step) < 100.6
    r = regions(16, 1024)
    assert (r.low_end, r.medium_end) == (26, 117)


def test_regions_refuse_what_the_reference_algorithm_asserts():
    with pytest.raises(ValueError, match="1-32"):
        regions(33, 1000)
    with pytest.raises(ValueError, match="above 32"):
        regions(1, 32)


@pytest.mark.parametrize("c_max,n", [(33, 7), (48, 7), (64, 7), (256, 7), (1024, 12), (8192, 32)])
def test_placed_points_meet_the_minimum_submission_requirements(c_max, n):
    points = place_points(c_max, n)
    assert len(points) == n == len(set(points))
    assert points[0] == 1 and points[-1] == c_max
    r, problems = check_points(points)
    assert problems == []
    assert {r.region_of(p) for p in points} >= {"ultra_low", "low", "medium", "high"}


def test_check_points_names_an_empty_region():
    # Example B's regions: low 2-7, medium 8-41, high 42-256; nothing in medium.
    _, problems = check_points([1, 2, 3, 4, 5, 42, 256])
    assert problems == ["no point in the medium concurrency region (8-41)"]
    _, problems = check_points([1, 2, 4, 8, 16, 32])
    assert any("7-32" in p for p in problems) and any("not above 32" in p for p in problems)


def test_point_count_is_bounded():
    with pytest.raises(ValueError, match="7-32"):
        place_points(64, 6)
    with pytest.raises(ValueError, match="7-32"):
        place_points(4096, 33)


def test_official_windows_are_the_rules_durations():
    assert window_s(32, True, 5) == 600
    assert window_s(33, True, 5) == 1200
    assert window_s(1000, False, 5) == 5
