"""wallperf.sut.backends.openai against a server that misbehaves on purpose (a raw
socket in this test): what it echoes of the request's key never reaches the
backend's stats, a line without end cannot fill the memory, and every request
still ends (two placeholder tokens, a recorded failure)."""
import json
import socket
import threading
import time

import pytest

from wallperf.sut.backends.openai import MAX_LINE_BYTES, OpenAIBackend
from wallperf.sut.engine.engine import SamplingParams

KEY = "sk-hostile-backend-0123456789"


def serve_once_each(answer) -> str:
    """A server that reads each request whole and answers with `answer(request_head)`, then closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def loop():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            received = b""
            while b"\r\n\r\n" not in received:
                received += conn.recv(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            while len(body) < length:  # read whole: closing on unread data would reset the connection
                body += conn.recv(65536)
            try:
                conn.sendall(answer(head.decode("latin-1")))
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def finish_one(backend) -> list:
    backend.add_request(1, [5, 6, 7], SamplingParams(max_new_tokens=4))
    events, end = [], time.monotonic() + 60
    while not (events and events[-1].finished):
        assert time.monotonic() < end, "the request never finished"
        events += backend.step()
    return events


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def test_an_echoed_key_is_redacted_from_reasons_and_stats(key):
    def echo(head):
        event = json.dumps({"error": {"message": f"bad token in {head}"}})
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: " + event.encode() + b"\n\n"

    with OpenAIBackend([serve_once_each(echo)], "m", 1, timeout_s=10, retries=0) as backend:
        events = finish_one(backend)
        stats = backend.stats()
    assert [ev.index for ev in events] == [1, 2] and stats["failures"] == 1
    (reason,) = stats["failure_reasons"]
    assert reason.startswith("error in stream: bad token in POST") and "Bearer ***" in reason
    assert KEY not in json.dumps(stats)


def test_a_line_without_end_is_refused_at_its_cap():
    def endless(head):
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: " + b"x" * (2 * MAX_LINE_BYTES)

    with OpenAIBackend([serve_once_each(endless)], "m", 1, timeout_s=10, retries=0) as backend:
        finish_one(backend)
        stats = backend.stats()
    assert stats["failure_reasons"] == {f"a stream line longer than {MAX_LINE_BYTES} bytes": 1}
