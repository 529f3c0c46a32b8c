"""Whether the machine was quiet while it was measured.

A bandwidth or a peak measured while other work shares the cores is low, and a
wall set too low lets every MBU overstate: one 2-core VM streamed 12.6 GB/s
with other jobs running against 22.3 GB/s idle, and the low figure was used.
So the probe looks twice:

- before it starts: how many cores other work keeps busy now (from /proc/stat
  over a short window; the 1-minute load average is recorded too, but it lags
  a minute behind and still counts work that has ended). It waits, up to a
  bound, for that to fall below QUIET_BUSY_CORES;
- after: the spread of its own repeats (median over best, less one). Repeats of
  a streaming pass on an idle machine agree within a few percent; other work
  taking the cores now and then spreads them.

The record says whether it was quiet, and why not (`reasons`), so a figure
measured on a busy machine is never taken for a quiet one.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

# Other work using less than this many cores still counts as quiet (a shell, a logger).
QUIET_BUSY_CORES = 0.25
# Where /proc/stat cannot be read: a 1-minute load average at or above this per core is busy.
BUSY_LOAD_PER_CORE = 0.5
# Repeats further apart than this (median over best) were disturbed.
SPREAD_LIMIT = 0.10
SAMPLE_S = 1.0


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def busy_cores(window_s: float = SAMPLE_S) -> float | None:
    """How many of the CPUs were busy over the next `window_s` seconds, or None where unknown."""
    before = _cpu_times()
    time.sleep(window_s)
    after = _cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    # /proc/stat counts every CPU of the machine, not only this process's.
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def spread(times: list[float]) -> float | None:
    """How far a measurement's repeats spread: median over best, less one (None under 3 repeats)."""
    if len(times) < 3 or min(times) <= 0:
        return None
    return statistics.median(times) / min(times) - 1


@dataclass(frozen=True)
class Quiet:
    """How quiet the machine was: before measuring, and in the measurement's own repeats."""

    cores: int
    load_1min: float
    busy_cores: float | None  # other work's use, in cores, just before measuring
    waited_s: float
    spread: float | None = None  # the largest spread of the measurement's repeats
    spreads: dict = field(default_factory=dict)  # what -> spread

    @property
    def reasons(self) -> list[str]:
        found = []
        if self.busy_cores is not None and self.busy_cores >= QUIET_BUSY_CORES:
            found.append(f"other work kept {self.busy_cores:.1f} of {self.cores} cores busy when it started "
                         f"(after waiting {self.waited_s:.0f} s)")
        if self.busy_cores is None and self.load_1min >= BUSY_LOAD_PER_CORE * self.cores:
            found.append(f"the 1-minute load average was {self.load_1min:.1f} on {self.cores} cores")
        if self.spread is not None and self.spread > SPREAD_LIMIT:
            worst = max(self.spreads, key=self.spreads.get) if self.spreads else "its repeats"
            found.append(f"its repeats spread {100 * self.spread:.0f}% ({worst}; above {100 * SPREAD_LIMIT:.0f}%: "
                         f"something else took the cores now and then)")
        return found

    @property
    def quiet(self) -> bool:
        return not self.reasons

    def with_spreads(self, spreads: dict) -> "Quiet":
        known = {k: v for k, v in spreads.items() if v is not None}
        return Quiet(self.cores, self.load_1min, self.busy_cores, self.waited_s,
                     max(known.values()) if known else None, known)

    def to_dict(self) -> dict:
        return {"quiet": self.quiet, "quiet_reasons": self.reasons, "load_1min": round(self.load_1min, 2),
                "busy_cores": None if self.busy_cores is None else round(self.busy_cores, 2),
                "cores": self.cores, "waited_s": round(self.waited_s, 1),
                "spread": None if self.spread is None else round(self.spread, 4),
                "spreads": {k: round(v, 4) for k, v in self.spreads.items()}}

    def summary(self) -> str:
        if self.quiet:
            spread = "" if self.spread is None else f", repeats within {100 * self.spread:.0f}%"
            return f"quiet (load {self.load_1min:.1f} on {self.cores} cores{spread})"
        return "NOT QUIET: " + "; ".join(self.reasons)


def wait_for_quiet(max_wait_s: float, on_wait=None, sample=None, load=None, clock=None) -> Quiet:
    """Sample how busy the machine is (`sample`, default busy_cores) until other work uses
    under QUIET_BUSY_CORES, or `max_wait_s` has passed; `on_wait(busy)` is told once, when
    it starts waiting."""
    sample, load, clock = sample or busy_cores, load or os.getloadavg, clock or time.monotonic
    start = clock()
    busy = sample()
    told = False
    while busy is not None and busy >= QUIET_BUSY_CORES and clock() - start < max_wait_s:
        if on_wait and not told:
            on_wait(busy)
            told = True
        busy = sample()
    return Quiet(cores(), load()[0], busy, clock() - start)
