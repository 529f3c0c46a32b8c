"""The load of one fixed-concurrency point, sent by N client processes that each
prove they kept up.

Each worker process runs an asyncio loop of `users` closed-loop users (its
share of the point's concurrency): a user sends a request, streams it
(wallperf.driver.stream_client), and sends its next one the moment the answer
ends. A request goes to the replica with the fewest requests outstanding from
this worker (ties in turn); a replica that fails fails its requests, which are
counted as failed there and never sent elsewhere.

The workers agree on one start (a wall-clock instant the parent sends once
every worker is ready); from it each measures the warm-up and the steady-state
window on its own monotonic clock, and times its own requests, so TTFT and
TPOT need no clock shared between processes. The client's self-check, per
worker and merged:

- send lag: when a request was due (its user's previous answer ended) to when
  its bytes went out; a client that cannot keep up sends late;
- event-loop lag: how late a 10 ms timer of the loop fires;
- achieved concurrency: requests in flight (sent to answered, within the
  window) averaged over the window, against the target.

The rules' count: each worker keeps issuing past the window's end until the
requests it issued from the window's start on are a positive whole multiple of
the data set's size (so the point's total is one too), then lets every one of them
finish; the window's throughput is untouched by this tail, and its requests,
answered in full instead of cut, are among the point's issued samples. What is still open after `tail_limit_s` is
cut, and the point then falls short of its completed-query count.

Failures are kept, and so is a request cut after the tail's limit: it counts
toward the concurrency up to the window's end.

Where the workers run is a `Workers` pool: `LocalWorkers` (processes of this
machine) here, `wallperf.driver.ray_workers.RayWorkers` (actors on a Ray
cluster) beside it; both run the same `run_worker`; `wallperf.driver.workers_arg`
picks one from --client-workers.
"""
from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing
import random
import socket
import time
from dataclasses import asdict, dataclass, field

from wallperf.audit.endpoints import self_check
from wallperf.driver.concurrency_points import whole_passes
from wallperf.driver.salt import SaltPlan, salt_bits
from wallperf.driver.stream_client import Connection, Replica, Timing, completion_body, stream_completion
from wallperf.sut.backends.sse import RequestFailed

# How often the loop's own lag is sampled.
TICK_S = 0.01
# How long the parent waits for the workers to start and report ready.
READY_TIMEOUT_S = 60.0
# Lead time between the agreed start and the moment it is sent, so every worker has it in time.
START_LEAD_S = 0.2


@dataclass(frozen=True)
class Load:
    """What every worker sends: the prompts (token ids) and each one's output limits."""

    urls: tuple[str, ...]
    model: str
    prompts: tuple
    max_tokens: tuple[int, ...]
    min_tokens: tuple[int, ...]
    ignore_eos: bool = False
    timeout_s: float = 60.0
    headers: tuple = ()
    salt: SaltPlan | None = None
    seed: int = 0


@dataclass(frozen=True)
class WorkerSpec:
    worker: int
    users: int
    warmup_s: float
    window_s: float
    # Requests issued from the window's start on are rounded up to a multiple of this (the data set's size).
    issue_multiple: int = 1
    # Seconds past the window the rounded-up requests may take before what is still open is cut.
    tail_limit_s: float = 60.0
    # Seconds slept, blocking the loop, before each send: a slow client, for tests of the self-check.
    send_delay_s: float = 0.0


@dataclass
class WorkerResult:
    worker: int
    users: int
    # Every request: Timing's fields as a dict, times in seconds from the agreed start.
    requests: list = field(default_factory=list)
    loop_lag_s: list = field(default_factory=list)
    window: tuple = (0.0, 0.0)
    # Requests issued from the window's start on (a multiple of the spec's issue_multiple).
    issued: int = 0
    # The machine the worker ran on.
    host: str = ""


