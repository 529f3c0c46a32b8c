"""`wallperf bench client --client workers`: the fixed-concurrency client against the
instant mock. The references: every answer is --output-tokens chunks long, so the
chunks streamed per second must be that many times the requests per second (up to
the window's edges); the capacity is the best level within the lag limit."""
import json

import pytest

from wallperf.bench.client import main


def test_workers_capacity_is_consistent(capsys):
    rc = main(["--client", "workers", "--concurrency", "1,2", "--seconds", "1.5", "--output-tokens", "8",
               "--prompt-tokens", "16", "--lag-ms", "1000", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    levels = out["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["failures"] == 0 and lv["requests_per_second"] > 0
        assert lv["chunks_per_second"] == pytest.approx(8 * lv["requests_per_second"], rel=0.25)
    assert out["capacity"] == max(levels, key=lambda lv: lv["requests_per_second"])
