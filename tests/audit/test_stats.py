"""wallperf.audit.stats: the paired bootstrap against a naive resampling and McNemar's normal interval."""
import math

import numpy as np
import pytest

from wallperf.audit.stats import Z95, kl_divergence, paired_bootstrap_ci


def _paired_sample(rng, n, p_ref_only, p_cand_only, p_both):
    u = rng.random(n)
    ref = (u < p_ref_only) | ((u >= p_ref_only + p_cand_only) & (u < p_ref_only + p_cand_only + p_both))
    cand = ((u >= p_ref_only) & (u < p_ref_only + p_cand_only + p_both))
    return ref, cand


def test_bootstrap_ci_agrees_with_naive_resampling_and_mcnemar():
    rng = np.random.default_rng(1)
    ref, cand = _paired_sample(rng, 1500, 0.08, 0.03, 0.3)
    lo, hi = paired_bootstrap_ci(ref, cand)
    # Naive bootstrap: resample question indices.
    idx = rng.integers(0, ref.size, size=(4000, ref.size))
    naive = np.quantile((ref[idx].astype(int) - cand[idx].astype(int)).mean(axis=1), [0.025, 0.975])
    assert (lo, hi) == pytest.approx(tuple(naive), abs=0.003)
    # McNemar's normal interval for a paired difference of proportions.
    n, b, c = ref.size, np.sum(ref & ~cand), np.sum(~ref & cand)
    d = (b - c) / n
    half = Z95 * math.sqrt((b + c) / n - d * d) / math.sqrt(n)
    assert (lo, hi) == pytest.approx((d - half, d + half), abs=0.003)


def test_bootstrap_ci_covers_the_true_drop():
    rng = np.random.default_rng(2)
    true_drop = 0.05 - 0.02
    covered = 0
    for trial in range(200):
        ref, cand = _paired_sample(rng, 800, 0.05, 0.02, 0.3)
        lo, hi = paired_bootstrap_ci(ref, cand, n_resamples=2000, seed=trial)
        covered += lo <= true_drop <= hi
    assert 0.90 <= covered / 200 <= 0.99


def test_kl_of_equal_distributions_is_zero():
    assert kl_divergence([[0.0, 0.0]], [[0.0, 0.0]]) == pytest.approx([0.0])
