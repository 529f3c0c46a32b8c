"""`--client-workers`: where the fixed-concurrency client's workers run, N local
processes or ray:N actors on a Ray cluster (Ray's import checked here, its
cluster reached when the pool is entered)."""
from __future__ import annotations

from wallperf.harness.config import ConfigError
from wallperf.driver.client_workers import LocalWorkers
from wallperf.driver.ray_workers import RayWorkers


def open_workers(text: str, ray_address: str | None = None):
    """The pool `--client-workers` names: N local processes, or ray:N actors on the Ray
    cluster at `ray_address` (else RAY_ADDRESS, else "auto"). A bad value, Ray missing,
    or no cluster reachable is a ConfigError (one line, exit 2)."""
    kind, _, count = text.rpartition(":")
    if kind not in ("", "ray") or not count.isdigit() or int(count) < 1:
        raise ConfigError(None, "--client-workers", f"{text!r}: expected a positive number of local processes, "
                          "or ray:N for N workers on a Ray cluster")
    if kind == "ray":
        return RayWorkers(int(count), ray_address)
    return LocalWorkers(int(count))
