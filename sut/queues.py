"""Scenario queues: how issued samples reach the engine in each MLPerf scenario.

LoadGen's issue callback only puts work here (it holds the GIL); the SUT's
worker thread takes as much as the engine has free slots for:

- SingleStream: first in, first out; the engine runs one sequence at a time.
- Server / Interactive: first in, first out, into continuous batching.
- Offline: the one big query is sorted by prompt length, so the sequences that
  decode together have similar lengths and batches stay full.
- MultiStream: a query's samples are admitted together or not at all.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from wallperf.sut.scenarios import QUEUE_BY_LENGTH, QUEUE_WHOLE_QUERY, scenario


@dataclass(frozen=True, slots=True)
class WorkItem:
    query_id: int
    sample_index: int


class ScenarioQueue:
    """FIFO; subclasses change the order or the unit of admission."""

    def __init__(self):
        self._items: deque = deque()
        self._cond = threading.Condition()

    def put(self, items: list[WorkItem]) -> None:
        with self._cond:
            self._add(items)
            self._cond.notify()

    def take(self, free_slots: int) -> list[WorkItem]:
        with self._cond:
            out = []
            while self._items and len(out) < free_slots:
                out.append(self._items.popleft())
            return out

    def wait(self, timeout: float) -> None:
        """Block until something is queued (or the timeout passes)."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)

    def __len__(self) -> int:
        with self._cond:
            return sum(len(x) if isinstance(x, list) else 1 for x in self._items)

    def _add(self, items):
        self._items.extend(items)


class OfflineQueue(ScenarioQueue):
    def __init__(self, prompt_lengths):
        super().__init__()
        self._lengths = prompt_lengths

    def _add(self, items):
        self._items.extend(items)
        self._items = deque(sorted(self._items, key=lambda it: self._lengths[it.sample_index]))


class MultiStreamQueue(ScenarioQueue):
    def _add(self, items):
        self._items.append(list(items))

    def take(self, free_slots: int) -> list[WorkItem]:
        with self._cond:
            out = []
            while self._items and len(out) + len(self._items[0]) <= free_slots:
                out.extend(self._items.popleft())
            return out


def queue_for(name: str, prompt_lengths) -> ScenarioQueue:
    """The queue for a scenario name (Interactive is Server's); a ValueError lists the allowed names."""
    kind = scenario(name).queue
    if kind == QUEUE_BY_LENGTH:
        return OfflineQueue(prompt_lengths)
    if kind == QUEUE_WHOLE_QUERY:
        return MultiStreamQueue()
    return ScenarioQueue()
