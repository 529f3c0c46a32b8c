"""The fixed-concurrency client (wallperf.driver.client_workers) against two
`wallperf serve` replicas of a tiny model on loopback, a replica that refuses
every connection, and a client slowed on purpose.

The references: the length every answer must have (fixed, EOS ignored), the
records of every worker counted apart from the per-replica table, a port that
refuses connections (so every request sent there must fail, and no other), and
a sleep in the send path whose length the measured send lag must show, and the
rules' count (a whole multiple of the data set's size) counted from the records."""
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sut" / "serving"))
from test_server import prompt_of, tiny_loaded_model  # noqa: E402

from wallperf.audit.endpoints import point_figures  # noqa: E402
from wallperf.driver.client_workers import Load, run_point, split_users, worker_rows  # noqa: E402
from wallperf.driver.workers_arg import open_workers  # noqa: E402
from wallperf.driver.concurrency_points import count_check  # noqa: E402
from wallperf.harness.config import ConfigError  # noqa: E402
from wallperf.sut.serving.server import start_server  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKENS = 6


@pytest.fixture(scope="module")
def replicas():
    """Two `wallperf serve` replicas (each with its own counter of answered requests)."""
    loaded = tiny_loaded_model()[0]
    servers, urls, stops = [], [], []
    for _ in range(2):
        server, url, stop = start_server(loaded, "127.0.0.1", 0, max_batch=4, max_seq_len=128, model_name="tiny")
        servers.append(server)
        urls.append(url)
        stops.append(stop)
    yield urls
    for stop in stops:
        stop()


def dead_url() -> str:
    """A loopback port nobody listens on: every connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def load_of(urls) -> Load:
    prompts = tuple(tuple(prompt_of(3 + i, seed=i)) for i in range(5))
    return Load(tuple(urls), "tiny", prompts, (TOKENS,) * 5, (TOKENS,) * 5, ignore_eos=True, timeout_s=30)


def figures(results, target, lag_limit_ms):
    reqs = [r for w in results for r in w.requests]
    lags = [x for w in results for x in w.loop_lag_s]
    return point_figures(reqs, results[0].window, target, loop_lags_s=lags, lag_limit_ms=lag_limit_ms)


def test_users_split_over_workers():
    assert split_users(7, 3) == [3, 2, 2]
    assert split_users(2, 4) == [1, 1]


def test_two_replicas_share_the_load_and_the_client_kept_up(replicas):
    results = run_point(load_of(replicas), concurrency=4, workers=2, warmup_s=0.5, window_s=3.0)
    # The lag limit is wide: two cores shared with the servers and whatever else runs.
    p = figures(results, 4, lag_limit_ms=50.0)
    per = p["replicas"]
    assert set(per) == set(replicas)
    assert sum(r["requests"] for r in per.values()) == p["requests"] == sum(len(w.requests) for w in results)
    assert all(r["completed"] > 0 and r["failures"] == 0 for r in per.values())
    done = [r for w in results for r in w.requests if not r.get("cut_at_window_end")]
    assert all(r["tokens"] == TOKENS for r in done)
    assert p["client"]["achieved_concurrency"] >= 0.98 * 4, p["client"]
    assert p["valid"], p["invalid_reasons"]


def test_a_failing_replica_is_counted_failed_never_retried_elsewhere(replicas):
    dead = dead_url()
    results = run_point(load_of([replicas[0], dead]), concurrency=2, workers=1, warmup_s=0.2, window_s=1.5)
    p = figures(results, 2, lag_limit_ms=50.0)
    bad, good = p["replicas"][dead], p["replicas"][replicas[0]]
    assert bad["failures"] == bad["requests"] > 0 and bad["completed"] == 0
    assert "ConnectionRefusedError" in bad["failure_reasons"][0]
    assert good["failures"] == 0 and good["completed"] > 0
    # No request answered by the good replica was first sent to the dead one: each record has one replica.
    assert p["failures"] == bad["requests"]
    assert not p["valid"] and p["invalid_reasons"][0].startswith(f"{bad['requests']} requests failed")


def test_a_client_slowed_on_purpose_is_flagged_with_its_lag(replicas):
    results = run_point(load_of(replicas[:1]), concurrency=2, workers=1, warmup_s=0.2, window_s=2.0,
                        send_delay_s=0.05)
    p = figures(results, 2, lag_limit_ms=20.0)
    assert not p["valid"]
    assert p["client"]["send_lag_ms"]["p50"] >= 50.0
    assert any("sent late" in r for r in p["invalid_reasons"])


def test_issued_samples_are_whole_passes_and_all_answered(replicas):
    """The rules' count: each worker issues from the window's start until its count is a
    multiple of the data set's size (5 prompts), past the window if need be, and waits
    for those answers: none cut, every one of them TOKENS long."""
    results = run_point(load_of(replicas), concurrency=3, workers=2, warmup_s=0.3, window_s=1.0,
                        issue_multiple=5)
    for w in results:
        counted = [r for r in w.requests if r["counted"]]
        assert w.issued == len(counted) and w.issued % 5 == 0 and w.issued >= 5
        assert all(r["error"] is None and not r.get("cut_at_window_end") and r["tokens"] == TOKENS
                   for r in counted)
        # Counted ones were sent from the window's start on; rounded up, never further: less than
        # one more pass went out after the window.
        assert all(r["sent"] >= w.window[0] for r in counted)
        assert sum(r["sent"] >= w.window[1] for r in counted) < 5
    records = [r for w in results for r in w.requests]
    c = count_check(records, results[0].window, dataset_size=5)
    assert c["reasons"] == [] and c["issued"] % 5 == 0 and c["completed"] == c["issued"]
    rows = worker_rows(results, lag_limit_ms=50.0)
    assert [r["users"] for r in rows] == [2, 1] and sum(r["issued"] for r in rows) == c["issued"]


def test_bad_client_workers_are_refused_in_one_line():
    for text in ("0", "two", "ray:", "ray:0", "k8s:2", "-1"):
        with pytest.raises(ConfigError, match="--client-workers"):
            open_workers(text)
    assert open_workers("3").count == 3


def test_a_pass_longer_than_the_window_and_a_timeout_is_not_cut(replicas):
    """One user, a 0.2 s window, a 0.3 s request timeout and a 100 ms pause before each send:
    the pass of 12 takes over 1.2 s from the window's start, longer than a window and a timeout; the
    default tail leaves room for it, so all 12 are issued and answered."""
    import dataclasses

    load = dataclasses.replace(load_of(replicas[:1]), timeout_s=0.3)
    results = run_point(load, concurrency=1, workers=1, warmup_s=0.1, window_s=0.2, send_delay_s=0.1,
                        issue_multiple=12)
    reqs = [r for w in results for r in w.requests]
    c = count_check(reqs, results[0].window, dataset_size=12)
    assert (c["issued"], c["completed"], c["reasons"]) == (12, 12, [])
