"""One LoadGen test per process: `run_test` (the parent's side) and `main` (the child's).

LoadGen's TestSettings::FromConfig applies mlperf.conf only on its first call in a
process; a second test in the same process gets seeds 0, equal issue off and
`error_invalid_config`. So every test (each scenario and mode, each --find-peak
try, each sweep point, each compliance test, every backend) runs in a fresh
Python process that loads the model itself; with --tp that process starts the
ranks. `run_test` is the reusable primitive: a TestSpec in, the test's record out;
`run_in_process` runs any such job (the calibration's measurement is one).

The child runs in a session of its own, so a Ctrl-C at the terminal reaches only
the parent (wallperf.driver.interrupt), which ends the child's whole process group
(tensor-parallel ranks included). The child pickles its result to a file the
parent names; its progress goes to the shared stderr.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from wallperf.harness.artifacts import ArtifactError
from wallperf.harness.config import ConfigError
from wallperf.driver.interrupt import Interrupts
from wallperf.driver.one_test import TestSpec, execute
from wallperf.harness.loadgen.logs import LogParseError
from wallperf.harness.loadgen.qsl import DatasetError
from wallperf.harness.loadgen.results import OutputError
from wallperf.sut import redact
from wallperf.sut.atomic import atomic_file
from wallperf.sut.loading.load import CheckpointError


# Errors the command line reports as one line (bad input, a full disk, a cut-off log):
# a test process hands them to the parent as they are.
BAD_INPUT = (ConfigError, ArtifactError, DatasetError, CheckpointError)
REPORTED = (*BAD_INPUT, OutputError, LogParseError)


class TestProcessFailed(RuntimeError):
    """A test process ended without a record (a crash, or an error it reported)."""


def run_test(spec: TestSpec, interrupts: Interrupts | None = None) -> dict:
    """Run one test in a fresh process; {"record", "format"} as the child returned it.

    `interrupts` is the caller's wallperf.driver.interrupt.Interrupts (entered, so
    it holds SIGINT/SIGTERM): it is told which process group to end on a signal,
    and raises TestInterrupted here. Without one, signals act as they otherwise would."""
    # A compliance test runs where its audit.config is, as its README asks.
    cwd = spec.log_dir if spec.compliance else None
    return run_in_process(f"the {spec.scenario.name} {spec.compliance or spec.mode} test", _run_one, (spec,),
                          interrupts, cwd)


def _run_one(spec: TestSpec) -> dict:
    if spec.resolved.run.tp > 1:
        from wallperf.driver.tp_run import run_tp_test

        return run_tp_test(spec)
    return execute(spec)


def run_in_process(what: str, fn, args: tuple, interrupts: Interrupts | None = None, cwd: Path | None = None):
    """fn(*args) in a fresh Python process (fn importable at module level; args and
    result picklable); its bad-input errors come back as ConfigError."""
    interrupts = interrupts or Interrupts()
    interrupts.check()
    with tempfile.TemporaryDirectory(prefix="wallperf-test-") as tmp:
        job_path, out_path = Path(tmp) / "job.pickle", Path(tmp) / "result.pickle"
        job_path.write_bytes(pickle.dumps((fn, args)))
        if cwd is not None:
            cwd.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "wallperf.driver.test_process", str(job_path), str(out_path)],
                                start_new_session=True, cwd=cwd, env=_child_env())
        with interrupts.guarding(proc):
            rc = proc.wait()
        interrupts.check()
        if not out_path.is_file():
            raise TestProcessFailed(f"{what}'s process ended with exit code {rc} and no result")
        result = pickle.loads(out_path.read_bytes())
    if "raised" in result:
        raise _rebuilt(*result["raised"])
    if "error" in result:
        raise TestProcessFailed(f"{what} failed: {result['error']}")
    return result["value"]


def _rebuilt(exc_type: type, message: str) -> BaseException:
    """The child's exception as one of the same type and words, so the command line
    reports it as it would have in one process (its __init__ is not rerun: the
    project's error types take their parts, not the message)."""
    exc = exc_type.__new__(exc_type)
    Exception.__init__(exc, message)
    return exc


def _child_env() -> dict:
    """The parent's environment, with its import path first so the child runs the same code."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def main(argv: list[str]) -> int:
    # Keys never reach stderr from a test process either.
    redact.install()
    job_path, out_path = Path(argv[0]), Path(argv[1])
    fn, args = pickle.loads(job_path.read_bytes())
    try:
        result = {"value": fn(*args)}
    except REPORTED as e:
        result = {"raised": (type(e), str(e))}
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it with the test's name
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    with atomic_file(out_path, mode=0o600) as f:
        f.write(pickle.dumps(result))
    # Triton's nanobind bindings list hundreds of "leaked" objects at interpreter exit,
    # with no final newline: on the shared stderr they would run into the parent's next
    # line. Everything this process had to say is said by now.
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
