"""The highest Server target QPS that LoadGen judges VALID, found by bisection.

`run_one(qps)` runs one LoadGen Server performance test at that target QPS and
returns its result record (harness.loadgen.results: "valid", "invalid_reasons",
"metrics"). The search assumes validity falls off once with load: the lowest
rate must be VALID, then the highest is tried, then the midpoint of the
bracket (highest VALID, lowest INVALID) until the bracket is narrower than the
tolerance or the runs are spent. Every point is kept, and the peak reported is
the highest rate that actually ran VALID. Validity is noisy near the edge: one
unlucky INVALID run closes the bracket below it, so noise can only make the
peak low, never high; a peak meant for publication is rerun at its rate.

Logs of each try go under performance/find_peak/qps_<x>/ (see `try_log_dir`);
this module runs nothing itself and is pure logic.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class PeakPoint:
    """One LoadGen run of the search, as its result record reported it."""

    qps: float
    valid: bool
    tokens_per_second: float | None
    ttft_p99_ms: float | None
    tpot_p99_ms: float | None
    reasons: tuple[str, ...]
    log_dir: str | None = None

    @classmethod
    def from_record(cls, qps: float, record: dict) -> "PeakPoint":
        metrics = record.get("metrics") or {}

        def p99(name):
            return (metrics.get(name) or {}).get("p99")

        # LoadGen's verdict only: a record without one (None) counts as not VALID.
        return cls(qps=qps, valid=record.get("valid") is True,
                   tokens_per_second=metrics.get("tokens_per_second"), ttft_p99_ms=p99("ttft_ms"),
                   tpot_p99_ms=p99("tpot_ms"), reasons=tuple(record.get("invalid_reasons") or ()),
                   log_dir=record.get("log_dir"))


@dataclass(frozen=True)
class PeakResult:
    # The highest target QPS that ran VALID; None when none did.
    peak_qps: float | None
    # In the order they were run.
    points: tuple[PeakPoint, ...]
    # Highest VALID and lowest INVALID rate of the final bracket (None where not found).
    bracket: tuple[float | None, float | None]
    stop_reason: str

    @property
    def peak(self) -> PeakPoint | None:
        return max((p for p in self.points if p.valid), key=lambda p: p.qps, default=None)

    def curve(self) -> list[PeakPoint]:
        """The points by rising QPS."""
        return sorted(self.points, key=lambda p: p.qps)

    def to_dict(self) -> dict:
        peak = self.peak
        return {"peak_qps": self.peak_qps,
                "peak_tokens_per_second": peak.tokens_per_second if peak else None,
                "bracket": list(self.bracket), "stop_reason": self.stop_reason,
                "runs": len(self.points),
                "curve": [{**asdict(p), "reasons": list(p.reasons)} for p in self.curve()]}


def find_peak(run_one: Callable[[float], dict], lo: float, hi: float, tolerance: float,
              max_runs: int) -> PeakResult:
    """Bisect target QPS in [lo, hi] to within `tolerance` QPS, running LoadGen at most `max_runs` times."""
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo} hi={hi}")
    if tolerance <= 0 or max_runs < 1:
        raise ValueError(f"need tolerance > 0 and max_runs >= 1, got {tolerance} and {max_runs}")
    points: list[PeakPoint] = []

    def run(qps: float) -> bool:
        points.append(PeakPoint.from_record(qps, run_one(qps)))
        return points[-1].valid

    def result(good, bad, reason) -> PeakResult:
        valid = [p.qps for p in points if p.valid]
        return PeakResult(max(valid, default=None), tuple(points), (good, bad), reason)

    if not run(lo):
        return result(None, lo, f"INVALID at the lowest rate {lo:g} QPS: the peak is below it")
    if max_runs == 1:
        return result(lo, None, "max_runs reached")
    if run(hi):
        return result(hi, None, f"VALID at the highest rate {hi:g} QPS: the peak is at or above it")
    good, bad = lo, hi
    while bad - good > tolerance:
        if len(points) >= max_runs:
            return result(good, bad, "max_runs reached")
        mid = (good + bad) / 2
        if run(mid):
            good = mid
        else:
            bad = mid
    return result(good, bad, f"converged to within {tolerance:g} QPS")


def qps_label(qps: float) -> str:
    """A QPS as a folder name: short, and distinct for any tolerance above 1e-6 relative."""
    return f"qps_{qps:.7g}"


def try_log_dir(performance_dir: Path, qps: float) -> Path:
    """Where the LoadGen logs of one try go: <scenario>/performance/find_peak/qps_<x>/."""
    return Path(performance_dir) / "find_peak" / qps_label(qps)


def format_curve(result: PeakResult) -> str:
    """The curve as lines for the terminal."""
    lines = []
    for p in result.curve():
        figures = [f"{p.qps:>9.4g} QPS", "VALID  " if p.valid else "INVALID"]
        if p.tokens_per_second is not None:
            figures.append(f"{p.tokens_per_second:.1f} tok/s")
        for name, value in (("TTFT", p.ttft_p99_ms), ("TPOT", p.tpot_p99_ms)):
            if value is not None:
                figures.append(f"{name} p99 {value:.0f} ms")
        if p.reasons:
            figures.append(f"({'; '.join(p.reasons)})")
        lines.append("  ".join(figures))
    peak = f"{result.peak_qps:g} QPS" if result.peak_qps is not None else "none VALID"
    lines.append(f"peak: {peak} ({result.stop_reason})")
    return "\n".join(lines)
