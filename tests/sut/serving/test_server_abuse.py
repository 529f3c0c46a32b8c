"""`wallperf serve` (sut.server) under a hostile but fair client, over real sockets.

The model is a tiny synthetic Llama behind SmolLM2's own tokenizer (real
vocabulary, so text prompts and the character bound are realistic). What is
checked is the server's behaviour, each against what the client can observe
or the engine's own counters: half-open connections are closed after the read
timeout while a valid request is answered, a request trickled a byte at a time
is cut off at the request deadline, a client that disconnects stops
its sequence (the engine decodes far fewer tokens than it asked for, and its
blocks are free again), every refusal is an OpenAI-shaped JSON error.
"""
import http.client
import json
import logging
import select
import socket
import threading
import time

import pytest

from wallperf.sut.serving.http_limits import ServerLimits
from wallperf.sut.loading.load import load_synthetic, load_tokenizer
from wallperf.sut.models.llama import LlamaConfig
from wallperf.sut.serving.server import start_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Long enough that an abandoned request decoding to its end is unmistakable in the counters.
LONG = 1800
READ_TIMEOUT_S = 1.0
# The whole request's deadline in the trickle tests: three read timeouts.
REQUEST_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def tiny(smollm2_gguf_path):
    tokenizer = load_tokenizer(smollm2_gguf_path)
    cfg = LlamaConfig(n_layers=4, hidden_size=128, n_heads=4, n_kv_heads=2, ffn_size=256,
                      vocab_size=tokenizer.vocab_size, max_position=2048)
    return load_synthetic(cfg, tokenizer, "float32")


@pytest.fixture
def serve(tiny):
    stops = []

    def start(max_batch=1, host="127.0.0.1", **limits):
        limits.setdefault("read_timeout_s", READ_TIMEOUT_S)
        server, _, stop = start_server(tiny, host, 0, max_batch=max_batch, max_seq_len=2048, model_name="tiny",
                                       limits=ServerLimits(**limits))
        stops.append(stop)
        return server, server.server_address[1]

    yield start
    for stop in stops:
        stop()


