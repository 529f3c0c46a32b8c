"""`wallperf run` flags that override the scenario's LoadGen settings."""
import pytest

import wallperf.driver.run
from wallperf.cli import main


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_run(resolved, opts):
        seen["resolved"], seen["opts"] = resolved, opts
        return {"wall_time_s": 0.0}

    monkeypatch.setattr(wallperf.driver.run, "run_benchmark", fake_run)
    return seen


def test_min_queries_and_duration_override_the_server_scenario(captured, tmp_path):
    assert main(["run", "--scenario", "Server", "--mode", "performance", "--min-queries", "480",
                 "--duration", "10", "--find-peak", "--out", str(tmp_path / "out")]) == 0
    (sc,) = captured["resolved"].scenarios
    assert (sc.name, sc.min_query_count, sc.min_duration_s) == ("Server", 480, 10.0)
    assert captured["opts"].find_peak


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_min_queries_must_be_a_positive_integer(captured, tmp_path, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--min-queries", value, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--min-queries" in capsys.readouterr().err
    assert "resolved" not in captured
