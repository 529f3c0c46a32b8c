"""Killing the server under `wallperf run --endpoint`: the run ends in bounded
time, is INVALID with the failures' reasons, and keeps LoadGen's logs.

Both sides are real processes. The run reaches `wallperf serve` through a relay
in this test, which sees the first streamed token pass; then the relay stops
listening and the server is killed with SIGKILL, so it says no goodbye to its
clients. The requests mid-stream break, those issued later are refused, and the
run must still finish its LoadGen test and write every record.
"""
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from wallperf.harness.loadgen.logs import read_detail_log

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# The kill comes at the first streamed token, about a second into the test: the rest of
# min_duration at TARGET_QPS leaves ~20 Poisson arrivals for the dead server to refuse.
DURATION_S = 6
TARGET_QPS = 4
# Loading SmolLM2 (server) and its tokenizer and MMLU (run) on a loaded 2-core machine.
START_S = 300
# After the kill the run has the rest of its min_duration to issue (every request now
# fails within a second) and its records and reports to write.
END_AFTER_KILL_S = DURATION_S + 60
# What a request to a dead server fails with: refused, reset, or a stream cut short.
TRANSPORT_FAILURE = re.compile(r"Connection refused|ConnectionReset|stream ended without \[DONE\]|"
                               r"RemoteDisconnected|BrokenPipe")


class Relay:
    """A loopback TCP relay to the server that notes when the first token event passes.
    After `stop_listening()` its port refuses connections, as a dead server's does; open
    connections end when the server's side does."""

    def __init__(self, server_port: int):
        self.server_port = server_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.first_token = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def stop_listening(self) -> None:
        # shutdown wakes the thread blocked in accept(); close alone would not on Linux.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.server_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.first_token), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, seen: threading.Event | None) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if seen is not None and b'"token_ids": [' in data:
                    seen.set()
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def wallperf(args, log: Path) -> subprocess.Popen:
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "-m", "wallperf.cli", *args], cwd=REPO, stdout=out, stderr=err)


def wait_for(what: str, condition, timeout_s: float, *alive: subprocess.Popen):
    """Poll `condition` until it returns something true; fail if a process in `alive` exits first."""
    end = time.monotonic() + timeout_s
    while not (value := condition()):
        for proc in alive:
            if proc.poll() is not None:
                pytest.fail(f"waiting for {what}: {proc.args[3]} exited with {proc.returncode}")
        if time.monotonic() > end:
            pytest.fail(f"waiting for {what}: not within {timeout_s} s")
        time.sleep(0.05)
    return value


def test_killed_server_ends_the_run_invalid_with_its_logs(tmp_path):
    server = wallperf(["serve", "--port", "0", "--max-batch", "4"], tmp_path / "serve")
    run = relay = None
    try:
        port = wait_for("the server to listen", lambda: re.search(
            r"at http://127\.0\.0\.1:(\d+)/v1", (tmp_path / "serve.err").read_text()), START_S, server)
        relay = Relay(int(port[1]))
        out = tmp_path / "out"
        run = wallperf(["run", "--endpoint", relay.url, "--scenario", "Server", "--mode", "performance",
                        "--duration", str(DURATION_S), "--target-qps", str(TARGET_QPS), "--max-samples", "8",
                        "--output-tokens", "64", "--max-batch", "4", "--out", str(out), "--no-progress"],
                       tmp_path / "run")
        wait_for("the first streamed token", relay.first_token.is_set, START_S, run, server)
        relay.stop_listening()
        server.kill()
        server.wait()
        try:
            rc = run.wait(END_AFTER_KILL_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not end within {END_AFTER_KILL_S} s of the server's death")
    finally:
        for proc in (server, run):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if relay is not None:
            relay.stop_listening()

    stderr = (tmp_path / "run.err").read_text()
    # An INVALID result is still a result: the run itself succeeded.
    assert rc == 0, stderr
    printed = json.loads((tmp_path / "run.out").read_text().splitlines()[-1])
    assert printed["results"] == str(out / "results.json")
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    (record,) = results["runs"]
    client = record["client"]
    assert record["valid"] is False and record["submission_valid"] is False
    assert client["failures"] >= 1 and client["completed"] + client["failures"] == client["requests"]
    # The first reason counts the failures and names each kind, e.g. "Connection refused (x25)".
    first = record["invalid_reasons"][0]
    assert first.startswith(f"{client['failures']} of {client['requests']} requests failed: "), first
    for reason, n in client["failure_reasons"].items():
        assert TRANSPORT_FAILURE.search(reason), reason
        assert f"{reason} (x{n})" in first
    # The streams the kill cut (LoadGen had their first token: no retry), and the
    # requests after it, which found nobody listening.
    assert any("stream ended without [DONE]" in reason for reason in client["failure_reasons"]), first
    assert any("Connection refused" in reason for reason in client["failure_reasons"]), first
    assert "INVALID" in stderr and "requests failed" in stderr

    log_dir = Path(record["log_dir"])
    assert log_dir == next(out.glob("*/*/Server/performance/run_1"))
    summary = (log_dir / "mlperf_log_summary.txt").read_text()
    assert "Scenario : Server" in summary and "Result is :" in summary
    # LoadGen finished its detail log: the verdict it writes last is there.
    assert read_detail_log(log_dir / "mlperf_log_detail.txt").get("result_validity") in ("VALID", "INVALID")
