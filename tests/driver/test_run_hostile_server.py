"""`wallperf run --endpoint` against a hostile server: the API key and the
endpoint's password never reach a file under --out or the run's stderr/stdout.

The server in this test echoes the request's Authorization header back in
every way a stream can fail: an error event in the stream, a malformed chunk,
an HTTP error body, and a stream cut short after the echo. The run is a real
`wallperf run` process with OPENAI_API_KEY in its environment and a password
in its endpoint URL; every byte it wrote is searched for both.
"""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-wallperf-hostile-0123456789abcdef"
PASSWORD = "pw-in-the-url-9876"


class _EchoingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        echo = f"you sent Authorization: {self.headers.get('Authorization')}; all headers: {dict(self.headers)}"
        kind = next(self.server.kinds)
        if kind == "http_error":
            body = json.dumps({"error": {"message": echo, "type": "server_error"}}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        events = {"stream_error": [json.dumps({"error": {"message": echo, "code": 401}})],
                  # A long prefix, so a reason cut to length would cut the key in half.
                  "malformed": ["{" + "x" * 180 + echo],
                  "cut_short": [json.dumps({"choices": [{"text": echo, "token_ids": [5]}]})]}[kind]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for event in events:
            self.wfile.write(f"data: {event}\n\n".encode())
        self.close_connection = True


def _cycle(kinds):
    lock, i = threading.Lock(), [0]

    class Cycle:
        def __next__(self):
            with lock:
                i[0] += 1
                return kinds[i[0] % len(kinds)]
    return Cycle()


@pytest.fixture
def hostile_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingHandler)
    server.daemon_threads = True
    server.kinds = _cycle(["stream_error", "malformed", "http_error", "cut_short"])
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    yield f"http://wallperf:{PASSWORD}@127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_no_key_on_disk_or_stderr(hostile_url, tmp_path):
    out = tmp_path / "out"
    # No retries: each request's one answer is its failure reason.
    run_yaml = tmp_path / "hostile.yaml"
    run_yaml.write_text(json.dumps({"model": "smollm2-135m", "hardware": "cpu", "dataset": "mmlu",
                                    "scenarios": ["SingleStream"], "backend": "openai",
                                    "openai": {"endpoints": [hostile_url], "model": "m", "retries": 0}}))
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "wallperf.cli", "run", "--config", str(run_yaml), "--duration", "1",
         "--max-samples", "4", "--output-tokens", "4", "--out", str(out), "--no-progress", "--wall-from-profile"],
        cwd=tmp_path, env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    results = json.loads((out / "results.json").read_text())
    reasons = [r for run in results["runs"] for r in run["client"]["failure_reasons"]]
    # The server did echo the key, in every way it can come back.
    assert any(r.startswith("error in stream:") for r in reasons), reasons
    assert any(r.startswith("malformed stream chunk:") for r in reasons), reasons
    assert any(r.startswith("HTTP 503:") for r in reasons), reasons
    assert all(not run["valid"] for run in results["runs"])
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {"results.json", "report.html", "report.md"} <= {p.name for p in written}
    for secret in (KEY, PASSWORD, KEY[:16]):
        for path in written:
            assert secret.encode() not in path.read_bytes(), f"{secret!r} written to {path}"
        assert secret.encode() not in proc.stderr + proc.stdout
    assert b"***" in (out / "results.json").read_bytes()
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o644 or path.suffix not in (".json", ".html", ".md"), path


# Not a word of the reports in any 8 characters of it (unlike "wallperf" in KEY).
CUT_KEY = "sk-cut-5f0e9d8c7b6a4321fedcba"


class _CuttingHandler(BaseHTTPRequestHandler):
    """401s that defeat a redaction done after the cut or over serialized JSON: the key
    padded to straddle the error body's cut (bare and upper-cased, a different offset
    each request), and a bearer token beside an escaped quote in a message that is an object."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        from wallperf.sut.backends.openai import MAX_ERROR_BODY

        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        n = next(self.server.count)
        if n % 3 == 0:
            body = (" " * (MAX_ERROR_BODY - len(CUT_KEY) + n % 17 - 8) + CUT_KEY).encode()
        elif n % 3 == 1:
            said = f"Incorrect API key provided: {CUT_KEY.upper()}"
            body = (" " * (MAX_ERROR_BODY - len(said) + n % 17 - 4) + said).encode()
        else:
            body = json.dumps({"error": {"message": {"detail": 'Authorization: Bearer tok-3141592653"\\',
                                                     "echo": CUT_KEY}}}).encode()
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_no_piece_of_a_key_cut_at_the_error_body_nor_of_an_odd_password(tmp_path):
    import itertools

    server = ThreadingHTTPServer(("127.0.0.1", 0), _CuttingHandler)
    server.daemon_threads = True
    server.count = itertools.count()
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    password, query_key = 'p@ss/w#rd?x"y z', "qk-2718281828459"
    url = f"http://zorro:{password}@127.0.0.1:{server.server_address[1]}/v1?api_key={query_key}"
    out = tmp_path / "out"
    run_yaml = tmp_path / "hostile.yaml"
    run_yaml.write_text(json.dumps({"model": "smollm2-135m", "hardware": "cpu", "dataset": "mmlu",
                                    "scenarios": ["SingleStream"], "backend": "openai",
                                    "openai": {"endpoints": [url], "model": "m", "retries": 0}}))
    env = {**os.environ, "OPENAI_API_KEY": CUT_KEY, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "wallperf.cli", "run", "--config", str(run_yaml), "--duration", "1",
             "--max-samples", "6", "--output-tokens", "4", "--out", str(out), "--no-progress", "--wall-from-profile"],
            cwd=tmp_path, env=env, capture_output=True, timeout=600)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    # Valid JSON, whatever the reasons held.
    results = json.loads((out / "results.json").read_text())
    reasons = [r for run in results["runs"] for r in run["client"]["failure_reasons"]]
    assert any("***" in r for r in reasons) and any("Bearer ***" in r for r in reasons), reasons
    assert results["config"]["run"]["openai"]["endpoints"] == [f"http://127.0.0.1:{server.server_address[1]}/v1"]
    # Pieces of the key of 8 characters or more, in any case, and the password's parts.
    pieces = {CUT_KEY[i:i + 8].lower() for i in range(len(CUT_KEY) - 7)}
    written = [p for p in out.rglob("*") if p.is_file()]
    for blob, where in [(p.read_bytes(), p) for p in written] + [(proc.stderr + proc.stdout, "stderr/stdout")]:
        low = blob.decode("utf-8", "replace").lower()
        assert not {f for f in pieces if f in low}, where
        for secret in ("p@ss", "w#rd", 'x"y z', "zorro", query_key, "tok-3141592653"):
            assert secret.lower() not in low, (secret, where)
