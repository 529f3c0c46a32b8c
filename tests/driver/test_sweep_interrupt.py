"""Ctrl-C on `wallperf sweep` while a point's LoadGen test runs (fault injection, real
processes): the point's `wallperf run` and its test process end with the sweep,
none is left behind (the issue: the test process was orphaned and kept decoding)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 180


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every process below `pid`."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in ps.splitlines()]
    children: dict[int, list] = {}
    for p, pp, *args in rows:
        children.setdefault(int(pp), []).append((int(p), args[0] if args else ""))
    found, pending = {}, [pid]
    while pending:
        for child, args in children.get(pending.pop(), []):
            found[child] = args
            pending.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_a_sweep_mid_point_leaves_no_process(tiny_conf, tmp_path, sig):
    out = tmp_path / "sw"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "wallperf.cli", "sweep", "--qps", "0.5,1", "--out", str(out),
                             "--model", "tiny-synthetic", "--duration", "120", "--max-samples", "3",
                             "--output-tokens", "4", "--wall-from-profile"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    detail = out / "sweep" / "qps_0.5" / "cpu-native" / "tiny-synthetic" / "Server" / "performance" / "run_1"
    deadline = time.monotonic() + BOUND_S
    while not (detail / "mlperf_log_detail.txt").is_file():
        assert proc.poll() is None, f"the sweep ended early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "the point's LoadGen test never started"
        time.sleep(0.1)
    below = descendants(proc.pid)
    # The point's `wallperf run`, and its LoadGen test process under it.
    assert any("wallperf.driver.test_process" in args for args in below.values()), below
    assert any(" run " in args and str(out) in args for args in below.values()), below
    # The signal goes to the sweep alone (a `kill`, or a terminal's Ctrl-C: its points run in sessions of their own).
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=BOUND_S)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # Every one gone within half a second of the sweep's exit (polled: most are gone at once).
    gone_by = time.monotonic() + 0.5
    while any(alive(pid) for pid in below) and time.monotonic() < gone_by:
        time.sleep(0.02)
    assert [args for pid, args in below.items() if alive(pid)] == []
