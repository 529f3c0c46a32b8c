"""Ctrl-C and SIGTERM in `wallperf run`: end the test in progress, keep what finished.

On the first SIGINT or SIGTERM the parent ends the running test's process group
(SIGTERM, then SIGKILL after a grace period) and `check` raises TestInterrupted,
so the driver writes results.json with `complete: false` and renders the reports
from the finished tests; the command exits 128 + the signal (130, 143). A second
signal ends the child group with SIGKILL and the parent at once, with the same
exit code and no core dump.

`nested`: the guarded process is itself a wallperf command with Interrupts of its
own (a sweep's point is a `wallperf run`), which must end its own children: the
first signal reaches it as SIGTERM and it is given NESTED_GRACE_S to finish its
records; a second signal is passed on as a second SIGTERM (on which it kills its
children and exits); only a third kills its group and the parent at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long an ended test process may take to go before it is killed.
TERMINATE_GRACE_S = 10.0
# How long an ended wallperf command may take: its own test's grace, then its records and reports.
NESTED_GRACE_S = 120.0


class TestInterrupted(Exception):
    """The run was asked to stop (SIGINT/SIGTERM); the test in progress, if any, was ended."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class Interrupts:
    def __init__(self, nested: bool = False):
        self.signum: int | None = None
        self.nested = nested
        self._signals = 0
        self._proc = None
        self._previous = {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self._signals += 1
        if self._signals == 1:
            self.signum = signum
            self._kill_group(signal.SIGTERM)
        elif self.nested and self._signals == 2:
            self._kill_group(signal.SIGTERM)
        else:
            self._kill_group(signal.SIGKILL)
            os._exit(128 + self.signum)

    def _kill_group(self, sig) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)

    @contextlib.contextmanager
    def guarding(self, proc):
        """While `proc` (a test process, leader of its group) runs, a signal ends it."""
        self._proc = proc
        try:
            if self.signum is not None:
                self._kill_group(signal.SIGTERM)
            yield
        finally:
            if self.signum is not None and proc.poll() is None:
                try:
                    proc.wait(NESTED_GRACE_S if self.nested else TERMINATE_GRACE_S)
                except Exception:  # noqa: BLE001 - any failure to wait ends in a kill
                    self._kill_group(signal.SIGKILL)
                    proc.wait()
            self._proc = None

    def check(self) -> None:
        if self.signum is not None:
            raise TestInterrupted(self.signum)
