"""The figures of one fixed-concurrency point, as MLPerf Endpoints defines them
(endpoints_rules.md 4.1), and the client's proof that it kept up.

Input: every request of the point, each a dict of times in seconds from the
point's start (`scheduled`: when it was due, `sent`, `first`: the first
non-empty fragment, `last`, `done`), `tokens`, `tokens_in_window`, `error`,
the replica's `url`, and `cut_at_window_end` for one still streaming when the
window closed. Pure functions: the sweep and its tests share them.

- system tokens/s: tokens that arrived inside the window, over its length;
- tokens/s per user: 1000 / TPOT p90, TPOT per request (last - first) / (tokens - 1);
- TTFT from the request's send to its first non-empty fragment;
- latencies over the point's issued samples answered in full: the requests the
  client counted (`counted`: sent from the window's start on, the tail that
  completes the rules' whole passes included, as the rules count every sample
  issued after the warm-up), or, in records without that mark, those sent
  inside the window;
- goodput: the share of those within the scenario's TTFT and TPOT limits,
  and the system tokens/s times the share of tokens they carried.

The self-check: the p99 send lag and event-loop lag against `lag_limit_ms`,
and the achieved mean concurrency at least CONCURRENCY_FLOOR of the target.
A point that fails either, or where any request failed, is invalid, with
the reasons.
"""
from __future__ import annotations

import numpy as np

CONCURRENCY_FLOOR = 0.98
# The p99 send lag and event-loop lag a client may show and still have kept up.
LAG_LIMIT_MS = 5.0
PERCENTILES = (50, 90, 99)


def percentiles(values) -> dict | None:
    """p50, p90, p99 (numpy's linear) and the mean, or None for no values."""
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if values.size == 0:
        return None
    return {**{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}, "mean": float(values.mean())}


def achieved_concurrency(requests: list[dict], window: tuple[float, float]) -> float:
    """Requests in flight (sent to answered, or to the window's end) averaged over the window."""
    w0, w1 = window
    busy = 0.0
    for r in requests:
        if r.get("sent") is None:
            continue
        end = w1 if r.get("done") is None or r.get("cut_at_window_end") else r["done"]
        busy += max(0.0, min(end, w1) - max(r["sent"], w0))
    return busy / (w1 - w0)


def _issued(r: dict, window: tuple[float, float]) -> bool:
    if "counted" in r:
        return bool(r["counted"])
    return r.get("sent") is not None and window[0] <= r["sent"] < window[1]


def _latencies(requests: list[dict], window: tuple[float, float]):
    measured = [r for r in requests if r.get("error") is None and not r.get("cut_at_window_end")
                and r.get("sent") is not None and _issued(r, window) and r.get("first") is not None]
    ttft = [(r["first"] - r["sent"]) * 1e3 for r in measured]
    tpot = [(r["last"] - r["first"]) * 1e3 / (r["tokens"] - 1) if r["tokens"] > 1 else None for r in measured]
    return measured, ttft, tpot


def self_check(requests: list[dict], window: tuple[float, float], target: int, loop_lags_s: list | None,
               lag_limit_ms: float = LAG_LIMIT_MS) -> dict:
    """The client's proof that it kept up, with `valid` and the reasons when it did not."""
    lags = [(r["sent"] - r["scheduled"]) * 1e3 for r in requests
            if r.get("sent") is not None and window[0] <= r["scheduled"] < window[1]]
    send = percentiles(lags)
    loop = percentiles([x * 1e3 for x in loop_lags_s]) if loop_lags_s is not None else None
    achieved = achieved_concurrency(requests, window)
    reasons = []
    if send is not None and send["p99"] > lag_limit_ms:
        reasons.append(f"the client sent late: send lag p99 {send['p99']:.2f} ms > {lag_limit_ms:g} ms")
    if loop is not None and loop["p99"] > lag_limit_ms:
        reasons.append(f"the client's event loop lagged: p99 {loop['p99']:.2f} ms > {lag_limit_ms:g} ms")
    if achieved < CONCURRENCY_FLOOR * target:
        reasons.append(f"concurrency {achieved:.2f} held against the target {target}: short by "
                       f"{1 - achieved / target:.1%} (more than {1 - CONCURRENCY_FLOOR:.0%})")
    return {"send_lag_ms": send, "loop_lag_ms": loop, "target_concurrency": target,
            "achieved_concurrency": achieved, "lag_limit_ms": lag_limit_ms,
            "concurrency_floor": CONCURRENCY_FLOOR, "valid": not reasons, "reasons": reasons}


def point_figures(requests: list[dict], window: tuple[float, float], target: int,
                  limits_ms: tuple[float | None, float | None] = (None, None), loop_lags_s: list | None = None,
                  lag_limit_ms: float = LAG_LIMIT_MS) -> dict:
    """The point's row: throughput, latencies, goodput, failures, per replica, the self-check."""
    span = window[1] - window[0]
    measured, ttft, tpot = _latencies(requests, window)
    tpot_p = percentiles(tpot)
    system_tps = sum(r.get("tokens_in_window") or 0 for r in requests) / span
    ttft_limit, tpot_limit = limits_ms
    within = [(ttft_limit is None or a <= ttft_limit) and (tpot_limit is None or b is None or b <= tpot_limit)
              for a, b in zip(ttft, tpot)]
    tokens = [r["tokens"] for r in measured]
    good_tokens = sum(t for t, ok in zip(tokens, within) if ok)
    failed = [r for r in requests if r.get("error") is not None]
    check = self_check(requests, window, target, loop_lags_s, lag_limit_ms)
    reasons = list(check["reasons"])
    if failed:
        reasons.insert(0, f"{len(failed)} requests failed: " + "; ".join(
            sorted({f"{r.get('url', '?')}: {r['error']}" for r in failed})[:5]))
    if not measured:
        reasons.append("no issued sample was answered in full")
    return {
        "concurrency": target,
        "window_s": span,
        "requests": len(requests),
        "measured": len(measured),
        "failures": len(failed),
        "system_tokens_per_second": system_tps,
        "tokens_per_second_per_user": 1e3 / tpot_p["p90"] if tpot_p and tpot_p["p90"] else None,
        "ttft_ms": percentiles(ttft),
        "tpot_ms": tpot_p,
        "goodput": {"ttft_limit_ms": ttft_limit, "tpot_limit_ms": tpot_limit,
                    "share": sum(within) / len(within) if within else None,
                    "tokens_per_second": system_tps * good_tokens / sum(tokens) if tokens and sum(tokens) else None},
        "replicas": per_replica(requests, window),
        "client": check,
        "valid": not reasons,
        "invalid_reasons": reasons,
    }


def per_replica(requests: list[dict], window: tuple[float, float]) -> dict:
    """Per replica URL: requests sent, answered, failed (with the reasons), TTFT and TPOT."""
    out = {}
    for url in sorted({r.get("url", "?") for r in requests}):
        mine = [r for r in requests if r.get("url", "?") == url]
        _, ttft, tpot = _latencies(mine, window)
        failed = [r["error"] for r in mine if r.get("error") is not None]
        out[url] = {"requests": len(mine), "completed": sum(r.get("error") is None and not r.get("cut_at_window_end")
                                                            for r in mine),
                    "cut_at_window_end": sum(bool(r.get("cut_at_window_end")) for r in mine),
                    "failures": len(failed), "failure_reasons": sorted(set(failed))[:5],
                    "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot)}
    return out
