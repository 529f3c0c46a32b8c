"""The host monitor (harness.hardware.disturbance) on played counters: a quiet test, a
stretch in which the hypervisor takes the cores, disk reads, and no /proc; and its
parser on /proc files written here in Linux's format."""
import pytest

from wallperf.harness.hardware.disturbance import HostMonitor, read_counters


class Played:
    """Counters advancing on a fake clock: `steal(t)` and `iowait(t)` in cores busy at second t."""

    def __init__(self, steal=lambda t: 0.0, iowait=lambda t: 0.0, faults_per_s=0, reclaim_per_s=0):
        self.t, self.steal, self.iowait = 0.0, steal, iowait
        self.faults_per_s, self.reclaim_per_s = faults_per_s, reclaim_per_s
        self.c = {"steal_s": 100.0, "iowait_s": 50.0, "major_faults": 1000, "direct_reclaim_pages": 0}

    def read(self):
        return dict(self.c)

    def advance(self, seconds=1.0):
        self.c["steal_s"] += self.steal(self.t) * seconds
        self.c["iowait_s"] += self.iowait(self.t) * seconds
        self.c["major_faults"] += int(self.faults_per_s * seconds)
        self.c["direct_reclaim_pages"] += int(self.reclaim_per_s * seconds)
        self.t += seconds


def run(played: Played, seconds: int) -> dict:
    host = HostMonitor(2, interval_s=1e6, read=played.read, clock=lambda: played.t)  # the thread never ticks
    with host:
        for _ in range(seconds):
            played.advance()
            host.sample()
    return host.result()


def test_a_quiet_test_is_not_disturbed():
    r = run(Played(steal=lambda t: 0.01), 60)
    assert r["available"] and not r["disturbed"] and r["reasons"] == []
    assert r["seconds"] == 60.0 and r["steal_s"] == pytest.approx(0.6)
    assert r["worst_steal_share"] == pytest.approx(0.005, abs=1e-3)


def test_a_stretch_of_stolen_cores_is_found_and_placed():
    # 1.5 of 2 cores stolen from second 20 to 30: 75% over the worst 5 s, starting at 20 s.
    r = run(Played(steal=lambda t: 1.5 if 20 <= t < 30 else 0.0), 60)
    assert r["disturbed"]
    assert r["worst_steal_share"] == pytest.approx(0.75) and 20 <= r["worst_steal_at_s"] <= 25
    assert r["steal_s"] == pytest.approx(15.0)
    assert "75% of the cores away for 5 s" in r["reasons"][0]
    # The same steal spread over the whole minute is not a stretch: 12.5% throughout.
    spread = run(Played(steal=lambda t: 0.25), 60)
    assert spread["worst_steal_share"] == pytest.approx(0.125) and not spread["disturbed"]


def test_disk_reads_and_reclaim_disturb_a_test():
    r = run(Played(faults_per_s=100, iowait=lambda t: 0.6 if t < 8 else 0.0), 30)
    assert r["major_faults"] == 3000 and r["disturbed"]
    assert any("3000 pages were read back" in why for why in r["reasons"])
    assert any("waiting" in why for why in r["reasons"])
    r = run(Played(reclaim_per_s=5000), 20)
    assert r["direct_reclaim_pages"] == 100_000 and any("reclaimed" in why for why in r["reasons"])


def test_a_test_shorter_than_a_window_is_judged_whole():
    r = run(Played(steal=lambda t: 1.0), 3)
    assert r["worst_steal_share"] == pytest.approx(0.5) and r["disturbed"]


def test_without_proc_it_says_so():
    host = HostMonitor(2, read=lambda: None)
    with host:
        pass
    assert host.result() == {"available": False, "reason": "/proc/stat and /proc/vmstat cannot be read here"}


def test_the_counters_are_read_from_linux_files(tmp_path):
    (tmp_path / "stat").write_text("cpu  5330702 1448754 569787 2623828 12128 0 8225 35257 0 0\n"
                                   "cpu0 1 2 3 4 5 6 7 8 0 0\n")
    (tmp_path / "vmstat").write_text("nr_free_pages 1\npgmajfault 151706\npgsteal_direct 22966959\n")
    assert read_counters(tmp_path) == {"steal_s": 352.57, "iowait_s": 121.28, "major_faults": 151706,
                                       "direct_reclaim_pages": 22966959}
    (tmp_path / "stat").write_text("garbage\n")
    assert read_counters(tmp_path) is None
    assert read_counters(tmp_path / "nowhere") is None


def test_the_real_monitor_runs_its_thread_here():
    import time

    with HostMonitor(2, interval_s=0.05) as host:
        time.sleep(0.2)
    r = host.result()
    if read_counters() is None:
        assert not r["available"]
    else:
        assert r["available"] and r["seconds"] >= 0.2 and r["major_faults"] >= 0
