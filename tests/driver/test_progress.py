"""The heartbeat a long step prints while it runs (the calibration's parts), on a stream."""
import io
import time

from wallperf.driver.progress import Heartbeat


def test_heartbeat_says_the_step_still_runs_and_stops_when_it_ends():
    stream = io.StringIO()
    with Heartbeat("calibrating 2/4", interval_s=0.05, stream=stream):
        time.sleep(0.28)
    lines = stream.getvalue().splitlines()
    assert 1 <= len(lines) <= 6
    assert all(line.startswith("wallperf: calibrating 2/4: still running, ") and line.endswith(" s")
               for line in lines)
    time.sleep(0.15)
    assert stream.getvalue().splitlines() == lines  # nothing after the step ended


def test_a_short_step_prints_nothing():
    stream = io.StringIO()
    with Heartbeat("calibrating 1/4", interval_s=10.0, stream=stream):
        pass
    assert stream.getvalue() == ""
