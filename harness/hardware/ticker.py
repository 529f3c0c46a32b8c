"""A function called every few seconds on a thread of its own while a test runs,
and once more when it stops (the energy meter's and the host monitor's reads)."""
from __future__ import annotations

import threading


class Ticker:
    def __init__(self, tick, interval_s: float, name: str):
        self.tick, self.interval_s, self.name = tick, interval_s, name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, then tick once more (what happened since its last tick)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.tick()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()
