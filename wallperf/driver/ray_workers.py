"""`--client-workers ray:N`: the fixed-concurrency client's workers as actors on an
existing Ray cluster, for when one client machine cannot send the load (its
`wallperf bench client` capacity says so).

Each actor runs the same `run_worker` as a local worker process, so everything
the local workers promise holds here too:
- each worker times its own requests on its own monotonic clock, so TTFT and
  TPOT need no clock shared between machines;
- the start is agreed: the driver sends every actor one wall-clock instant, a
  lead time ahead; each actor turns it into its own monotonic time and measures
  the warm-up and the window from there, reporting times relative to it. Wall
  clocks that disagree (NTP keeps them within milliseconds) shift a worker's
  window by that much against the others', nothing more;
- the results come back per worker and merge into the point's one record
  (requests, loop lags, counts) with the same self-check.

The actors are placed one a CPU, spread over the nodes, and reused for every
point of a sweep. Every node needs the same wallperf version installed; an
actor reports its own, and a mismatch is refused before any load is sent.
Ray is an optional extra (`pip install -c constraints.txt 'wallperf[ray]'`).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict

from wallperf.harness.config import ConfigError
from wallperf.harness.loadgen.results import wallperf_version
from wallperf.driver.client_workers import (READY_TIMEOUT_S, Load, WorkerResult, WorkerSpec, results_timeout_s,
                                            run_worker)

# How long a host:port address may take to accept a connection: Ray's own client waits
# half a minute or more on an address nobody answers, then may end the process.
CONNECT_TIMEOUT_S = 5.0
# Lead time between sending the agreed start and the start itself: an actor call crosses the network.
RAY_START_LEAD_S = 1.0


class _ClientActor:
    """One client worker on a node of the cluster."""

    def ready(self) -> str:
        return wallperf_version()

    def run(self, load: Load, spec: WorkerSpec, start_wall: float) -> dict:
        return asdict(run_worker(load, spec, start_wall))


def _unreachable(address: str) -> str | None:
    """Why a host:port address takes no connection, or None (also for "auto" and other forms
    Ray resolves itself)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in host:
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class RayWorkers:
    """N client workers as actors on the Ray cluster at `address` (else RAY_ADDRESS, else "auto")."""

    kind = "ray"

    def __init__(self, count: int, address: str | None = None):
        self.count = count
        self.address = address or os.environ.get("RAY_ADDRESS") or "auto"
        self.actors: list = []
        self._connected_here = False
        try:
            import ray
        except ImportError:
            raise ConfigError(None, "--client-workers", f"'ray:{count}': Ray is not installed; install the extra "
                              "(pip install -c constraints.txt 'wallperf[ray]') or give a number of local "
                              "processes") from None
        self._ray = ray

    def __enter__(self) -> "RayWorkers":
        ray = self._ray
        if not ray.is_initialized():
            why = _unreachable(self.address)
            if why:
                raise ConfigError(None, "--ray-address", f"{self.address!r}: no Ray cluster reachable ({why}); "
                                  "start one (ray start --head) or give its address")
            try:
                ray.init(address=self.address, logging_level=logging.ERROR, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(None, "--ray-address", f"{self.address!r}: no Ray cluster reachable "
                                  f"({_first_line(e)}); start one (ray start --head) or give its address") from None
            self._connected_here = True
        try:
            self._start_actors()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_actors(self) -> None:
        ray = self._ray
        actor = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_ClientActor)
        self.actors = [actor.remote() for _ in range(self.count)]
        try:
            versions = ray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            cpus = ray.cluster_resources().get("CPU", 0)
            raise ConfigError(None, "--client-workers", f"'ray:{self.count}': the cluster at {self.address} did not "
                              f"start {self.count} client workers within {READY_TIMEOUT_S:g} s (each takes one CPU; "
                              f"the cluster has {cpus:g})") from None
        except ray.exceptions.RayError as e:
            raise ConfigError(None, "--client-workers", f"'ray:{self.count}': a client worker failed to start on "
                              f"the cluster: {_first_line(e)}") from None
        mine = wallperf_version()
        if any(v != mine for v in versions):
            raise ConfigError(None, "--client-workers", f"'ray:{self.count}': the cluster's nodes run wallperf "
                              f"{sorted(set(versions))}, this machine {mine}; install the same version on every node")

    def __exit__(self, *exc) -> None:
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
        if self._connected_here:
            self._ray.shutdown()
            self._connected_here = False

    def describe(self) -> dict:
        return {"kind": self.kind, "workers": self.count, "address": self.address}

    def run(self, load: Load, specs: list[WorkerSpec]) -> list[WorkerResult]:
        """One point: spec i on actor i, all from one agreed start."""
        ray = self._ray
        start_wall = time.time() + RAY_START_LEAD_S
        refs = [a.run.remote(load, spec, start_wall) for a, spec in zip(self.actors, specs)]
        try:
            payloads = ray.get(refs, timeout=RAY_START_LEAD_S + results_timeout_s(specs, load.timeout_s))
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError("a Ray client worker did not report its results") from None
        except ray.exceptions.RayError as e:
            raise RuntimeError(f"a Ray client worker failed: {_first_line(e)}") from None
        return [WorkerResult(**p) for p in payloads]
