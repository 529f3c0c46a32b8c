"""The stopping rule's error rates and costs, on simulated audits with known drops (pure numpy).

Each simulated audit is a run of paired outcomes per question: +1 the reference
alone right, -1 the candidate alone right, 0 both or neither, with a known
flip rate and true drop. Every audit looks after every question, the worst
case for a rule that must survive repeated looks."""
import math

import numpy as np
import pytest

from wallperf.audit.sequential import (ALPHA, betting_fractions, confidence_interval, first_decisions, log_capitals,
                              side_of)

RUNS = 1000
# Three standard errors of a rate of ALPHA / 2 over RUNS audits: the Monte Carlo slack.
ONE_SIDED_LIMIT = ALPHA / 2 + 3 * math.sqrt(ALPHA / 2 * (1 - ALPHA / 2) / RUNS)


def simulate(runs, n, flip_rate, drop, seed):
    """(runs, n) paired outcomes with P(+1) - P(-1) = drop and P(+1) + P(-1) = flip_rate."""
    u = np.random.default_rng(seed).random((runs, n))
    up = (flip_rate + drop) / 2
    return np.where(u < up, 1.0, np.where(u < flip_rate, -1.0, 0.0))


def verdicts(values, limit, population=None):
    below, above = first_decisions(values, limit, population)
    n = values.shape[-1]
    return below <= np.minimum(above, n), above < np.minimum(below, n + 1), np.minimum(below, above)


@pytest.mark.parametrize("flip_rate", [0.05, 0.3])
def test_a_drop_at_the_limit_passes_or_fails_at_most_alpha_over_2_of_the_time(flip_rate):
    limit = 0.02
    passed, failed, _ = verdicts(simulate(RUNS, 2000, flip_rate, limit, seed=1), limit)
    assert passed.mean() <= ONE_SIDED_LIMIT
    assert failed.mean() <= ONE_SIDED_LIMIT


def test_naive_fixed_sample_ci_checked_at_every_look_breaks_its_error_rate():
    """The reason for a confidence sequence: a plain 95% normal CI, looked at after every
    question, passes a candidate at the limit far more often than 2.5%."""
    limit = 0.02
    d = simulate(RUNS, 2000, 0.05, limit, seed=2)
    t = np.arange(1, d.shape[1] + 1)
    mean = np.cumsum(d, axis=1) / t
    sd = np.sqrt(np.maximum(np.cumsum(d * d, axis=1) / t - mean ** 2, 1e-12))
    naive_pass = (mean + 1.96 * sd / np.sqrt(t) < limit)[:, 30:].any(axis=1)
    assert naive_pass.mean() > 3 * ONE_SIDED_LIMIT
    passed, _, _ = verdicts(d, limit)
    assert passed.mean() <= ONE_SIDED_LIMIT


def test_clear_cases_are_decided_with_few_questions():
    """fp8-like: 5% of answers flip, no true drop, limit 2 points; a damaged copy: 8 points lost."""
    passed, failed, stop = verdicts(simulate(RUNS, 2000, 0.05, 0.0, seed=3), 0.02)
    assert passed.mean() >= 0.9 and not failed.any()
    assert np.median(stop) < 1000
    passed, failed, stop = verdicts(simulate(RUNS, 2000, 0.3, 0.08, seed=4), 0.02)
    assert failed.mean() >= 0.95 and not passed.any()
    assert np.median(stop) < 800


def test_sampling_without_replacement_keeps_the_error_rate_and_uses_the_whole_pool():
    """Draws without replacement from one finite pool whose mean is exactly the limit."""
    rng = np.random.default_rng(5)
    pool = np.zeros(500)
    pool[:20], pool[20:30] = 1.0, -1.0  # mean 0.02, the limit
    runs = np.stack([rng.permutation(pool) for _ in range(RUNS)])
    passed, failed, _ = verdicts(runs, 0.02, population=pool.size)
    assert passed.mean() <= ONE_SIDED_LIMIT and failed.mean() <= ONE_SIDED_LIMIT
    lo, hi = confidence_interval(runs[0], population=pool.size)
    assert lo <= pool.mean() <= hi and hi - lo <= 2 / pool.size + 1e-6


def test_the_interval_covers_the_true_mean_at_a_fixed_time():
    rng = np.random.default_rng(6)
    covered = 0
    for run in range(200):
        d = simulate(1, 400, 0.1, 0.01, seed=100 + run)[0]
        lo, hi = confidence_interval(d)
        covered += lo <= 0.01 <= hi
    assert covered >= 0.95 * 200
    x = (rng.random(1000) < 0.6).astype(float)
    lo, hi = confidence_interval(x)
    assert lo < x.mean() < hi and lo > 0.5


def test_interval_and_side_agree():
    d = simulate(1, 800, 0.05, 0.0, seed=7)[0]
    lo, hi = confidence_interval(d)
    for limit in (hi - 1e-4, hi + 1e-4, lo - 1e-4, lo + 1e-4):
        side = side_of(d, limit)
        assert (side == "below") == (hi < limit)
        assert (side == "above") == (lo > limit)


def test_capitals_follow_their_definition():
    """The capital processes against a plain loop over the definition (module docstring)."""
    d = simulate(1, 60, 0.4, 0.1, seed=8)[0]
    population, m = 100, 0.05
    up, down = log_capitals(d, m, population)
    lam = betting_fractions(d)
    k_up = k_down = 1.0
    mean, sq = 0.0, 0.25
    for i, x in enumerate(d):
        variance = sq / (i + 1)
        expected_lam = min(math.sqrt(2 * math.log(2 / ALPHA) / (variance * 1000)), 0.375)
        assert lam[i] == pytest.approx(expected_lam)
        centre = (population * m - d[:i].sum()) / (population - i)
        k_up *= 1 + expected_lam * (x - centre)
        k_down *= 1 - expected_lam * (x - centre)
        assert up[i] == pytest.approx(math.log(k_up)) and down[i] == pytest.approx(math.log(k_down))
        mean = d[: i + 1].sum() / (i + 2)
        sq += (x - mean) ** 2


def test_values_outside_minus_one_to_one_are_refused():
    with pytest.raises(ValueError, match="in \\[-1, 1\\]"):
        confidence_interval([0.0, 2.0])
    with pytest.raises(ValueError, match="pool of 1"):
        side_of([0.0, 1.0], 0.1, population=1)


@pytest.mark.parametrize("ones,side", [(17, "above"), (-17, "below")])
def test_a_pool_drawn_to_the_end_is_decided_on_the_right_side(ones, side):
    """Once the values drawn pin the pool's mean far from the limit, only the gambler on
    that side wins (the values left could not bring the mean back)."""
    values = np.zeros(28)
    values[: abs(ones)] = np.sign(ones)
    assert side_of(values, 0.01 * np.sign(ones), population=28) == side
    lo, hi = confidence_interval(values, population=28)
    assert lo <= values.mean() <= hi and hi - lo < 0.1
