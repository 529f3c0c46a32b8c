"""The audit's stopping rule: a confidence sequence for a mean, valid at every look.

An audit scores questions in batches and looks at the drop after each one,
stopping as soon as the verdict is decided. A fixed-sample 95% CI checked
after every batch would be wrong far more often than 5% (each look is another
chance to cross the limit by luck). A *confidence sequence* is an interval
that covers the true mean at all times at once with probability >= 95%, so
the audit may look as often as it likes and stop whenever it likes.

The rule: the betting confidence sequence of Waudby-Smith & Ramdas,
"Estimating means of bounded random variables by betting" (JRSS-B 2023). For a
candidate mean m, a gambler bets a fraction lambda_i of his capital on each new
value x_i being above m (K+) or below it (K-):

    K+_t(m) = prod_i (1 + lambda_i (x_i - m_i)),   K-_t(m) = prod_i (1 - lambda_i (x_i - m_i))

If m is the true mean these are nonnegative martingales, so by Ville's
inequality either reaches 2/alpha with probability at most alpha/2, ever. The
sequence at time t is every m neither gambler has disproved. Why this rule:

- It is exact for bounded values (a paired drop is -1, 0 or +1 per question,
  an accuracy 0 or 1) at every sample size, with no normal approximation; an
  audit's first looks have only a handful of discordant questions.
- It adapts to the variance: lambda_i comes from the variance seen so far
  (predictable plug-in), and two versions of one model agree on most
  questions, so the paired drop's variance is the small rate of flipped
  answers. A Hoeffding-style sequence would need ~20x the questions.
- Group-sequential alpha spending (O'Brien-Fleming over planned looks) is a
  fine alternative but fixes the looks in advance; batches here vary in size.

Questions are drawn without replacement from a finite pool (MMLU's 14,042 by
default). m_i is then the mean of the values not yet drawn if the pool's mean
were m: m_i = (N m - sum_{j<i} x_j) / (N - i + 1), which keeps K a martingale
in that design and lets the sequence shrink to a point once the pool is used
up. The betting fraction is tuned for ~HORIZON values (where the sequence is
narrowest); it stays valid at every t.

The price of looking at will: at 1000 questions the sequence is about 1.4x as
wide as a fixed-sample 95% CI. Each one-sided error (declaring the mean below
a limit it is above, or above a limit it is below) is at most alpha/2 = 2.5%.
"""
from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05
HORIZON = 1000
# Values lie in [-1, 1] and means in [-1, 1], so |x - m| <= 2: a bet below 1/2
# keeps every capital positive. 3/4 of it, as the paper caps its bets.
BET_CAP = 0.375
_PRIOR_VARIANCE = 0.25
_TOLERANCE = 1e-7


def _checked(values, population):
    x = np.asarray(values, dtype=np.float64)
    if x.shape[-1] == 0 or np.any(np.abs(x) > 1):
        raise ValueError("need at least one value, each in [-1, 1]")
    if population is not None and population < x.shape[-1]:
        raise ValueError(f"a pool of {population} cannot have given {x.shape[-1]} values")
    return x


def betting_fractions(values, alpha: float = ALPHA, horizon: int = HORIZON) -> np.ndarray:
    """lambda_i from the values before i (predictable): sqrt(2 log(2/alpha) / (var_{i-1} horizon)),
    capped at BET_CAP. The variance estimate starts from a prior of 1/4 with the weight of one value."""
    x = _checked(values, None)
    t = np.arange(1, x.shape[-1] + 1)
    mean = np.cumsum(x, axis=-1) / (t + 1)
    variance = (_PRIOR_VARIANCE + np.cumsum((x - mean) ** 2, axis=-1)) / (t + 1)
    before = np.concatenate([np.full(x.shape[:-1] + (1,), _PRIOR_VARIANCE), variance[..., :-1]], axis=-1)
    return np.minimum(np.sqrt(2 * math.log(2 / alpha) / (before * horizon)), BET_CAP)


