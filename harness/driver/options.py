"""What the command line adds to a run YAML: where results go and how the run is driven."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
