"""Figures over single queries, from the SUT's own timing of each one
(sut.adapter.QueryTiming): the lengths LoadGen actually issued, and goodput.

Goodput is the share of queries that met the scenario's TTFT and TPOT limits,
and the tokens/s those queries alone delivered: LoadGen's tokens/s times their
share of the tokens. LoadGen logs only percentiles, so each query's TTFT and
TPOT come from the SUT's clock: from issue_query (slightly after LoadGen's
scheduled time, so TTFT here is at most LoadGen's issue delay short of
LoadGen's) to the first token and the last.
"""
from __future__ import annotations

import numpy as np

from wallperf.harness.loadgen.workload import length_distribution

OVER_LIMITS_LISTED = 32


def issued_lengths(queries, prompts, output_lengths=None) -> dict:
    """Input and output token counts of the queries issued: `input` per issued
    sample, `output` per completed answer, and `output_target` the data set's own
    length for each issued sample where it has them."""
    issued = list(queries)
    out = {"input": length_distribution(len(prompts[q.sample_index]) for q in issued),
           "output": length_distribution(q.n_tokens for q in issued if q.done is not None)}
    if output_lengths is not None:
        out["output_target"] = length_distribution(output_lengths[q.sample_index] for q in issued)
    return out


def goodput(queries, ttft_limit_ms: float | None, tpot_limit_ms: float | None,
            tokens_per_second: float | None) -> dict | None:
    """Queries within both limits (a limit of None always holds), over the completed ones."""
    done = [q for q in queries if q.done is not None]
    if not done:
        return None
    ttft_ms = np.array([np.nan if q.ttft_s is None else q.ttft_s * 1e3 for q in done])
    tpot_ms = np.array([np.nan if q.tpot_s is None else q.tpot_s * 1e3 for q in done])
    tokens = np.array([q.n_tokens for q in done], dtype=np.float64)
    # A query without a first token (Offline) or a single token has no TTFT/TPOT: no limit can fail it.
    ok = np.ones(len(done), dtype=bool)
    if ttft_limit_ms is not None:
        ok &= ~(ttft_ms > ttft_limit_ms)
    if tpot_limit_ms is not None:
        ok &= ~(tpot_ms > tpot_limit_ms)
    token_share = tokens[ok].sum() / tokens.sum() if tokens.sum() else 0.0
    start = min(q.issued for q in done)
    over = [{"issued_s": round(q.issued - start, 3), "sample_index": q.sample_index,
             "ttft_ms": None if np.isnan(t) else round(float(t), 1), "tpot_ms": None if np.isnan(p) else round(float(p), 2)}
            for q, t, p, good in zip(done, ttft_ms, tpot_ms, ok) if not good]
    over.sort(key=lambda o: o["issued_s"])
    return {
        "source": "SUT timing per query (from issue_query)",
        "ttft_limit_ms": ttft_limit_ms,
        "tpot_limit_ms": tpot_limit_ms,
        "queries": len(done),
        "within_limits": int(ok.sum()),
        "share": float(ok.mean()),
        "tokens_per_second": None if tokens_per_second is None else tokens_per_second * float(token_share),
        "ttft_ms": _percentiles(ttft_ms),
        "tpot_ms": _percentiles(tpot_ms),
        # Which queries broke a limit, and when in the test (seconds from its first issue): a burst
        # of arrivals, or a stall of the machine, shows as several close together.
        "over_limits": over[:OVER_LIMITS_LISTED],
        "over_limits_left_out": max(len(over) - OVER_LIMITS_LISTED, 0),
    }


def _percentiles(values: np.ndarray) -> dict | None:
    values = values[~np.isnan(values)]
    if not values.size:
        return None
    return {f"p{p}": float(np.percentile(values, p)) for p in (50, 90, 99)}
