"""Where a fixed-concurrency sweep measures, as MLPerf Endpoints places its points
(mlcommons endpoints_policies, endpoints_rules.md v1.0 draft, sections 5.3-5.6 and 6.2).

The concurrency space has four regions: the ultra-low one (1 to 32, fixed for
every submission) holding C_min, the lowest point; beyond it, three regions of
equal width in log2 space up to C_max, the highest concurrency the system is
benchmarked at, with a margin to ceil(1.1 * C_max). A submission has 7 to 32
points: one at C_min, at least one in each of the three regions, the rest
anywhere past C_min. Boundaries round half to even (Python's round), as the
rules' reference algorithm does.

Each point holds its concurrency for a steady-state window: 600 s in the
ultra-low region and 1,200 s beyond it under the rules (`official`); far
shorter ones otherwise, so that a sweep fits in minutes on a small machine.

Counts (sections 6.4, 6.5 and the reference client's alignment of its issue
count): the samples a point issues are a whole multiple of the data set's size
(rounded up, never down), and a point completes at least a minimum of queries:
one pass over the data set, as the current draft asks in every region (an
earlier draft asked 64 up to concurrency 32 and 512 above; --min-queries takes
any number).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from wallperf.audit.endpoints import LAG_LIMIT_MS
from wallperf.harness.config import positive

ULTRA_LOW_MAX = 32
MIN_POINTS, MAX_POINTS = 7, 32
MARGIN = 1.10
OFFICIAL_WINDOW_S = {"ultra_low": 600.0, "other": 1200.0}
REGIONS = ("ultra_low", "low", "medium", "high", "margin")


@dataclass(frozen=True)
class Regions:
    c_min: int
    c_max: int
    low_end: int
    medium_end: int
    margin_end: int

    def region_of(self, c: int) -> str | None:
        """The region concurrency `c` lies in, or None (below 1 or past the margin)."""
        if 1 <= c <= self.c_min:
            return "ultra_low"
        if c <= self.low_end:
            return "low"
        if c <= self.medium_end:
            return "medium"
        if c <= self.c_max:
            return "high"
        if c <= self.margin_end:
            return "margin"
        return None

    def to_dict(self) -> dict:
        return {"ultra_low": [1, self.c_min], "low": [self.c_min + 1, self.low_end],
                "medium": [self.low_end + 1, self.medium_end], "high": [self.medium_end + 1, self.c_max],
                "margin": [self.c_max + 1, self.margin_end]}


def regions(c_min: int, c_max: int) -> Regions:
    """The regions of a sweep from C_min (1-32) to C_max (> 32)."""
    if not 1 <= c_min <= ULTRA_LOW_MAX:
        raise ValueError(f"the lowest concurrency must be 1-{ULTRA_LOW_MAX}, not {c_min}")
    if c_max <= ULTRA_LOW_MAX:
        raise ValueError(f"the highest concurrency must be above {ULTRA_LOW_MAX} for the three concurrency "
                         f"regions to exist, not {c_max}")
    step = math.log2(c_max - c_min) / 3
    return Regions(c_min, c_max, round(c_min + 2 ** step), round(c_min + 2 ** (2 * step)), math.ceil(MARGIN * c_max))


def place_points(c_max: int, n: int = MIN_POINTS, c_min: int = 1) -> list[int]:
    """`n` concurrencies from C_min to C_max: C_min, then n - 1 spaced evenly in log2
    space over (C_min, C_max], each region holding at least one."""
    if not MIN_POINTS <= n <= MAX_POINTS:
        raise ValueError(f"a sweep has {MIN_POINTS}-{MAX_POINTS} points, not {n}")
    r = regions(c_min, c_max)
    if n - 1 > c_max - c_min:
        raise ValueError(f"{n} points do not fit between concurrency {c_min} and {c_max}")
    lo, hi = math.log2(c_min + 1), math.log2(c_max)
    points = {c_min}
    k = n - 1
    # Widen the spacing until rounding leaves n distinct levels (it merges the low ones first).
    for extra in range(0, c_max):
        levels = {min(c_max, max(c_min + 1, round(2 ** (lo + (hi - lo) * i / (k - 1 + extra)))))
                  for i in range(k + extra)}
        if len(levels) >= k:
            points |= set(sorted(levels)[:k - 1]) | {c_max}
            break
    for name, (start, end) in list(r.to_dict().items())[1:4]:
        if not any(start <= p <= end for p in points):
            points.add(round(math.sqrt(start * end)))
    return sorted(points)


def check_points(points: list[int]) -> tuple[Regions | None, list[str]]:
    """The regions the points define (C_min their lowest; C_max, which a submitter declares,
    taken as their highest) and what section 5.3 would refuse in them, one line each
    (none when they meet it)."""
    problems = []
    if not MIN_POINTS <= len(points) <= MAX_POINTS:
        problems.append(f"{len(points)} points: the rules ask for {MIN_POINTS}-{MAX_POINTS}")
    c_min, c_max = min(points), max(points)
    if c_min > ULTRA_LOW_MAX:
        problems.append(f"no point in the ultra-low region (1-{ULTRA_LOW_MAX}); the lowest is {c_min}")
        return None, problems
    if c_max <= ULTRA_LOW_MAX:
        problems.append(f"the highest concurrency {c_max} is not above {ULTRA_LOW_MAX}: the three concurrency "
                        "regions collapse (the rules ask for a written justification)")
        return None, problems
    r = regions(c_min, c_max)
    for name in ("low", "medium", "high"):
        if not any(r.region_of(p) == name for p in points):
            start, end = r.to_dict()[name]
            problems.append(f"no point in the {name} concurrency region ({start}-{end})")
    return r, problems


def accuracy_points(points: list[int], r: Regions | None) -> set[int]:
    """Where section 5.3 asks for accuracy: the low-latency point (C_min) and one point in
    each of the low, medium and high regions (here the highest of each, where batching
    presses hardest). Without regions (points the rules would refuse) every point."""
    if r is None:
        return set(points)
    chosen = {min(points)}
    for name in ("low", "medium", "high"):
        inside = [p for p in points if r.region_of(p) == name]
        if inside:
            chosen.add(max(inside))
    return chosen


def whole_passes(issued: int, multiple: int) -> bool:
    """Whether `issued` samples are what the rules ask a point to issue: a positive whole
    multiple of the data set's size. None is not one: a point whose slots were all still busy
    with warm-up requests when its window closed goes on until it has issued a pass."""
    return issued > 0 and issued % multiple == 0


def count_check(records: list[dict], window: tuple[float, float], dataset_size: int,
                min_queries: int | None = None) -> dict:
    """The point's counts against the rules: samples issued from the window's start on
    (a record's `counted`, else sent at or after the window's start), those completed
    (answered in full, not failed or cut), and the reasons the point is invalid by them."""
    issued = [r for r in records if r["counted"]] if records and all("counted" in r for r in records) else \
        [r for r in records if r.get("sent") is not None and r["sent"] >= window[0]]
    completed = sum(r.get("error") is None and not r.get("cut_at_window_end") for r in issued)
    minimum = dataset_size if min_queries is None else min_queries
    reasons = []
    if not whole_passes(len(issued), dataset_size):
        reasons.append(f"{len(issued)} samples issued, not a positive whole multiple of the data set's "
                       f"{dataset_size}")
    if completed < minimum:
        reasons.append(f"{completed} queries completed, fewer than the {minimum} a point needs"
                       + (" (one pass over the data set)" if min_queries is None else " (--min-queries)"))
    return {"issued": len(issued), "completed": completed, "dataset_size": dataset_size,
            "passes": len(issued) / dataset_size, "min_queries": minimum, "reasons": reasons}


def window_s(concurrency: int, official: bool, short_s: float) -> float:
    """The steady-state window of a point: the rules' with `official`, else `short_s`."""
    if not official:
        return short_s
    return OFFICIAL_WINDOW_S["ultra_low" if concurrency <= ULTRA_LOW_MAX else "other"]


