"""MLPerf compliance TEST06 on an accuracy log: is what the SUT reported consistent?

TEST06 (mlcommons/inference compliance/nvidia/TEST06/run_verification.py) guards
LLM token throughput against padding and reporting tricks. Its three checks, per
response in `mlperf_log_accuracy.json`:

- first token: the tokens reported with FirstTokenComplete (LoadGen logs them
  as `token_data`) agree with the start of `data` over their common length.
  Skipped in Offline, where there is no first-token report.
- EOS: the response does not end in two or more EOS tokens (padding counted as
  output). Position 0 is never examined, so `[eos, eos]` passes, as there.
- sample length: `len(data) == token_count`, the n_tokens LoadGen counted.

`passed` is TEST06's verdict. `text_after_eos` is stricter than TEST06 and does
not change it: an EOS followed by more tokens means the engine ran on past the
end of the answer, which TEST06 lets through but a report should show.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from wallperf.harness.loadgen.logs import AccuracyEntry, read_accuracy_log
from wallperf.sut.scenarios import LOADGEN_SCENARIOS

DTYPES = ("int64", "int32", "int16", "float32")
MAX_LISTED_FAILURES = 10
_SCENARIOS = tuple(LOADGEN_SCENARIOS)


@dataclass(frozen=True, slots=True)
class Failure:
    qsl_idx: int
    seq_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """One check over all entries; `failures` lists at most MAX_LISTED_FAILURES of the `failed`."""

    name: str
    status: str  # "passed" | "failed" | "skipped"
    checked: int
    failed: int
    failures: tuple[Failure, ...]
    note: str | None = None

    def __post_init__(self):
        if self.status not in ("passed", "failed", "skipped"):
            raise ValueError(f"unknown check status {self.status!r}")


@dataclass(frozen=True, slots=True)
class Test06Result:
    path: Path
    eos_token_id: int
    dtype: str
    entries: int
    first_token: CheckOutcome
    eos: CheckOutcome
    sample_length: CheckOutcome
    text_after_eos: CheckOutcome

    @property
    def passed(self) -> bool:
        return all(c.status != "failed" for c in (self.first_token, self.eos, self.sample_length))

    @property
    def strict_passed(self) -> bool:
        return self.passed and self.text_after_eos.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        checks = (self.first_token, self.eos, self.sample_length, self.text_after_eos)
        return {
            "path": str(self.path),
            "passed": self.passed,
            "strict_passed": self.strict_passed,
            "eos_token_id": self.eos_token_id,
            "dtype": self.dtype,
            "entries": self.entries,
            "checks": {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in checks},
        }


def check_test06(
    accuracy_log_path: Path | str,
    eos_token_id: int,
    dtype: str = "int32",
    scenario: str | None = None,
) -> Test06Result:
    """Run TEST06's checks; `scenario` None means: check first tokens wherever the log has them.

    With a streaming scenario named, a response without `token_data` fails the
    first-token check (TEST06 errors out on it); with "Offline" the check is skipped.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    if scenario is not None and scenario not in _SCENARIOS:
        raise ValueError(f"scenario must be one of {_SCENARIOS}, not {scenario!r}")
    path = Path(accuracy_log_path)
    entries = read_accuracy_log(path)
    if not entries:
        raise ValueError(
            f"{path}: no responses logged; TEST06 needs a run with accuracy logging "
            "(AccuracyOnly, or its audit.config's accuracy_log_sampling_target)"
        )
    decoded = [_decode(e, dtype) for e in entries]
    return Test06Result(
        path=path,
        eos_token_id=eos_token_id,
        dtype=dtype,
        entries=len(entries),
        first_token=_first_token_check(entries, decoded, dtype, scenario),
        eos=_run_check("eos", entries, decoded, lambda e, d: _trailing_eos_problem(d, eos_token_id)),
        sample_length=_run_check("sample_length", entries, decoded, _length_problem),
        text_after_eos=_run_check(
            "text_after_eos", entries, decoded, lambda e, d: _text_after_eos_problem(d, eos_token_id)
        ),
    )


def _decode(entry: AccuracyEntry, dtype: str) -> np.ndarray | str:
    """The response's tokens, or why they cannot be read (which fails every check on it)."""
    try:
        return entry.tokens(dtype)
    except ValueError as exc:
        return f"data unreadable as {dtype}: {exc}"


def _run_check(
    name: str,
    entries: list[AccuracyEntry],
    decoded: list[np.ndarray | str],
    problem_of: Callable[[AccuracyEntry, np.ndarray], str | None],
) -> CheckOutcome:
    failures = []
    for entry, data in zip(entries, decoded):
        problem = data if isinstance(data, str) else problem_of(entry, data)
        if problem is not None:
            failures.append(Failure(entry.qsl_idx, entry.seq_id, problem))
    return CheckOutcome(
        name=name,
        status="failed" if failures else "passed",
        checked=len(entries),
        failed=len(failures),
        failures=tuple(failures[:MAX_LISTED_FAILURES]),
    )


def _first_token_check(
    entries: list[AccuracyEntry], decoded: list[np.ndarray | str], dtype: str, scenario: str | None
) -> CheckOutcome:
    if scenario is not None and not LOADGEN_SCENARIOS[scenario].reports_first_token:
        return _skipped("first_token", "TEST06 skips it in Offline: no first token is reported there")
    if scenario is None and all(e.token_data is None for e in entries):
        return _skipped(
            "first_token",
            "the accuracy log holds no first tokens (token_data): an Offline run, or "
            "use_token_latencies was off; name the scenario to require them",
        )

    def problem(entry: AccuracyEntry, data: np.ndarray) -> str | None:
        if entry.token_data is None:
            return "no first token logged (FirstTokenComplete not called, or use_token_latencies off)"
        try:
            first = entry.first_tokens(dtype)
        except ValueError as exc:
            return f"token_data unreadable as {dtype}: {exc}"
        # As TEST06 does (zip), only the common length is compared.
        n = min(len(first), len(data))
        if not np.array_equal(first[:n], data[:n]):
            return f"first token(s) reported {first[:n].tolist()}, data starts {data[:n].tolist()}"
        return None

    return _run_check("first_token", entries, decoded, problem)


def _skipped(name: str, note: str) -> CheckOutcome:
    return CheckOutcome(name=name, status="skipped", checked=0, failed=0, failures=(), note=note)


def _trailing_eos_problem(data: np.ndarray, eos: int) -> str | None:
    not_eos = np.flatnonzero(data != eos)
    run = len(data) if len(not_eos) == 0 else len(data) - 1 - int(not_eos[-1])
    # TEST06 walks back from the end but never examines position 0, so [eos, eos] passes.
    if min(run, len(data) - 1) < 2:
        return None
    return f"ends with {run} EOS tokens"


def _length_problem(entry: AccuracyEntry, data: np.ndarray) -> str | None:
    if entry.token_count is None:
        return "no token_count logged"
    if len(data) != entry.token_count:
        return f"data holds {len(data)} tokens, token_count is {entry.token_count}"
    return None


def _text_after_eos_problem(data: np.ndarray, eos: int) -> str | None:
    positions = np.flatnonzero(data == eos)
    if len(positions) == 0:
        return None
    first_eos = int(positions[0])
    after = int(np.count_nonzero(data[first_eos + 1:] != eos))
    if after == 0:
        return None
    return f"EOS at position {first_eos} is followed by {after} more non-EOS tokens"