async def _worker_loop(load: Load, spec: WorkerSpec, t0: float) -> WorkerResult:
    """Run the users from monotonic time `t0` to the window's end; times relative to t0."""
    replicas = [Replica.parse(u) for u in load.urls]
    window = (t0 + spec.warmup_s, t0 + spec.warmup_s + spec.window_s)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **dict(load.headers)}
    # Finished requests as dicts of plain values: the collector stops tracking those, so its full passes
    # stay short however many requests a long window sends (400,000 Timing objects cost 70 ms a pass).
    done: list[dict] = []
    # Requests still streaming when the tail's limit was reached.
    cut: list[Timing] = []
    lags: list[float] = []
    turn = 0
    issued = 0

    def record(t: Timing) -> dict:
        return {"replica": t.replica, "url": replicas[t.replica].url, "worker": spec.worker,
                **{k: None if getattr(t, k) is None else getattr(t, k) - t0
                   for k in ("scheduled", "sent", "first", "last", "done")},
                "tokens": t.tokens, "tokens_in_window": t.tokens_in_window, "error": t.error, "counted": t.counted}

    def pick() -> int:
        nonlocal turn
        turn += 1
        order = [(turn + i) % len(replicas) for i in range(len(replicas))]
        return min(order, key=lambda i: replicas[i].outstanding)

    async def user(u: int) -> None:
        nonlocal issued
        rng = random.Random(hash((load.seed, spec.worker, u)))
        conns = {}
        due = t0
        while True:
            # No await between the check and the count: the users of this loop cannot both take the last one.
            now = time.monotonic()
            if now >= window[1] and whole_passes(issued, spec.issue_multiple):
                break
            counted = now >= window[0]
            issued += counted
            sample = rng.randrange(len(load.prompts))
            prompt = load.prompts[sample]
            if load.salt is not None:
                prompt = load.salt.salted(sample, prompt, salt_bits(rng))
            body = completion_body(load.model, list(prompt), load.max_tokens[sample], load.min_tokens[sample],
                                   load.ignore_eos)
            if spec.send_delay_s:
                time.sleep(spec.send_delay_s)
            r = pick()
            timing = Timing(r, due, counted=counted)
            replicas[r].outstanding += 1
            conn = conns.setdefault(r, Connection(replicas[r], load.timeout_s))
            try:
                await stream_completion(conn, body, headers, timing, window)
            except RequestFailed as e:
                timing.error = e.reason
            except asyncio.CancelledError:
                cut.append(timing)
                raise
            finally:
                replicas[r].outstanding -= 1
            due = timing.done
            done.append(record(timing))

    async def ticker() -> None:
        while True:
            expected = time.monotonic() + TICK_S
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            if window[0] <= now < window[1]:
                lags.append(now - expected)

    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    tasks = [asyncio.create_task(user(u)) for u in range(spec.users)]
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
    tick.cancel()
    # The users stop once the count is whole and their last answers are in; past the limit, what is open is cut.
    _, late = await asyncio.wait(tasks, timeout=max(0.0, window[1] + spec.tail_limit_s - time.monotonic()))
    for t in late:
        t.cancel()
    outcomes = await asyncio.gather(*tasks, tick, return_exceptions=True)
    crashed = [e for e in outcomes if isinstance(e, Exception)]
    if crashed:
        raise crashed[0]

    return WorkerResult(spec.worker, spec.users, done + [{**record(t), "cut_at_window_end": True} for t in cut],
                        lags, (spec.warmup_s, spec.warmup_s + spec.window_s), issued, socket.gethostname())


def run_worker(load: Load, spec: WorkerSpec, start_wall: float) -> WorkerResult:
    """One worker in this process, starting at wall-clock `start_wall` (time.time)."""
    # What exists now (the imports, the load) lives as long as the process: out of every later collection,
    # whose pauses would otherwise be paid by whichever sends fall in them.
    gc.collect()
    gc.freeze()
    t0 = time.monotonic() + (start_wall - time.time())
    return asyncio.run(_worker_loop(load, spec, t0))


def _worker_process(load: Load, spec: WorkerSpec, conn) -> None:
    conn.send("ready")
    start_wall = conn.recv()
    try:
        conn.send(("ok", asdict(run_worker(load, spec, start_wall))))
    except Exception as e:  # noqa: BLE001 - the parent must learn why, not wait
        conn.send(("error", f"{type(e).__name__}: {e}"))


