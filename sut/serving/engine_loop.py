"""The loop that owns the engine behind `wallperf serve`: requests come in from
HTTP threads through an inbox, tokens go back to each request's queue.

The engine is touched by this loop only (on its own thread, or on the main
one for the CPU kernels' OpenMP pool: see sut/adapter.py). An HTTP thread whose
client went away asks for its request to be aborted; the loop ends it in the
engine, so its sequence stops decoding and its KV blocks are freed at once.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from dataclasses import dataclass

from wallperf.sut.serving.completion_request import RequestError
from wallperf.sut.engine.engine import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: int
    reason: str


class EngineLoop:
    """`submit` returns the request's id and the queue its TokenEvents arrive on;
    a RequestError on that queue means the engine failed or stopped."""

    def __init__(self, engine, own_thread: bool = True):
        """With own_thread=False the caller runs `run()` on its own thread (the
        main one, for the CPU kernels' OpenMP pool: see sut/adapter.py)."""
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, queue.SimpleQueue] = {}
        self._ids = itertools.count()
        # Taken by submit and by the final drain, so no request slips in after the drain.
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self.error: str | None = None
        self._thread = None
        if own_thread:
            self._thread = threading.Thread(target=self.run, name="wallperf-engine", daemon=True)
            self._thread.start()

    def submit(self, prompt_ids, params: SamplingParams) -> tuple[int, queue.SimpleQueue]:
        events: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if self._closed:
                raise RequestError(503, f"the engine is not running: {self.error or 'server stopped'}")
            request_id = next(self._ids)
            self._inbox.put((request_id, list(prompt_ids), params, events))
        return request_id, events

    def abort(self, request_id: int, reason: str) -> None:
        """End a request whose client is gone (safe from any thread; a finished one is left alone)."""
        self._inbox.put(_Abort(request_id, reason))

    def request_stop(self) -> None:
        """Ask the loop to end (safe from a signal handler); `stop` also waits for it."""
        self._stop.set()
        self._inbox.put(None)

    def stop(self) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join()

    def run(self) -> None:
        """The loop, until request_stop: on its own thread, or (own_thread=False) the caller's."""
        try:
            while not self._stop.is_set():
                self._admit(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    for ev in self.engine.step():
                        self._streams[ev.request_id].put(ev)
                        if ev.finished:
                            del self._streams[ev.request_id]
        except Exception as e:  # noqa: BLE001 - every waiting client must hear of it
            self.error = f"{type(e).__name__}: {e}"
            log.exception("the engine failed")
        failure = RequestError(503, f"the engine stopped: {self.error or 'server shutting down'}")
        with self._lock:
            self._closed = True
        for events in self._streams.values():
            events.put(failure)
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if isinstance(item, tuple):
                item[3].put(failure)

    def _admit(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                if isinstance(item, _Abort):
                    self._abort(item)
                elif item is not None:
                    rid, prompt, params, events = item
                    try:
                        self.engine.add_request(rid, prompt, params)
                        self._streams[rid] = events
                    except ValueError as e:
                        events.put(RequestError(400, str(e)))
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _abort(self, abort: _Abort) -> None:
        freed = self.engine.abort(abort.request_id)
        if freed is not None:
            del self._streams[abort.request_id]
            log.warning("request %d aborted (%s): its sequence stopped, %d KV blocks freed",
                        abort.request_id, abort.reason, freed)
