"""What the command line adds to a run YAML: where results go and how the run is driven."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wallperf.harness.hardware.wall import Wall


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path
    user_conf: Path | None = None
    progress: bool = True
    # Server/Interactive: bisect target QPS for the highest VALID load.
    find_peak: bool = False
    peak_range: tuple = (0.1, 10.0)
    peak_tolerance: float = 0.1
    peak_max_runs: int = 8
    # Choose the performance tests' load settings from a short run on this machine (wallperf.driver.calibrate).
    calibrate: bool = False
    # Take the hardware profile's figures as written instead of measuring this machine.
    wall_from_profile: bool = False
    # The figures the run is set against, once the run has resolved them or was given them
    # (harness.hardware.wall; `wallperf sweep` gives every point its one measurement).
    wall: Wall | None = None
    # The MLPerf submission checker version whose rules judge submission_valid.
    checker_version: str = "v6.1"
    # --submission: mlperf.conf + user.conf, EOS-stopped outputs, the benchmark's
    # sample counts and scenarios, and the compliance tests the checker requires.
    submission: bool = False