def split_users(concurrency: int, workers: int) -> list[int]:
    """`concurrency` users over `workers` processes, as even as can be (no worker without a user)."""
    workers = min(workers, concurrency)
    return [concurrency // workers + (i < concurrency % workers) for i in range(workers)]


def worker_specs(concurrency: int, workers: int, warmup_s: float, window_s: float, issue_multiple: int = 1,
                 tail_limit_s: float | None = None, send_delay_s: float = 0.0, timeout_s: float = 60.0
                 ) -> list[WorkerSpec]:
    """The specs of one point's workers. The tail's limit defaults to room for the worker's
    whole pass: its users may each still have to send ceil(issue_multiple / users) requests
    one after another past the window, so that many rounds of a window and a request's
    timeout, and one more for what is open (a fixed window + timeout cut a concurrency-1
    point short of its pass on a server answering in ~2 s a request)."""
    def tail(users: int) -> float:
        if tail_limit_s is not None:
            return tail_limit_s
        return (window_s + timeout_s) * (1 + math.ceil(issue_multiple / users))
    return [WorkerSpec(i, users, warmup_s, window_s, issue_multiple, tail(users), send_delay_s)
            for i, users in enumerate(split_users(concurrency, workers))]


def results_timeout_s(specs: list[WorkerSpec], timeout_s: float) -> float:
    """How long after the agreed start a worker may take to report."""
    s = max(specs, key=lambda spec: spec.tail_limit_s)
    return START_LEAD_S + s.warmup_s + s.window_s + s.tail_limit_s + timeout_s + 30


class LocalWorkers:
    """Client processes on this machine, started afresh for each point."""

    kind = "local"

    def __init__(self, count: int):
        self.count = count

    def __enter__(self) -> "LocalWorkers":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def describe(self) -> dict:
        return {"kind": self.kind, "workers": self.count}

    def run(self, load: Load, specs: list[WorkerSpec]) -> list[WorkerResult]:
        ctx = multiprocessing.get_context("spawn")
        procs, pipes = [], []
        for spec in specs:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_process, args=(load, spec, child), name=f"wallperf-client-{spec.worker}",
                            daemon=True)
            p.start()
            procs.append(p)
            pipes.append(parent)
        try:
            for pipe in pipes:
                if not pipe.poll(READY_TIMEOUT_S):
                    raise RuntimeError(f"a client worker did not start within {READY_TIMEOUT_S:g} s")
                try:
                    pipe.recv()
                except EOFError:
                    raise RuntimeError("a client worker exited before it was ready; its error is printed "
                                       "above") from None
            start_wall = time.time() + START_LEAD_S
            for pipe in pipes:
                pipe.send(start_wall)
            results = []
            for pipe in pipes:
                if not pipe.poll(results_timeout_s(specs, load.timeout_s)):
                    raise RuntimeError("a client worker did not report its results")
                status, payload = pipe.recv()
                if status != "ok":
                    raise RuntimeError(f"a client worker failed: {payload}")
                results.append(WorkerResult(**payload))
            return results
        finally:
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.terminate()
                    p.join()


def run_point(load: Load, concurrency: int, workers: int, warmup_s: float, window_s: float,
              send_delay_s: float = 0.0, issue_multiple: int = 1, tail_limit_s: float | None = None
              ) -> list[WorkerResult]:
    """One point: `concurrency` users over `workers` local processes; each worker's result."""
    specs = worker_specs(concurrency, workers, warmup_s, window_s, issue_multiple, tail_limit_s, send_delay_s,
                         load.timeout_s)
    return LocalWorkers(workers).run(load, specs)


def worker_rows(results: list[WorkerResult], lag_limit_ms: float) -> list[dict]:
    """One row per worker of a point: where it ran, its share of the users, its counts,
    and its own self-check against its share (the merged record holds the total)."""
    rows = []
    for w in results:
        check = self_check(w.requests, w.window, w.users, w.loop_lag_s, lag_limit_ms)
        rows.append({"worker": w.worker, "host": w.host, "users": w.users, "requests": len(w.requests),
                     "issued": w.issued, "completed": sum(r.get("counted", False) and r.get("error") is None
                                                          and not r.get("cut_at_window_end") for r in w.requests),
                     "send_lag_ms_p99": (check["send_lag_ms"] or {}).get("p99"),
                     "loop_lag_ms_p99": (check["loop_lag_ms"] or {}).get("p99"),
                     "achieved_concurrency": check["achieved_concurrency"], "valid": check["valid"],
                     "reasons": check["reasons"]})
    return rows
