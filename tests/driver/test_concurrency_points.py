"""Point placement against the MLPerf Endpoints rules (endpoints_rules.md 5.4-5.5,
6.2): the rules' worked examples, and their reference algorithm's formulas
evaluated here independently for the cases the examples round by hand."""
import math

import pytest

from wallperf.driver.concurrency_points import (accuracy_points, check_points, count_check, place_points, regions,
                                                window_s)


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


def _record(sent, counted=None, error=None, cut=False):
    r = {"sent": sent, "error": error}
    if counted is not None:
        r["counted"] = counted
    if cut:
        r["cut_at_window_end"] = True
    return r


def test_count_check_asks_whole_passes_and_the_minimum_completed():
    window = (1.0, 11.0)
    # Two warm-up requests (sent before the window) and ten issued from its start: two passes of 5.
    records = [_record(0.5), _record(0.9)] + [_record(1.0 + i) for i in range(10)]
    c = count_check(records, window, dataset_size=5)
    assert (c["issued"], c["completed"], c["passes"], c["reasons"]) == (10, 10, 2.0, [])
    # Eleven issued: not whole passes of 5.
    c = count_check(records + [_record(11.5)], window, dataset_size=5)
    assert c["reasons"] == ["11 samples issued, not a positive whole multiple of the data set's 5"]
    # None issued from the window's start (every slot busy with warm-up requests till its end): no pass.
    c = count_check(records[:2], window, dataset_size=5)
    assert c["reasons"][0] == "0 samples issued, not a positive whole multiple of the data set's 5"
    # Whole passes, but a failure and a cut request: 8 completed against the default minimum
    # of one pass (5) is enough; against --min-queries 9 it is not.
    bad = records[:2] + [_record(1.0 + i, error="HTTP 500" if i == 3 else None, cut=i == 4) for i in range(10)]
    assert count_check(bad, window, 5)["reasons"] == []
    c = count_check(bad, window, 5, min_queries=9)
    assert c["completed"] == 8
    assert c["reasons"] == ["8 queries completed, fewer than the 9 a point needs (--min-queries)"]
    # The default minimum is one pass over the data set: 10 issued of a 20-sample data set fall short twice over.
    c = count_check(records, window, dataset_size=20)
    assert len(c["reasons"]) == 2 and "fewer than the 20 a point needs (one pass over the data set)" in c["reasons"][1]


def test_count_check_prefers_the_clients_own_mark():
    # A request the client counted at its send decision, stamped sent a hair before the window, still counts.
    records = [_record(0.999, counted=True), _record(1.5, counted=True), _record(0.5, counted=False)]
    assert count_check(records, (1.0, 2.0), dataset_size=2)["issued"] == 2


def test_accuracy_at_the_four_points_section_5_3_names():
    # The rules' Example B (C_min 1, C_max 256): low 2-7, medium 8-41, high 42-256, and its 7-point example.
    points = [1, 4, 16, 32, 64, 128, 256]
    r, problems = check_points(points)
    assert problems == []
    assert accuracy_points(points, r) == {1, 4, 32, 256}
    # Points the rules would refuse (no region past 32): every point is checked.
    assert accuracy_points([1, 2, 4], None) == {1, 2, 4}
