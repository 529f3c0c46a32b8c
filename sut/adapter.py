"""The LoadGen SUT: issue_query puts samples on the scenario's queue; the engine
loop feeds the backend and reports tokens back to LoadGen.

`run_test` runs LoadGen's blocking StartTest on a helper thread and the engine
loop on the calling thread. The engine's CPU kernels use OpenMP, whose thread
pool belongs to the thread that starts a parallel region: driven from a second
Python thread, the process holds two pools on the same cores, and a batch-1
decode step of SmolLM2 on 2 cores took 15.7 ms instead of 9.6 ms
(`wallperf bench decode`, worker vs main thread). On the main thread the engine
reuses the pool that loading the model already started.

Token reporting follows LoadGen's contract for LLMs: outside Offline, the first
token goes out with FirstTokenComplete before the whole answer goes out with
QuerySamplesComplete; token ids are int32; `data` holds every token, the first
included; n_tokens > 1 (the sampling params' min_new_tokens sees to that).

Each query's own timing is kept (`QueryTiming`): when issue_query saw it, its
first token and its completion, by this process's monotonic clock. LoadGen
logs only percentiles, and goodput needs each query's TTFT and TPOT.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import mlperf_loadgen as lg
import numpy as np

from wallperf.sut.engine.engine import SamplingParams
from wallperf.sut.queues import ScenarioQueue, WorkItem


@dataclass
class SUTStats:
    """Counters the progress display reads; written by the worker thread only."""

    issued: int = 0
    completed: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    error: str | None = None


@dataclass(slots=True)
class QueryTiming:
    """One query as the SUT saw it (time.monotonic seconds); TTFT is measured from
    issue_query, which LoadGen calls slightly after the query's scheduled time."""

    sample_index: int
    issued: float
    first_token: float | None = None
    done: float | None = None
    n_tokens: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.issued

    @property
    def tpot_s(self) -> float | None:
        """(latency - TTFT) / (n_tokens - 1), LoadGen's definition."""
        if self.done is None or self.first_token is None or self.n_tokens < 2:
            return None
        return (self.done - self.first_token) / (self.n_tokens - 1)


def _response(query_id: int, tokens: np.ndarray) -> lg.QuerySampleResponse:
    return lg.QuerySampleResponse(query_id, tokens.ctypes.data, tokens.nbytes, len(tokens))


class LoadGenSUT:
    def __init__(self, backend, queue: ScenarioQueue, prompts: list, params, report_first_token: bool):
        """`params`: one SamplingParams for every sample, or a list with one per sample."""
        self.backend, self.queue, self.prompts = backend, queue, prompts
        self.params, self.report_first_token = params, report_first_token
        self.stats = SUTStats()
        self.queries: dict[int, QueryTiming] = {}
        self._outputs: dict[int, list[int]] = {}
        self._stop = threading.Event()
        self._loadgen: threading.Thread | None = None
        self.handle = lg.ConstructSUT(self.issue_query, self.flush_queries)

    def issue_query(self, query_samples) -> None:
        # Runs on LoadGen's thread under the GIL: a queue put and nothing more.
        items = [WorkItem(qs.id, qs.index) for qs in query_samples]
        now = time.monotonic()
        for it in items:
            self.queries[it.query_id] = QueryTiming(it.sample_index, now)
        self.stats.issued += len(items)
        self.queue.put(items)

    def flush_queries(self) -> None:
        """Nothing is held back: every queued sample is already being worked on."""

    def __enter__(self) -> "LoadGenSUT":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        # Interrupted mid-test (Ctrl-C in the engine loop), LoadGen still holds the
        # SUT: leave it to the process's exit rather than free it under LoadGen.
        if self._loadgen is None or not self._loadgen.is_alive():
            lg.DestroySUT(self.handle)

    def run_test(self, start_test) -> None:
        """Run `start_test()` (a call of LoadGen's StartTest*, which blocks until the
        test ends) on a helper thread while this thread runs the engine loop;
        return when the test has ended, re-raising what start_test raised."""
        failure: list[BaseException] = []

        def loadgen() -> None:
            try:
                start_test()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                failure.append(e)
            finally:
                self._stop.set()  # the loop sees it within its 10 ms wait

        self._loadgen = threading.Thread(target=loadgen, name="wallperf-loadgen", daemon=True)
        self._loadgen.start()
        self._run()
        self._loadgen.join()
        if failure:
            raise failure[0]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if self.backend.has_unfinished():
                    self._report(self.backend.step())
                else:
                    self.queue.wait(0.01)
            except Exception as e:  # noqa: BLE001 - LoadGen must never wait forever
                self.stats.error = f"{type(e).__name__}: {e}"
                self._drain_after_error()
                return

    def _admit(self) -> None:
        free = self.backend.free_slots
        if free > 0:
            for item in self.queue.take(free):
                self._outputs[item.query_id] = []
                params = self.params if isinstance(self.params, SamplingParams) else self.params[item.sample_index]
                self.backend.add_request(item.query_id, self.prompts[item.sample_index], params)

    def _report(self, events) -> None:
        first, done = [], []
        now = time.monotonic()
        for ev in events:
            out = self._outputs[ev.request_id]
            out.append(ev.token_id)
            timing = self.queries[ev.request_id]
            if ev.index == 1:
                timing.first_token = now
                if self.report_first_token:
                    first.append((ev.request_id, np.array(out[:1], dtype=np.int32)))
            if ev.finished:
                timing.done, timing.n_tokens = now, len(out)
                done.append((ev.request_id, np.array(self._outputs.pop(ev.request_id), dtype=np.int32)))
        # The arrays live in these lists until LoadGen has copied them.
        if first:
            lg.FirstTokenComplete([_response(qid, arr) for qid, arr in first])
        if done:
            lg.QuerySamplesComplete([_response(qid, arr) for qid, arr in done])
            self.stats.completed += len(done)
            self.stats.tokens += sum(len(arr) for _, arr in done)

    def _drain_after_error(self) -> None:
        """Complete every outstanding and later sample empty, so the test ends;
        the run is then reported failed with the error."""
        while not self._stop.is_set():
            pending = list(self._outputs)
            self._outputs.clear()
            pending += [it.query_id for it in self.queue.take(1 << 30)]
            if pending:
                empty = np.zeros(0, dtype=np.int32)
                lg.QuerySamplesComplete([_response(qid, empty) for qid in pending])
                self.stats.completed += len(pending)
            self.queue.wait(0.05)
