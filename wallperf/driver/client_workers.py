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

Failures and partial requests are kept: a request still streaming when the
window closes counts toward the concurrency up to the window's end.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from dataclasses import asdict, dataclass, field

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


async def _worker_loop(load: Load, spec: WorkerSpec, t0: float) -> WorkerResult:
    """Run the users from monotonic time `t0` to the window's end; times relative to t0."""
    replicas = [Replica.parse(u) for u in load.urls]
    window = (t0 + spec.warmup_s, t0 + spec.warmup_s + spec.window_s)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **dict(load.headers)}
    done: list[Timing] = []
    # Requests still streaming when the window closed.
    cut: list[Timing] = []
    lags: list[float] = []
    turn = 0

    def pick() -> int:
        nonlocal turn
        turn += 1
        order = [(turn + i) % len(replicas) for i in range(len(replicas))]
        return min(order, key=lambda i: replicas[i].outstanding)

    async def user(u: int) -> None:
        rng = random.Random(hash((load.seed, spec.worker, u)))
        conns = {}
        due = t0
        while time.monotonic() < window[1]:
            sample = rng.randrange(len(load.prompts))
            prompt = load.prompts[sample]
            if load.salt is not None:
                prompt = load.salt.salted(sample, prompt, salt_bits(rng))
            body = completion_body(load.model, list(prompt), load.max_tokens[sample], load.min_tokens[sample],
                                   load.ignore_eos)
            if spec.send_delay_s:
                time.sleep(spec.send_delay_s)
            r = pick()
            timing = Timing(r, due)
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
            done.append(timing)
            due = timing.done

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
    # Every user is mid-request (closed loop): what is still streaming ends with the window.
    for t in tasks:
        t.cancel()
    outcomes = await asyncio.gather(*tasks, tick, return_exceptions=True)
    crashed = [e for e in outcomes if isinstance(e, Exception)]
    if crashed:
        raise crashed[0]

    def rel(t: Timing) -> dict:
        d = asdict(t)
        for k in ("scheduled", "sent", "first", "last", "done"):
            d[k] = None if d[k] is None else d[k] - t0
        d["worker"] = spec.worker
        d["url"] = replicas[t.replica].url
        return d

    return WorkerResult(spec.worker, spec.users,
                        [rel(t) for t in done] + [{**rel(t), "cut_at_window_end": True} for t in cut],
                        lags, (spec.warmup_s, spec.warmup_s + spec.window_s))


def run_worker(load: Load, spec: WorkerSpec, start_wall: float) -> WorkerResult:
    """One worker in this process, starting at wall-clock `start_wall` (time.time)."""
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


def run_point(load: Load, concurrency: int, workers: int, warmup_s: float, window_s: float,
              send_delay_s: float = 0.0) -> list[WorkerResult]:
    """One point: `concurrency` users over `workers` processes; each worker's result."""
    ctx = multiprocessing.get_context("spawn")
    procs, pipes = [], []
    for i, users in enumerate(split_users(concurrency, workers)):
        parent, child = ctx.Pipe()
        spec = WorkerSpec(i, users, warmup_s, window_s, send_delay_s)
        p = ctx.Process(target=_worker_process, args=(load, spec, child), name=f"wallperf-client-{i}", daemon=True)
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
                raise RuntimeError("a client worker exited before it was ready; its error is printed above") from None
        start_wall = time.time() + START_LEAD_S
        for pipe in pipes:
            pipe.send(start_wall)
        results = []
        for pipe in pipes:
            if not pipe.poll(START_LEAD_S + warmup_s + window_s + load.timeout_s + 30):
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
