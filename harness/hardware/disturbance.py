"""What else the machine did while a test ran: time the hypervisor gave the
cores to other guests (steal), time the cores waited on the disk (iowait), and
pages read back from disk (major faults) or reclaimed by a stalled allocation
(direct reclaim), from Linux's /proc/stat and /proc/vmstat.

A test's latency tail is set by its worst seconds, not its average. On a 2-core
VM a Server test's decode steps went from ~15 ms to ~245 ms for about 25 s in
the middle of a run, and 94 of its 464 queries broke their limits; nothing in
the test's own figures said why. So a thread reads the counters once a second
and keeps, beside the totals, the worst WINDOW_S-second stretch of steal and of
iowait, and when in the test it came. The record says the test was disturbed
when a share of the cores was lost for that long (DISTURBED_SHARE), or the
disk was read back or memory reclaimed more than a quiet machine does.
Where /proc cannot be read (not Linux), the result says so.
"""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path

from wallperf.harness.hardware.ticker import Ticker

WINDOW_S = 5.0
# A stretch of WINDOW_S in which steal or iowait took this share of the cores disturbs a test.
DISTURBED_SHARE = 0.25
# Over a whole test: more major faults (each a disk read, ~0.1-1 ms) or directly reclaimed pages than this.
MAJOR_FAULTS = 2000
DIRECT_RECLAIM_PAGES = 50_000


def read_counters(proc: Path = Path("/proc")) -> dict | None:
    """Cumulative counters: steal and iowait in seconds of one core, major faults and directly
    reclaimed pages; None where /proc/stat cannot be read."""
    try:
        fields = (proc / "stat").read_text().splitlines()[0].split()
        vmstat = dict(line.split()[:2] for line in (proc / "vmstat").read_text().splitlines() if line.strip())
    except (OSError, ValueError, IndexError):
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    hz = 100.0  # USER_HZ: /proc/stat counts in 1/100 s on every Linux architecture
    return {"steal_s": int(fields[8]) / hz, "iowait_s": int(fields[5]) / hz,
            "major_faults": int(vmstat.get("pgmajfault", 0)),
            "direct_reclaim_pages": int(vmstat.get("pgsteal_direct", 0))}


class HostMonitor:
    """with HostMonitor(cores) as host: ...; record["host"] = host.result()"""

    def __init__(self, cores: int, interval_s: float = 1.0, read=read_counters, clock=time.monotonic):
        self.cores, self.interval_s, self._read, self._clock = cores, interval_s, read, clock
        self._ticker = Ticker(self.sample, interval_s, "wallperf-host")
        self._samples: deque = deque()  # (t, counters) within the last WINDOW_S
        self._first = self._last = None
        self._worst = {"steal_s": (0.0, None), "iowait_s": (0.0, None)}  # share of the cores, at (s into the test)

    def __enter__(self) -> "HostMonitor":
        first = self._read()
        if first is not None:
            self._first = self._last = (self._clock(), first)
            self._samples.append(self._first)
            self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._ticker.stop()

    def sample(self) -> None:
        """Read the counters now and update the worst windows (the thread calls it each interval)."""
        now = self._read()
        if now is None or self._first is None:
            return
        t = self._clock()
        self._last = (t, now)
        self._samples.append(self._last)
        while len(self._samples) > 2 and t - self._samples[1][0] >= WINDOW_S:
            self._samples.popleft()
        t0, then = self._samples[0]
        if t - t0 < WINDOW_S - self.interval_s / 2:
            return  # not a whole window yet
        for key in self._worst:
            share = (now[key] - then[key]) / ((t - t0) * self.cores)
            if share > self._worst[key][0]:
                self._worst[key] = (share, t0 - self._first[0])

    def result(self) -> dict:
        if self._first is None or self._last is None:
            return {"available": False, "reason": "/proc/stat and /proc/vmstat cannot be read here"}
        (t0, a), (t1, b) = self._first, self._last
        seconds = max(t1 - t0, 1e-9)
        out = {"available": True, "seconds": round(seconds, 1), "cores": self.cores,
               "steal_s": round(b["steal_s"] - a["steal_s"], 2), "iowait_s": round(b["iowait_s"] - a["iowait_s"], 2),
               "major_faults": b["major_faults"] - a["major_faults"],
               "direct_reclaim_pages": b["direct_reclaim_pages"] - a["direct_reclaim_pages"],
               "window_s": WINDOW_S}
        reasons = []
        for name, who, state in (("steal", "the hypervisor", "away"), ("iowait", "the disk", "waiting")):
            share, at = self._worst[f"{name}_s"]
            if at is None:  # a test shorter than a window: its whole length is the window
                share, at = (b[f"{name}_s"] - a[f"{name}_s"]) / (seconds * self.cores), 0.0
            out[f"worst_{name}_share"] = round(share, 3)
            out[f"worst_{name}_at_s"] = round(at, 1)
            if share >= DISTURBED_SHARE:
                reasons.append(f"{who} kept {share:.0%} of the cores {state} for {WINDOW_S:.0f} s at {at:.0f} s")
        if out["major_faults"] > MAJOR_FAULTS:
            reasons.append(f"{out['major_faults']} pages were read back from disk (major faults)")
        if out["direct_reclaim_pages"] > DIRECT_RECLAIM_PAGES:
            reasons.append(f"{out['direct_reclaim_pages']} pages were reclaimed by stalled allocations")
        out["disturbed"] = bool(reasons)
        out["reasons"] = reasons
        return out
