"""Fault injection under `wallperf run`: each fault ends the run in bounded time,
with an exit code and one line that say what happened, and nothing half-written.

- The engine raising mid-run: every test still ends (LoadGen gets empty
  answers), its record is INVALID naming the error, results.json is complete
  and parses, LoadGen's logs are whole.
- A full disk for --out: a small tmpfs mounted in a user namespace (no root
  needed) where the machine allows one: too small for LoadGen's own logs,
  which LoadGen cuts off silently, so the run says it cannot read them. And a
  mock of the result writes (every machine): the write that fails is named.
  Either way exit 1, one line, no traceback, nothing half-written.
(The backend server killed mid-run is tests/harness/driver/test_run_server_killed.py.)
"""
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wallperf.cli import main
from wallperf.harness.loadgen.logs import read_detail_log

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--duration", "1", "--max-samples", "4", "--output-tokens", "4", "--no-progress"]
# The wall as the profile gives it: a wall measured first costs seconds and is not what these faults are about.
WALL = ["--wall-from-profile"]
# Loading SmolLM2 and MMLU, one short test, the reports: minutes at most on a loaded 2-core machine.
BOUND_S = 300


# Each LoadGen test runs in a process of its own, so the fault goes in through
# sitecustomize, which every Python process on the path imports at start.
INJECT = """
from wallperf.sut.engine.engine import Engine

_real_step, _steps = Engine.step, [0]


def _failing_step(self):
    _steps[0] += 1
    if _steps[0] > 3:
        raise RuntimeError("injected fault: device lost")
    return _real_step(self)


Engine.step = _failing_step
"""


def test_engine_raising_mid_run_ends_every_test_invalid(tmp_path, monkeypatch, capsys):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(inject), os.environ.get("PYTHONPATH")))))
    out = tmp_path / "out"
    started = time.monotonic()
    rc = main(["run", "--scenario", "Offline", "--mode", "performance", "--out", str(out), *QUICK, *WALL])
    assert time.monotonic() - started < BOUND_S
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and len(results["runs"]) == 1
    for run in results["runs"]:
        assert run["valid"] is False
        assert run["invalid_reasons"][0] == "the SUT failed: RuntimeError: injected fault: device lost"
        assert "result_validity" in read_detail_log(Path(run["log_dir"]) / "mlperf_log_detail.txt").values
    assert (out / "report.html").is_file() and "Traceback" not in capsys.readouterr().err


def _user_namespace_mounts() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=8k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


def _run_on_tmpfs(tmp_path: Path, size: str) -> tuple[subprocess.CompletedProcess, Path, float]:
    disk, out = tmp_path / "disk", tmp_path / "disk" / "out"
    disk.mkdir()
    run = [sys.executable, "-m", "wallperf.cli", "run", "--scenario", "Offline", "--mode", "performance",
           "--out", str(out), *QUICK, *WALL]
    # In a mount namespace of its own: the tmpfs goes away with the run, nothing to unmount.
    script = f'mount -t tmpfs -o size={size} tmpfs "$0" && "$@"; rc=$?; ' \
             'find "$0" -name results.json -exec cat {} + > "$0.results"; exit $rc'
    started = time.monotonic()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(disk), *run],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=BOUND_S)
    return proc, Path(f"{disk}.results"), time.monotonic() - started


@pytest.mark.skipif(not _user_namespace_mounts(), reason="no tmpfs mount in a user namespace here "
                    "(test_full_disk_mocked covers the write path)")
def test_full_disk_for_out(tmp_path):
    """8 KiB: LoadGen's detail log is cut off (LoadGen does not report failed writes)."""
    proc, results_copy, elapsed = _run_on_tmpfs(tmp_path, "8k")
    stderr = proc.stderr.decode()
    print(f"tmpfs of 8 KiB: exit {proc.returncode} after {elapsed:.0f} s")
    assert proc.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("wallperf: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    # Either LoadGen's logs are cut off, or results.json (written before the first test) cannot be.
    assert ("cannot read what LoadGen wrote" in errors[0] and "disk holding --out full" in errors[0]) or \
        "No space left" in errors[0], errors[0]
    # A results.json on the full disk (if one was written at all) is whole: it parses.
    if results_copy.read_bytes():
        json.loads(results_copy.read_text())


def test_full_disk_mocked(tmp_path, monkeypatch, capsys):
    """Where no tmpfs can be mounted: every write of a result or report fails as on a full disk."""
    from wallperf.sut import atomic

    class FullDisk:
        @staticmethod
        def mkstemp(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "tempfile", FullDisk)
    out = tmp_path / "out"
    # The wall from the profile: a wall measured here would be stored first (unless the last hour's was
    # reused), and its write would meet the full disk before results.json's.
    rc = main(["run", "--scenario", "Offline", "--mode", "performance", "--out", str(out), "--wall-from-profile",
               *QUICK])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"wallperf: error: [Errno {errno.ENOSPC}] cannot write {out / 'results.json'}: No space left" in err
    assert not (out / "results.json").exists() and not list(out.rglob("*.part"))
