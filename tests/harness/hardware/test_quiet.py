"""Whether the probe's machine was quiet: the wait for other work to end (bounded), the
spread of its repeats, and what the record says. The machine's busyness is played by a
list of samples and a fake clock."""
import os
import statistics

import pytest

from wallperf.harness.hardware import quiet as quiet_module
from wallperf.harness.hardware.quiet import QUIET_BUSY_CORES, SPREAD_LIMIT, Quiet, busy_cores, spread, wait_for_quiet


def machine(samples, seconds_per_sample=1.0):
    """(sample, clock): each sample of busy cores takes `seconds_per_sample` on the clock."""
    clock = [0.0]
    it = iter(samples)

    def sample():
        clock[0] += seconds_per_sample
        return next(it)
    return sample, lambda: clock[0]


def test_waits_until_other_work_ends():
    sample, clock = machine([1.8, 1.5, 0.05])
    told = []
    q = wait_for_quiet(30, on_wait=told.append, sample=sample, load=lambda: (2.4, 1.0, 0.5), clock=clock)
    assert told == [1.8]  # said once, with what it saw
    assert q.busy_cores == 0.05 and q.waited_s == 3.0 and q.load_1min == 2.4
    # The 1-minute load average still counts the work that just ended: recorded, not held against it.
    assert q.quiet and q.to_dict()["quiet"] is True and q.to_dict()["quiet_reasons"] == []


def test_the_wait_is_bounded_and_the_record_says_why_not_quiet():
    sample, clock = machine([1.5] * 100)
    q = wait_for_quiet(10, sample=sample, load=lambda: (3.0, 2.0, 1.0), clock=clock)
    assert q.waited_s == 10.0 and q.busy_cores == 1.5 and not q.quiet
    record = q.to_dict()
    assert record["quiet"] is False and record["load_1min"] == 3.0
    assert record["quiet_reasons"] == [f"other work kept 1.5 of {q.cores} cores busy when it started "
                                       f"(after waiting 10 s)"]
    assert q.summary().startswith("NOT QUIET: other work kept 1.5")


def test_no_wait_when_quiet_or_when_told_not_to():
    sample, clock = machine([0.0])
    assert wait_for_quiet(60, sample=sample, load=lambda: (0.0, 0, 0), clock=clock).waited_s == 1.0
    sample, clock = machine([2.0])
    q = wait_for_quiet(0, sample=sample, load=lambda: (0.0, 0, 0), clock=clock)
    assert q.waited_s == 1.0 and not q.quiet


def test_spread_is_median_over_best():
    times = [1.0, 1.3, 1.1, 1.25, 1.05]
    assert spread(times) == pytest.approx(statistics.median(times) / min(times) - 1)
    assert spread([1.0, 1.0]) is None  # two repeats say nothing of a spread


def test_a_wide_spread_marks_the_measurement_not_quiet():
    calm = Quiet(cores=2, load_1min=0.1, busy_cores=0.0, waited_s=1.0)
    ok = calm.with_spreads({"copy": 0.02, "read (sum)": SPREAD_LIMIT, "float32 peak": None})
    assert ok.quiet and ok.spread == SPREAD_LIMIT and "float32 peak" not in ok.spreads
    bad = calm.with_spreads({"copy": 0.02, "triad": 0.8})
    assert not bad.quiet and bad.spread == 0.8
    assert bad.reasons == ["its repeats spread 80% (triad; above 10%: something else took the cores now and then)"]


def test_without_proc_stat_the_load_average_decides():
    assert not Quiet(cores=2, load_1min=1.2, busy_cores=None, waited_s=0.0).quiet
    assert Quiet(cores=2, load_1min=0.4, busy_cores=None, waited_s=0.0).quiet
    assert Quiet(cores=2, load_1min=1.2, busy_cores=0.0, waited_s=0.0).quiet


def test_busy_cores_reads_proc_stat_against_a_second_reading(monkeypatch, tmp_path):
    """busy = (busy jiffies) / (all jiffies) over the window, times the CPUs; checked by hand."""
    readings = iter(["cpu  100 0 50 800 50 0 0 0 0 0\n", "cpu  250 0 100 950 50 0 0 0 0 0\n"])
    real_open = open
    monkeypatch.setattr(quiet_module.time, "sleep", lambda s: None)
    monkeypatch.setattr(quiet_module.os, "cpu_count", lambda: 4)

    def fake_open(path, *a, **k):
        if path == "/proc/stat":
            f = tmp_path / "stat"
            f.write_text(next(readings))
            return real_open(f, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    # 200 busy (150 user + 50 system) of 350 jiffies, on 4 CPUs.
    assert busy_cores() == pytest.approx(200 / 350 * 4)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc/stat")
def test_busy_cores_on_this_machine_is_a_share_of_its_cpus():
    busy = busy_cores(0.2)
    assert 0.0 <= busy <= os.cpu_count() + 1e-9
    assert QUIET_BUSY_CORES < 1
