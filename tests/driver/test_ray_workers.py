"""`--client-workers ray:N` (wallperf.driver.ray_workers) on a local Ray cluster: a
head and two worker nodes of one CPU each on this machine, torn down even when a
test fails. (Ray always reaches its nodes at the machine's own address, never at
127.0.0.1: it resolves a loopback address to that one.)

The reference is the local client worker processes, run on the same point against
the same instant streaming mock of `wallperf bench client`: the Ray actors must give
the same figures within noise (requests/s, chunks/s, held concurrency), every answer
its fixed length, one row per worker, and the rules' count (whole passes) as the
local workers keep it. The refusals (Ray missing, no cluster at the address) need
no cluster."""
import sys

import pytest

from wallperf.audit.endpoints import point_figures
from wallperf.bench.client import MOCK_MODEL, start_mock_server
from wallperf.driver.client_workers import Load, LocalWorkers, worker_rows, worker_specs
from wallperf.driver.workers_arg import open_workers
from wallperf.harness.config import ConfigError

TOKENS = 8
# Ray's object store, per node: the results are small, and the machine is shared.
OBJECT_STORE_BYTES = 100 * 2**20


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and two worker nodes on this machine, one CPU each: the cluster's address."""
    pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def mock_url():
    _, url, stop = start_mock_server()
    yield url
    stop()


def figures(results, concurrency: int) -> dict:
    window = results[0].window
    reqs = [r for w in results for r in w.requests]
    p = point_figures(reqs, window, concurrency, loop_lags_s=[x for w in results for x in w.loop_lag_s])
    answered = [r for r in reqs if r["error"] is None and not r.get("cut_at_window_end")]
    assert answered and all(r["tokens"] == TOKENS for r in answered)
    done_in_window = [r for r in answered if window[0] <= r["done"] < window[1]]
    return {**p, "requests_per_second": len(done_in_window) / (window[1] - window[0])}


@pytest.mark.slow
def test_ray_workers_give_the_local_workers_figures(ray_cluster, mock_url):
    load = Load((mock_url,), MOCK_MODEL, (tuple(range(16)),), (TOKENS,), (TOKENS,), ignore_eos=True, timeout_s=10)
    specs = worker_specs(4, 2, warmup_s=0.5, window_s=2.0, timeout_s=load.timeout_s)
    with open_workers("ray:2", ray_cluster) as workers:
        assert workers.describe() == {"kind": "ray", "workers": 2, "address": ray_cluster}
        on_ray = workers.run(load, specs)
    local = LocalWorkers(2).run(load, specs)
    got = {name: figures(results, 4) for name, results in (("ray", on_ray), ("local", local))}
    for name, p in got.items():
        assert p["failures"] == 0, (name, p["invalid_reasons"])
        # One chunk a token: chunks/s is TOKENS times requests/s, up to the window's edges.
        assert p["system_tokens_per_second"] == pytest.approx(TOKENS * p["requests_per_second"], rel=0.25)
    # The same figures within noise: the mock costs next to nothing, so the client sets the pace. Against
    # an instant server even the held concurrency is the client's: the turn from one answer to the next
    # request is a sizeable share of a request's time, on Ray as locally.
    for figure in ("requests_per_second", "system_tokens_per_second"):
        assert 0.5 < got["ray"][figure] / got["local"][figure] < 2.0, (figure, got)
    held = [got[k]["client"]["achieved_concurrency"] for k in ("ray", "local")]
    assert held[0] == pytest.approx(held[1], rel=0.25) and min(held) > 2, held
    rows = worker_rows(on_ray, lag_limit_ms=1000.0)
    assert [r["worker"] for r in rows] == [0, 1] and [r["users"] for r in rows] == [2, 2]
    assert sum(r["requests"] for r in rows) == got["ray"]["requests"]


@pytest.mark.slow
def test_ray_workers_issue_whole_passes(ray_cluster, mock_url):
    prompts = tuple(tuple(range(4 + i)) for i in range(7))
    load = Load((mock_url,), MOCK_MODEL, prompts, (TOKENS,) * 7, (TOKENS,) * 7, ignore_eos=True, timeout_s=10)
    with open_workers("ray:2", ray_cluster) as workers:
        results = workers.run(load, worker_specs(3, 2, warmup_s=0.2, window_s=0.5, issue_multiple=7,
                                                 timeout_s=load.timeout_s))
    for w in results:
        counted = [r for r in w.requests if r["counted"]]
        assert w.issued == len(counted) and w.issued % 7 == 0 and w.issued >= 7
        assert all(r["error"] is None and not r.get("cut_at_window_end") for r in counted)


def test_no_cluster_at_the_address_is_one_clear_line():
    pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    with pytest.raises(ConfigError, match=r"--ray-address.*'127\.0\.0\.1:9': no Ray cluster reachable"):
        with open_workers("ray:2", "127.0.0.1:9"):
            pass


def test_ray_missing_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"--client-workers.*Ray is not installed.*wallperf\[ray\]"):
        open_workers("ray:2")