def _centres(x: np.ndarray, m, population) -> np.ndarray:
    """m_i: the mean of the undrawn values if the mean of all were m (m itself with replacement)."""
    m = np.asarray(m, dtype=np.float64)[..., None]
    if population is None:
        return m
    t = np.arange(1, x.shape[-1] + 1)
    drawn = np.concatenate([np.zeros(x.shape[:-1] + (1,)), np.cumsum(x, axis=-1)[..., :-1]], axis=-1)
    return (population * m - drawn) / (population - t + 1)


def log_capitals(values, m, population: int | None = None, alpha: float = ALPHA,
                 horizon: int = HORIZON) -> tuple[np.ndarray, np.ndarray]:
    """log K+_t(m) and log K-_t(m) for t = 1..n, over the last axis (leading axes: independent runs).
    K+ grows when the values sit above m, K- when below."""
    x = _checked(values, population)
    centres = _centres(x, m, population)
    # A centre below -1 means the values drawn already put the pool's mean above m (K+ disproves m
    # outright, K- stops betting); above 1, below m.
    low, high = centres < -1, centres > 1
    step = np.where(low | high, 0.0, betting_fractions(x, alpha, horizon) * (x - centres))
    up = np.where(low, np.inf, np.log1p(step))
    down = np.where(high, np.inf, np.log1p(-step))
    return np.cumsum(up, axis=-1), np.cumsum(down, axis=-1)


def threshold(alpha: float = ALPHA) -> float:
    """log(2/alpha): a capital this large disproves m on its side at level alpha/2."""
    return math.log(2 / alpha)


def confidence_interval(values, population: int | None = None, alpha: float = ALPHA,
                        horizon: int = HORIZON) -> tuple[float, float]:
    """The confidence sequence at the last value: every mean neither gambler disproved.

    K- grows with m and K+ shrinks with it (each factor is monotone in m), so
    each bound is one bisection."""
    x = _checked(values, population)
    if x.ndim != 1:
        raise ValueError("confidence_interval takes one run of values")
    limit = threshold(alpha)

    def final(m):
        up, down = log_capitals(x, m, population, alpha, horizon)
        return up[-1], down[-1]

    def bisect(inside: float, outside: float, rejects) -> float:
        while abs(outside - inside) > _TOLERANCE:
            mid = (inside + outside) / 2
            inside, outside = (inside, mid) if rejects(mid) else (mid, outside)
        return inside

    def down_rejects(m):
        return final(m)[1] >= limit

    def up_rejects(m):
        return final(m)[0] >= limit

    centre = float(x.mean())  # a mean the pool can still have
    upper = 1.0 if not down_rejects(1.0) else (
        bisect(centre, 1.0, down_rejects) if not down_rejects(centre) else centre)
    lower = -1.0 if not up_rejects(-1.0) else (
        bisect(centre, -1.0, up_rejects) if not up_rejects(centre) else centre)
    return lower, upper


def side_of(values, limit: float, population: int | None = None, alpha: float = ALPHA,
            horizon: int = HORIZON) -> str | None:
    """'below' when the sequence lies wholly below `limit` now, 'above' when wholly
    above, None when it still holds it. A test at `limit` itself, so the verdict
    never hangs on a bisection's last digit."""
    up, down = log_capitals(values, limit, population, alpha, horizon)
    if down[..., -1] >= threshold(alpha):
        return "below"
    if up[..., -1] >= threshold(alpha):
        return "above"
    return None


def first_decisions(values, limit: float, population: int | None = None, alpha: float = ALPHA,
                    horizon: int = HORIZON) -> tuple[np.ndarray, np.ndarray]:
    """For runs of values (R, n) looked at after every value: the first t (1-based) at
    which each run is decided below / above `limit`, n + 1 where never. For simulating
    the rule's error rates and costs without scoring a model."""
    up, down = log_capitals(values, limit, population, alpha, horizon)
    n = up.shape[-1]

    def first(hit):
        return np.where(hit.any(axis=-1), hit.argmax(axis=-1) + 1, n + 1)

    return first(down >= threshold(alpha)), first(up >= threshold(alpha))
