"""Fixed concurrency against a backend in this process (the native engine, a
peer engine, or the openai backend over replicas for accuracy passes), driven
through the engine interface the LoadGen adapter uses: admit, step, repeat.

The closed loop keeps `concurrency` requests in the backend: a finished one is
replaced at once by a request for a sample drawn with replacement. Each
request's times are taken where this loop sees them (the step that returned
its events), on time.monotonic; `scheduled` is when its slot came free, so the
send lag is what this loop added. Here the engine's step is the client's loop:
there is no event loop of its own to report.

The records have the shape audit.endpoints reads (the stream client's
Timing), so one set of figures serves both.
"""
from __future__ import annotations

import random
import time

from wallperf.driver.concurrency_points import whole_passes
from wallperf.driver.salt import SaltPlan, salt_bits
from wallperf.sut.engine.engine import SamplingParams

IN_PROCESS = "in process"


def _params_of(params, sample: int) -> SamplingParams:
    return params[sample] if isinstance(params, list) else params


def closed_loop(backend, prompts: list, params, concurrency: int, warmup_s: float, window_s: float,
                seed: int = 0, salt: SaltPlan | None = None, issue_multiple: int = 1
                ) -> tuple[list[dict], tuple[float, float]]:
    """Every request of a point held at `concurrency` from now to the window's end, and
    on until the requests issued from the window's start are a positive multiple of
    `issue_multiple` (the rules' whole passes) and answered: (records with times from the start, the window)."""
    rng = random.Random(seed)
    t0 = time.monotonic()
    window = (t0 + warmup_s, t0 + warmup_s + window_s)
    live: dict[int, dict] = {}
    done: list[dict] = []
    free_since = [t0] * concurrency
    next_id = issued = 0
    while True:
        now = time.monotonic()
        tail = now >= window[1] and whole_passes(issued, issue_multiple)
        if tail and not live:
            break
        while not tail and free_since and backend.free_slots > 0:
            counted = now >= window[0]
            issued += counted
            tail = now >= window[1] and whole_passes(issued, issue_multiple)
            sample = rng.randrange(len(prompts))
            prompt = list(prompts[sample])
            if salt is not None:
                prompt = salt.salted(sample, prompt, salt_bits(rng))
            scheduled = free_since.pop()
            backend.add_request(next_id, prompt, _params_of(params, sample))
            live[next_id] = {"scheduled": scheduled, "sent": time.monotonic(), "first": None, "last": None,
                             "done": None, "tokens": 0, "tokens_in_window": 0, "error": None, "url": IN_PROCESS,
                             "counted": counted}
            next_id += 1
        events = backend.step()
        now = time.monotonic()
        for ev in events:
            r = live[ev.request_id]
            r["first"] = r["first"] or now
            r["last"] = now
            r["tokens"] += 1
            r["tokens_in_window"] += window[0] <= now < window[1]
            if ev.finished:
                r["done"] = now
                done.append(live.pop(ev.request_id))
                free_since.append(now)
    records = done
    for r in records:
        for k in ("scheduled", "sent", "first", "last", "done"):
            r[k] = None if r[k] is None else r[k] - t0
    return records, (warmup_s, warmup_s + window_s)


def answer_all(backend, prompts: list, params, concurrency: int) -> list[list[int]]:
    """Every prompt once (unsalted, as accuracy runs are), `concurrency` at a time: the tokens of each."""
    tokens: dict[int, list[int]] = {}
    pending = list(range(len(prompts)))
    in_flight = 0
    while pending or in_flight:
        while pending and in_flight < concurrency and backend.free_slots > 0:
            i = pending.pop(0)
            backend.add_request(i, list(prompts[i]), _params_of(params, i))
            tokens[i] = []
            in_flight += 1
        for ev in backend.step():
            tokens[ev.request_id].append(ev.token_id)
            in_flight -= ev.finished
    return [tokens[i] for i in range(len(prompts))]

