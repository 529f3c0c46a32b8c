"""A progress line on stderr while LoadGen runs: scenario, mode, queries done;
and a heartbeat line while a long step outside LoadGen runs (the calibration).

On a terminal the line is redrawn in place; otherwise (CI, a log file) a plain
line is printed every `interval_s`, so logs stay readable.
"""
from __future__ import annotations

import sys
import threading
import time

from wallperf.sut.redact import redact


class Progress:
    def __init__(self, label: str, stats, expected: int | None = None, stream=None,
                 interval_s: float | None = None, enabled: bool = True):
        self.label, self.stats, self.expected = label, stats, expected
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = interval_s if interval_s is not None else (0.5 if self.tty else 10.0)
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wallperf-progress", daemon=True)

    def line(self) -> str:
        s = self.stats
        elapsed = time.monotonic() - s.started
        total = f"/{self.expected}" if self.expected else ""
        rate = s.tokens / elapsed if elapsed > 0 else 0.0
        return (f"[{self.label}] queries done {s.completed}{total} (issued {s.issued}), "
                f"{s.tokens} tokens, {rate:.1f} tok/s, {elapsed:.0f} s")

    def _emit(self, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._emit()

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self._emit(final=True)


class Heartbeat:
    """While a long step runs (a calibration's part), a line every `interval_s` saying it
    still runs and for how long, so that minutes without output never look like a hang."""

    def __init__(self, label: str, interval_s: float = 10.0, stream=None):
        self.label, self.interval_s = label, interval_s
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wallperf-heartbeat", daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.interval_s):
            self.stream.write(f"wallperf: {self.label}: still running, {time.monotonic() - started:.0f} s\n")
            self.stream.flush()

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def say(msg: str) -> None:
    print(f"wallperf: {redact(msg)}", file=sys.stderr, flush=True)
