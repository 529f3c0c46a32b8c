"""Ctrl-C and SIGTERM in `wallperf run` (fault injection): during the model load,
mid-test, between tests, SIGTERM, and a second Ctrl-C. Each must end in bounded
time with exit 128+signal, a parseable results.json saying `complete: false`,
the finished tests' records and complete LoadGen logs, the interrupted test
named, the reports rendered, and no test process left behind."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 120


def start(out: Path, scenarios: str, duration: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "wallperf.cli", "run", "--model", "tiny-synthetic", "--scenario",
                             scenarios, "--mode", "performance", "--duration", duration, "--max-samples", "3",
                             "--output-tokens", "4", "--out", str(out), "--no-progress",
                             "--wall-from-profile"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=BOUND_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "the moment to interrupt never came"
        time.sleep(0.05)


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def started_loadgen(out: Path, scenario: str):
    return lambda: (out / "cpu-native" / "tiny-synthetic" / scenario / "performance" / "run_1" /
                    "mlperf_log_detail.txt").is_file()


def finish(proc: subprocess.Popen, sig=signal.SIGINT) -> int:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=BOUND_S)
    assert "core dumped" not in err and "Traceback" not in err, err[-3000:]
    return proc.returncode


def no_test_process_left(out: Path):
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() if "wallperf.driver.test_process" in line and str(out) in line]


def check_interrupted(out: Path, rc: int, sig: int, finished: int, interrupted: str):
    assert rc == 128 + sig
    r = results(out)
    assert r["complete"] is False and r["interrupted_by"] == signal.Signals(sig).name
    assert len(r["runs"]) == finished
    for run in r["runs"]:
        # A finished test's logs are complete: LoadGen wrote its summary.
        assert "Result is" in (Path(run["log_dir"]) / "mlperf_log_summary.txt").read_text()
    (stopped,) = r["interrupted"]
    assert stopped["interrupted"] is True and stopped["scenario"] == interrupted
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


def test_ctrl_c_mid_test(tiny_conf, tmp_path):
    out = tmp_path / "out"
    proc = start(out, "SingleStream", "60")
    wait_for(started_loadgen(out, "SingleStream"), proc)
    check_interrupted(out, finish(proc), signal.SIGINT, 0, "SingleStream")
    no_test_process_left(out)


def test_ctrl_c_during_load_before_any_test(tiny_conf, tmp_path):
    out = tmp_path / "out"
    proc = start(out, "SingleStream", "60")
    # results.json (complete: false) exists before the first test starts.
    wait_for(lambda: (out / "results.json").is_file(), proc)
    assert results(out)["complete"] is False and results(out)["runs"] == []
    check_interrupted(out, finish(proc), signal.SIGINT, 0, "SingleStream")


def test_ctrl_c_between_tests_keeps_the_finished_one(tiny_conf, tmp_path):
    out = tmp_path / "out"
    proc = start(out, "Offline,SingleStream", "1")
    wait_for(lambda: (out / "results.json").is_file() and len(results(out)["runs"]) == 1, proc)
    check_interrupted(out, finish(proc), signal.SIGINT, 1, "SingleStream")
    assert results(out)["runs"][0]["scenario"] == "Offline"


def test_sigterm_mid_test_exits_143(tiny_conf, tmp_path):
    out = tmp_path / "out"
    proc = start(out, "SingleStream", "60")
    wait_for(started_loadgen(out, "SingleStream"), proc)
    check_interrupted(out, finish(proc, signal.SIGTERM), signal.SIGTERM, 0, "SingleStream")


def test_second_ctrl_c_exits_at_once(tiny_conf, tmp_path):
    out = tmp_path / "out"
    proc = start(out, "SingleStream", "60")
    wait_for(started_loadgen(out, "SingleStream"), proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    proc.communicate(timeout=BOUND_S)
    assert proc.returncode == 130 and time.monotonic() - t0 < 10
    no_test_process_left(out)