def request(port, method="POST", path="/v1/completions", body=None, headers=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None


def assert_openai_error(status, body, expected_status):
    assert status == expected_status, body
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert body["error"]["code"] == expected_status and body["error"]["message"]


def wait_until(condition, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.02)


def test_half_open_connections_are_closed_while_a_valid_request_is_answered(serve):
    server, port = serve(max_connections=400)
    half_open = []
    for i in range(300):
        s = socket.create_connection(("127.0.0.1", port))
        # Half the requests stop inside their headers, half inside their body.
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 else
                  b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        half_open.append(s)
    opened = time.monotonic()
    status, _, body = request(port, body={"prompt": "Hello", "max_tokens": 2})
    answered_s = time.monotonic() - opened
    assert status == 200 and len(body["choices"][0]["token_ids"]) == 2
    print(f"valid request answered in {answered_s:.2f} s beside 300 half-open connections")
    for s in half_open:
        s.settimeout(READ_TIMEOUT_S + 30)
        try:
            assert s.recv(1024) == b""  # closed by the server, nothing sent
        except ConnectionResetError:
            pass
        s.close()
    closed_s = time.monotonic() - opened
    print(f"all 300 closed by the server {closed_s:.2f} s after they opened (read timeout {READ_TIMEOUT_S} s)")
    wait_until(lambda: server.open_connections == 0, 10, "the server still counts connections it has closed")


def _completion_bytes(prompt: str) -> bytes:
    body = json.dumps({"prompt": prompt, "max_tokens": 2}).encode()
    return b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def _read_response(s: socket.socket) -> tuple[int, dict]:
    """One response with a Content-Length, off a raw socket: (status, JSON body)."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = s.recv(4096)
        assert chunk, f"the server closed the connection mid-response: {raw!r}"
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(4096)
    return int(head.split()[1]), json.loads(body)


def test_a_trickled_request_is_cut_off_at_the_request_deadline(serve):
    server, port = serve(request_timeout_s=REQUEST_TIMEOUT_S)
    trickle = _completion_bytes("Hello " * 50)
    s = socket.create_connection(("127.0.0.1", port))
    started, answered = time.monotonic(), []
    helper = threading.Thread(target=lambda: answered.append(
        (request(port, body={"prompt": "Hello", "max_tokens": 2})[0], time.monotonic() - started)))
    received, sent = b"", 0
    # A byte every half read timeout: each read is answered in time, the request never ends.
    while time.monotonic() - started < REQUEST_TIMEOUT_S + 10:
        try:
            s.send(trickle[sent:sent + 1])
            sent += 1
        except (BrokenPipeError, ConnectionResetError):
            break
        if sent == 2:
            helper.start()
        if select.select([s], [], [], READ_TIMEOUT_S / 2)[0]:
            s.settimeout(5)
            while chunk := s.recv(4096):
                received += chunk
            break
    closed_s = time.monotonic() - started
    s.close()
    helper.join(30)
    print(f"a request trickled a byte every {READ_TIMEOUT_S / 2} s: {sent} bytes sent, closed after {closed_s:.2f} s "
          f"(deadline {REQUEST_TIMEOUT_S} s)")
    assert REQUEST_TIMEOUT_S - 0.1 <= closed_s <= REQUEST_TIMEOUT_S + READ_TIMEOUT_S + 2, received
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), received
    assert_openai_error(408, json.loads(body), 408)
    (status, answered_s), = answered
    assert status == 200 and answered_s < closed_s, answered
    wait_until(lambda: server.open_connections == 0, 10, "the server still counts the connection it closed")


def test_requests_sent_in_pieces_within_the_deadline_are_answered(serve):
    """The deadline counts from each request's first byte: a keep-alive connection
    carries requests past it in total, and pauses shorter than the read timeout."""
    _, port = serve(request_timeout_s=REQUEST_TIMEOUT_S)
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(30)
    started = time.monotonic()
    for prompt in ("Hello", "Hi there"):
        data = _completion_bytes(prompt)
        for piece in (data[:20], data[20:-5], data[-5:]):
            s.sendall(piece)
            time.sleep(READ_TIMEOUT_S * 0.6)
        status, body = _read_response(s)
        assert status == 200 and len(body["choices"][0]["token_ids"]) == 2, body
    assert time.monotonic() - started > REQUEST_TIMEOUT_S
    s.close()


def test_connections_beyond_the_cap_get_503(serve):
    server, port = serve(max_connections=3)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    wait_until(lambda: server.open_connections == 3, 10, "the server did not take the first three connections")
    status, headers, body = request(port, "GET", "/v1/models")
    assert_openai_error(status, body, 503)
    assert headers["Connection"] == "close"
    for s in idle:
        s.close()
    wait_until(lambda: server.open_connections == 0, READ_TIMEOUT_S + 10, "closed connections were not released")
    assert request(port, "GET", "/v1/models")[0] == 200


def _engine(server):
    return server.service.loop.engine


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_sequence(serve, stream, caplog):
    server, port = serve(max_batch=1)
    engine = _engine(server)
    s = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"prompt": "Hello there", "max_tokens": LONG, "ignore_eos": True, "stream": stream}).encode()
    with caplog.at_level(logging.WARNING, logger="wallperf.sut.serving.engine_loop"):
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
        if stream:
            received = b""
            while b"data: " not in received:  # the stream is under way
                received += s.recv(4096)
        else:
            wait_until(engine.has_unfinished, 10, "the request never reached the engine")
        s.close()
        wait_until(lambda: not engine.has_unfinished(), 30, "the abandoned request is still decoding")
    decoded = engine.stats.decode_tokens
    assert decoded < LONG - 10, f"the abandoned request decoded {decoded} of its {LONG} tokens"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    (line,) = [r.getMessage() for r in caplog.records if "aborted" in r.getMessage()]
    assert "client disconnected" in line and "KV blocks freed" in line
    # With one sequence at a time, the next request runs only because the first is gone.
    status, _, answer = request(port, body={"prompt": "Hi", "max_tokens": 3}, timeout=30)
    assert status == 200 and len(answer["choices"][0]["token_ids"]) == 3
    assert engine.stats.decode_tokens - decoded == 2  # its own tokens after the first: nothing else decoded


def test_text_prompt_is_bounded_by_characters_before_tokenizing(serve):
    server, port = serve()
    limit = server.service.max_prompt_chars
    status, _, body = request(port, body={"prompt": "a" * (limit + 1), "max_tokens": 2})
    assert_openai_error(status, body, 400)
    assert body["error"]["param"] == "prompt" and "characters" in body["error"]["message"]
    huge = json.dumps({"prompt": "word " * 3_000_000, "max_tokens": 2}).encode()  # 15 MB
    started = time.monotonic()
    status, _, body = request(port, body=huge)
    print(f"a 15 MB text prompt refused in {time.monotonic() - started:.2f} s")
    assert_openai_error(status, body, 400)


def test_deep_json_bad_methods_and_garbage_get_openai_errors(serve):
    _, port = serve()
    deep = b"[" * 100_000 + b"]" * 100_000
    status, _, body = request(port, body=deep)
    assert_openai_error(status, body, 400)
    assert "nested too deeply" in body["error"]["message"]
    for method in ("PUT", "DELETE", "PATCH"):
        status, headers, body = request(port, method, body={"prompt": "x"})
        assert_openai_error(status, body, 405)
        assert headers["Allow"] == "GET, POST" and headers["Content-Type"] == "application/json"
    # A request line of one word is HTTP/0.9, whose answer is the body alone.
    for garbage, expected in ((b"GARBAGE\r\n\r\n", 400), (b"GET / HTTP/1.1\r\nX: " + b"x" * 70_000 + b"\r\n\r\n", 431)):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(garbage)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
        s.close()
        payload = raw.partition(b"\r\n\r\n")[2] if raw.startswith(b"HTTP/1.1") else raw
        assert_openai_error(expected, json.loads(payload), expected)


@pytest.mark.parametrize("field,value", [("top_p", 0.9), ("top_k", 5), ("logit_bias", {"1": 5}),
                                         ("presence_penalty", 0.5), ("frequency_penalty", 1),
                                         ("repetition_penalty", 1.1), ("seed", 7), ("min_p", 0.1)])
def test_sampling_fields_that_would_change_the_output_are_refused(serve, field, value):
    _, port = serve()
    status, _, body = request(port, body={"prompt": "Hi", "max_tokens": 2, field: value})
    assert_openai_error(status, body, 400)
    assert body["error"]["param"] == field


def test_neutral_sampling_values_are_served(serve):
    _, port = serve()
    status, _, _ = request(port, body={"prompt": "Hi", "max_tokens": 2, "top_p": 1, "top_k": -1,
                                       "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}})
    assert status == 200


def test_api_key_is_required_on_every_request_when_set(serve):
    key = "wp-test-key-0123456789"
    _, port = serve(api_key=key)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
        status, _, body = request(port, body={"prompt": "Hi", "max_tokens": 2}, headers=headers)
        assert_openai_error(status, body, 401)
        assert key not in json.dumps(body)
        assert_openai_error(*request(port, "GET", "/v1/models", headers=headers)[::2], 401)
    good = {"Authorization": f"Bearer {key}"}
    assert request(port, body={"prompt": "Hi", "max_tokens": 2}, headers=good)[0] == 200
    assert request(port, "GET", "/v1/models", headers=good)[0] == 200


def test_binding_beyond_loopback_without_a_key_warns(serve, caplog):
    with caplog.at_level(logging.WARNING, logger="wallperf.sut.serving.server"):
        serve(host="0.0.0.0")
    assert any("without an API key" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wallperf.sut.serving.server"):
        serve(host="0.0.0.0", api_key="wp-test-key-0123456789")
        serve(host="127.0.0.1")
    assert not any("without an API key" in r.getMessage() for r in caplog.records)


def raw_exchange(port, head: bytes, body: bytes) -> tuple[int, dict, bool]:
    """(status, JSON body, whether the server closed the connection after it) for bytes sent as they are."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        header, rest = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in header.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(rest) < length:
            rest += sock.recv(65536)
        sock.settimeout(5)
        closed = sock.recv(1) == b""
    return int(header.split(b" ")[1]), json.loads(rest[:length]), closed


@pytest.mark.parametrize("framing", [
    b"Content-Length: {n}\r\nContent-Length: {m}\r\n",
    b"Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n",
], ids=["two-content-lengths", "content-length-then-chunked", "chunked-then-content-length"])
def test_conflicting_framing_headers_get_400_and_a_closed_connection(serve, framing):
    """RFC 9112 section 6.3: a message whose length is ambiguous is refused (400), and the
    connection closed, never read by the first Content-Length."""
    _, port = serve()
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 2}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
            framing.replace(b"{n}", str(len(body)).encode()).replace(b"{m}", str(len(body) + 7).encode()) +
            b"\r\n")
    status, answer, closed = raw_exchange(port, head, body)
    assert_openai_error(status, answer, 400)
    assert "framing" in answer["error"]["message"] and closed


def test_the_same_content_length_twice_is_one_length(serve):
    _, port = serve()
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 2}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(body), len(body)))
    status, answer, _ = raw_exchange(port, head, body)
    assert status == 200 and answer["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("prompt", ['"\\ud800"', '"abc\\udfff"', '["ok", "\\udbff"]'],
                         ids=["lone-high", "lone-low", "in-a-list"])
def test_a_lone_surrogate_in_the_body_gets_400(serve, prompt):
    """JSON can spell a lone UTF-16 surrogate that no UTF-8 text holds: the client's error, answered."""
    _, port = serve()
    body = b'{"prompt": %s, "max_tokens": 2}' % prompt.encode()
    status, _, answer = request(port, body=body)
    assert_openai_error(status, answer, 400)
    assert "surrogate" in answer["error"]["message"]
    # The server is still serving.
    status, _, answer = request(port, body={"prompt": "hello", "max_tokens": 2})
    assert status == 200
