"""Statistics for accuracy audits: pure functions over counts and score arrays.

Everything here is exact or resampled with a fixed seed, so an audit gives the
same numbers on every run and machine. No scipy: the few formulas needed are
short, and writing them out keeps the audit's arithmetic readable.
"""
from __future__ import annotations

import math

import numpy as np

# The two-sided 95% normal quantile, Phi^-1(0.975).
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    Chosen over the normal (Wald) interval because MMLU subsets are small and
    accuracies sit near chance or near 0/1 per subject, where Wald's interval
    is too narrow and can leave [0, 1].
    """
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_sf(successes: int, n: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(n, p): the one-sided exact test's p-value.

    Summed in log space, so n in the tens of thousands neither overflows nor
    loses the tail.
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if successes <= 0:
        return 1.0
    if successes > n:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n_fact = math.lgamma(n + 1)
    terms = [log_n_fact - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
             for k in range(successes, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def paired_bootstrap_ci(reference_correct, candidate_correct, n_resamples: int = 10_000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of mean(reference_correct - candidate_correct) under a paired
    bootstrap over questions.

    Resampling questions with replacement only changes how many of the n draws
    are questions the reference alone got right (+1), the candidate alone got
    right (-1), or both/neither (0). Those counts are multinomial with the
    observed shares, so drawing them directly is the same bootstrap, exactly in
    distribution, at a cost independent of n (14,042 questions x 10,000
    resamples would otherwise be 140 M index draws).
    """
    a = np.asarray(reference_correct, dtype=bool)
    b = np.asarray(candidate_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal, non-empty 1-D arrays, got shapes {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = a.size
    only_ref = int(np.sum(a & ~b))
    only_cand = int(np.sum(~a & b))
    shares = np.array([only_ref, only_cand, n - only_ref - only_cand], dtype=np.float64) / n
    counts = np.random.default_rng(seed).multinomial(n, shares, size=n_resamples)  # (R, 3)
    diffs = (counts[:, 0] - counts[:, 1]) / n
    tail = (1 - level) / 2
    lo, hi = np.quantile(diffs, [tail, 1 - tail])
    return float(lo), float(hi)


def log_softmax(scores) -> np.ndarray:
    """Row-wise log-softmax of (N, K) scores, in float64."""
    s = np.asarray(scores, dtype=np.float64)
    shifted = s - s.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(p_scores, q_scores) -> np.ndarray:
    """KL(P || Q) per row, in nats, of the softmax distributions of two (N, K) score arrays."""
    log_p, log_q = log_softmax(p_scores), log_softmax(q_scores)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