def add_concurrency_options(p) -> None:
    """`wallperf sweep`'s options of the concurrency mode."""
    p.add_argument("--concurrency", help="fixed-concurrency points (MLPerf Endpoints) instead of --qps: a comma "
                   "list, or 'auto': --points levels placed as the rules place them, 1 to --max-concurrency")
    p.add_argument("--max-concurrency", type=positive(int), default=64,
                   help="auto: the highest concurrency (C_max, > 32)")
    p.add_argument("--points", type=positive(int), default=7, help="auto: how many points, 7-32 (default 7)")
    p.add_argument("--official", action="store_true", help="the rules' steady-state windows (600 s up to "
                   "concurrency 32, 1,200 s above) instead of --window")
    p.add_argument("--window", type=positive(float), default=20.0,
                   help="seconds of steady state per point (default 20)")
    p.add_argument("--warmup", type=positive(float), default=5.0, help="seconds before each window (default 5)")
    p.add_argument("--client-workers", default="1", help="client processes sending the load to endpoints "
                   "(default 1), or ray:N for N workers on a Ray cluster (the 'ray' extra)")
    p.add_argument("--ray-address", help="ray:N: the Ray cluster's address (default: RAY_ADDRESS, else 'auto', "
                   "the cluster this machine is part of)")
    p.add_argument("--min-queries", type=positive(int), help="--concurrency: the completed queries a point needs "
                   "to be valid (default: one pass over the data set, as the rules ask); --qps: LoadGen's "
                   "min_query_count of every point's run")
    p.add_argument("--lag-limit-ms", type=positive(float), default=LAG_LIMIT_MS, help="the p99 send lag and event-loop "
                   f"lag above which a point is invalid: the client fell behind (default {LAG_LIMIT_MS:g})")
    p.add_argument("--salt", action="store_true", help="a 64-bit salt per query between the system prompt and "
                   "the user's content, so a prefix cache reuses the system prompt only")
    p.add_argument("--accuracy", action="store_true", help="MMLU exact match at the points the rules name "
                   "(the lowest, and the highest in each of the low, medium and high regions), right after each "
                   "at its concurrency (every question once, unsalted)")
