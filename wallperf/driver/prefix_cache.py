"""A server's prefix-cache hit rate over one point, where the server exposes one.

OpenAI-compatible servers publish their counters in the Prometheus text format
at /metrics. vLLM counts the prompt tokens looked up in its prefix cache and
the ones found (`vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`,
labelled per engine and model); the rate over a point is the difference of the
sums after and before it. A server without such counters (`wallperf serve`,
llama.cpp) gives None, and the sweep says the rate was not exposed.
"""
from __future__ import annotations

import http.client
import re
from urllib.parse import urlsplit

# (hits, queries) counter names, as servers name them.
COUNTERS = (("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
            ("vllm:gpu_prefix_cache_hits_total", "vllm:gpu_prefix_cache_queries_total"))
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfINFaN]+)")
TIMEOUT_S = 5.0
MAX_BYTES = 4 << 20


def parse_counters(text: str) -> dict[str, float]:
    """Each metric's samples summed over their labels (comments and malformed lines skipped)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m:
            try:
                sums[m.group(1)] = sums.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                continue
    return sums


def scrape(url: str) -> dict[str, float] | None:
    """The counters of a server's /metrics, or None where it has none (or cannot be read)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=TIMEOUT_S)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        if resp.status != 200:
            return None
        return parse_counters(resp.read(MAX_BYTES).decode("utf-8", errors="replace"))
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def hit_rate(before: list, after: list) -> dict:
    """The hit rate over a point from each replica's counters before and after it."""
    hits = queries = 0.0
    found = False
    for b, a in zip(before, after):
        if b is None or a is None:
            continue
        for hit_name, query_name in COUNTERS:
            if hit_name in a and query_name in a:
                hits += a[hit_name] - b.get(hit_name, 0.0)
                queries += a[query_name] - b.get(query_name, 0.0)
                found = True
                break
    if not found:
        return {"exposed": False, "hit_rate": None}
    return {"exposed": True, "hit_rate": hits / queries if queries > 0 else None,
            "hit_tokens": hits, "queried_tokens": queries}
