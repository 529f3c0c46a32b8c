"""Several OpenAI-compatible replicas of one system as one backend, as multi-node
MLPerf systems dispatch: each request goes to the replica with the fewest
requests outstanding (ties in turn), and stays there.

Each replica is an OpenAIBackend of its own over its one URL, so a request
that fails is retried (up to `retries`) on its own replica only, then counted
as failed there: a failing replica shows in its own counts and reasons, and
never hides behind the others. This holds under every LoadGen scenario,
since the backend offers the same engine interface (free_slots, add_request,
step, has_unfinished) the adapter drives.

Per replica: requests, completions, failures with their reasons, and the
time to the first token and to the last, as this backend's step() sees them
(a step waits a few milliseconds per idle replica: the times are as coarse).
"""
from __future__ import annotations

import time
from collections import Counter

import numpy as np

from wallperf.sut.backends.openai import OpenAIBackend
from wallperf.sut.engine.engine import SamplingParams, TokenEvent

# The openai config's `routing` that makes sut.backends.create build this backend.
REPLICAS = "replicas"


class ReplicaBackend:
    name = "openai"

    @classmethod
    def create(cls, loaded, *, max_batch: int, openai, **_):
        """Over the run's `openai:` section (harness.config.OpenAIConfig); `loaded` carries the tokenizer."""
        return cls(list(openai.endpoints), openai.model, max_concurrency=max_batch, timeout_s=openai.timeout_s,
                   retries=openai.retries, tokenizer=loaded.tokenizer, api_key_env=openai.api_key_env)

    def __init__(self, endpoints: list[str], model: str, max_concurrency: int, timeout_s: float = 60.0,
                 retries: int = 2, tokenizer=None, api_key_env: str = "OPENAI_API_KEY"):
        if len(endpoints) < 2:
            raise ValueError("replicas need two endpoint URLs or more")
        self.max_concurrency = max_concurrency
        # Each replica may hold every request: the router, not the replica, keeps the total.
        self._replicas = [OpenAIBackend([url], model, max_concurrency=max_concurrency, timeout_s=timeout_s,
                                        retries=retries, tokenizer=tokenizer, api_key_env=api_key_env)
                          for url in endpoints]
        self._outstanding = [0] * len(endpoints)
        self._turn = 0
        # request id -> (replica, when added, when its first token was seen)
        self._live: dict[int, list] = {}
        self._ttft_s = [[] for _ in endpoints]
        self._latency_s = [[] for _ in endpoints]

    def __repr__(self) -> str:
        return f"ReplicaBackend({self._replicas})"

    @property
    def free_slots(self) -> int:
        return self.max_concurrency - sum(self._outstanding)

    def has_unfinished(self) -> bool:
        return any(self._outstanding)

    def add_request(self, request_id: int, prompt_ids, params: SamplingParams) -> None:
        n = len(self._replicas)
        self._turn = (self._turn + 1) % n
        order = [(self._turn + i) % n for i in range(n)]
        r = min(order, key=lambda i: self._outstanding[i])
        self._outstanding[r] += 1
        self._live[request_id] = [r, time.monotonic(), None]
        self._replicas[r].add_request(request_id, prompt_ids, params)

    def step(self) -> list[TokenEvent]:
        events = []
        for r, replica in enumerate(self._replicas):
            if self._outstanding[r]:
                events.extend(replica.step())
        now = time.monotonic()
        for ev in events:
            live = self._live[ev.request_id]
            r, added, first = live
            if first is None:
                live[2] = now
                self._ttft_s[r].append(now - added)
            if ev.finished:
                self._outstanding[r] -= 1
                self._latency_s[r].append(now - added)
                del self._live[ev.request_id]
        return events

    def stats(self) -> dict:
        """The openai backend's counters summed over the replicas (failures > 0 makes the run
        INVALID), and under `replicas` each replica's own."""
        each = [r.stats() for r in self._replicas]
        total = Counter()
        for key in ("requests", "completed", "failures", "retries", "text_prompt_fallbacks", "usage_missing",
                    "token_count_mismatches"):
            total[key] = sum(s[key] for s in each)
        reasons = Counter()
        for s in each:
            reasons.update({f"{s['endpoints'][0]}: {k}": v for k, v in s["failure_reasons"].items()})
        return {
            **total,
            "endpoints": [s["endpoints"][0] for s in each],
            "routing": "least_outstanding (replicas: no request leaves its replica)",
            "failure_reasons": dict(reasons),
            "failure_examples": [e for s in each for e in s["failure_examples"]],
            "token_ids_from": {k: sum(s["token_ids_from"][k] for s in each) for k in ("server", "retokenized")},
            "mismatch_examples": [e for s in each for e in s["mismatch_examples"]],
            "attempts_per_endpoint": {k: v for s in each for k, v in s["attempts_per_endpoint"].items()},
            "replicas": {s["endpoints"][0]: {"requests": s["requests"], "completed": s["completed"],
                                             "failures": s["failures"], "failure_reasons": s["failure_reasons"],
                                             "ttft_ms": _ms(self._ttft_s[i]), "latency_ms": _ms(self._latency_s[i])}
                         for i, s in enumerate(each)},
        }

    def close(self) -> None:
        for r in self._replicas:
            r.close()

    def __enter__(self) -> "ReplicaBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ms(seconds: list) -> dict | None:
    if not seconds:
        return None
    ms = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}
