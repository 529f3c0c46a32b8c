"""`wallperf serve`: an OpenAI-compatible completions server over the native engine.

One loop owns the engine and does continuous batching (sut/engine_loop.py; in
`wallperf serve` on the main thread, whose OpenMP pool the CPU kernels use);
HTTP requests are handled on threads (the standard library's
ThreadingHTTPServer, HTTP/1.1 keep-alive) that hand their request to the loop
and read their tokens back from a queue. Request bodies are checked in
sut/completion_request.py. The engine drops the GIL inside torch's kernels, so the
HTTP threads keep up while it computes.

Served: POST /v1/completions (prompt as text or token ids; `max_tokens`,
`min_tokens` and `ignore_eos` as vLLM takes them; `stream` as server-sent
events, each chunk carrying its token's text and, like vLLM's
`return_token_ids`, its id in `choices[0].token_ids`; the usage chunk when
`stream_options.include_usage`) and GET /v1/models. Decoding is greedy only, so
anything that would sample or change the output (temperature > 0, top_p < 1,
top_k, penalties, logit_bias, seed, n > 1, logprobs, stop strings, echo) is
refused with a 400 rather than ignored. Text prompts are tokenized without
added special tokens, as `wallperf run` tokenizes its prompts.

Under abuse: a connection that sends nothing for `read_timeout_s` (a half-sent
request, an idle keep-alive connection) is closed; a request whose head and
body have not all arrived `request_timeout_s` after its first byte (a client
trickling a byte every few seconds) is answered 408 and closed; beyond `max_connections`
open connections a new one is answered 503 and closed; a client that goes away
has its request aborted in the engine (its KV blocks freed, one log line);
every error, http.server's own included, is an OpenAI-shaped JSON body. With
an API key (WALLPERF_API_KEY in `wallperf serve`'s environment) every request
must carry it as a bearer token, compared in constant time.
"""
from __future__ import annotations

import hmac
import io
import json
import logging
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from wallperf.sut.backends.native import NativeBackend
from wallperf.sut.serving.completion_request import (MAX_BODY_BYTES, CompletionRequest, RequestError, decode_json_body,
                                    max_token_chars, parse_completion_request)
from wallperf.sut.engine.engine import SamplingParams, TokenEvent
from wallperf.sut.serving.engine_loop import EngineLoop
from wallperf.sut.serving.http_limits import BoundedHTTPServer, DeadlineReader, RequestDeadline, ServerLimits, is_loopback
from wallperf.sut.serving.text_stream import TextStream
from wallperf.sut.loading.load import LoadedModel

log = logging.getLogger(__name__)

# How often a request waiting for tokens checks that its client is still there.
CLIENT_CHECK_S = 0.2
ALLOWED_METHODS = "GET, POST"


@dataclass(frozen=True)
class CompletionService:
    loop: EngineLoop
    tokenizer: object
    model_name: str
    vocab_size: int
    max_seq_len: int
    created: int
    max_prompt_chars: int

    def parse(self, body) -> CompletionRequest:
        return parse_completion_request(body, self.tokenizer, self.vocab_size, self.max_seq_len, self.model_name,
                                        self.max_prompt_chars)

    def finish_reason(self, ev: TokenEvent, params: SamplingParams) -> str:
        return "stop" if not params.ignore_eos and ev.token_id in self.tokenizer.eos_token_ids else "length"

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "wallperf", "max_model_len": self.max_seq_len}]}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "wallperf"
    # Each token is a small write: Nagle's algorithm would hold it for the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True

    def setup(self) -> None:
        # Every read and write on the connection: a client silent this long is closed.
        limits = self.server.limits
        self.timeout = limits.read_timeout_s
        super().setup()
        # Reads go through the request deadline instead of the socket file setup() made.
        self.rfile.close()
        self._reader = DeadlineReader(self.connection, limits.read_timeout_s, limits.request_deadline_s)
        self.rfile = io.BufferedReader(self._reader)
        self.server.connections.add(self.connection)

    def handle_one_request(self) -> None:
        # The deadline may strike before parse_request has set these.
        self.requestline, self.request_version, self.command = "", self.protocol_version, ""
        self._reader.arm()
        try:
            super().handle_one_request()
        except RequestDeadline:
            self.close_connection = True
            seconds = self.server.limits.request_deadline_s
            log.debug("%s: request not received within %g s", self.address_string(), seconds)
            send_json(self, 408, RequestError(408, f"the request did not arrive within {seconds:g} s of its first "
                                                   "byte").body(), {"Connection": "close"})
        finally:
            self._reader.disarm()

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, fmt, *args) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def send_error(self, code, message=None, explain=None) -> None:
        """http.server's own errors (a malformed request line or headers, a method
        without a do_ handler) as OpenAI-shaped JSON, then the connection closes."""
        self.close_connection = True
        headers = {"Connection": "close"}
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} is not allowed"
            headers["Allow"] = ALLOWED_METHODS
        send_json(self, int(code), RequestError(int(code), message or HTTPStatus(code).phrase).body(), headers)

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path.rstrip("/") == "/v1/models":
            send_json(self, 200, self.server.service.models())
        elif self.path == "/health":
            send_json(self, 200, {"status": "ok"})
        else:
            send_json(self, 404, RequestError(404, f"no route {self.path}").body())

    def do_POST(self) -> None:
        if not self._authorized():
            return
        service = self.server.service
        try:
            if self.path != "/v1/completions":
                # Its body is left unread: the connection cannot carry another request.
                self.close_connection = True
                raise RequestError(404, f"no route {self.path}; served: /v1/completions")
            request = service.parse(self._read_json())
            request_id, events = service.loop.submit(request.prompt_ids, request.params)
        except RequestError as e:
            send_json(self, e.status, e.body())
            return
        self._next_client_check = time.monotonic() + CLIENT_CHECK_S
        if request.stream:
            self._stream(service, request, request_id, events)
        else:
            self._complete(service, request, request_id, events)

    def _authorized(self) -> bool:
        key = self.server.limits.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if hmac.compare_digest(token.encode("utf-8", "surrogateescape"), key.encode("utf-8", "surrogateescape")):
            return True
        # A body, if any, is left unread: the connection cannot carry another request.
        self.close_connection = True
        send_json(self, 401, RequestError(401, "a valid API key is required: send 'Authorization: Bearer "
                                               "<key>' with the server's WALLPERF_API_KEY").body())
        return False

    def _read_json(self):
        # RFC 9112 section 6.3: a body's length must be unambiguous. Two differing Content-Lengths,
        # or Content-Length beside Transfer-Encoding, could be framed differently by a proxy in
        # front: a 400, and the connection closed, as for any framing it cannot trust.
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if len(lengths) > 1 or lengths and self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise RequestError(400, "conflicting framing: send one Content-Length and no Transfer-Encoding")
        length = lengths.pop() if lengths else ""
        if not length.isdigit() or not 0 < int(length) <= MAX_BODY_BYTES:
            # The body was not read: the connection cannot carry another request.
            self.close_connection = True
            raise RequestError(413 if length.isdigit() and int(length) else 400,
                               f"a JSON body with Content-Length is required (at most {MAX_BODY_BYTES} bytes)")
        body = self.rfile.read(int(length))
        self._reader.disarm()
        return decode_json_body(body)

    def _client_gone(self) -> bool:
        """The client closed or reset its end: the socket is readable with nothing to read."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def _next_event(self, request_id: int, events):
        """The request's next event, or None once its client is gone (the request is then aborted).
        The client is looked at every CLIENT_CHECK_S, however fast the tokens come."""
        while True:
            now = time.monotonic()
            if now >= self._next_client_check:
                self._next_client_check = now + CLIENT_CHECK_S
                if self._client_gone():
                    self._abort(request_id, "client disconnected")
                    return None
            try:
                return events.get(timeout=CLIENT_CHECK_S)
            except queue.Empty:
                pass

    def _abort(self, request_id: int, reason: str) -> None:
        self.close_connection = True
        self.server.service.loop.abort(request_id, reason)

    def _complete(self, service: CompletionService, request: CompletionRequest, request_id: int, events) -> None:
        ids, ev = [], None
        while ev is None or not ev.finished:
            ev = self._next_event(request_id, events)
            if ev is None:
                return
            if isinstance(ev, RequestError):
                send_json(self, ev.status, ev.body())
                return
            ids.append(ev.token_id)
        choice = {"index": 0, "text": service.tokenizer.decode(ids), "token_ids": ids, "logprobs": None,
                  "finish_reason": service.finish_reason(ev, request.params)}
        send_json(self, 200, {**_envelope(service), "choices": [choice], "usage": _usage(request, len(ids))})

    def _stream(self, service: CompletionService, request: CompletionRequest, request_id: int, events) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        envelope, text, n, ev = _envelope(service), TextStream(service.tokenizer), 0, None
        try:
            while ev is None or not ev.finished:
                ev = self._next_event(request_id, events)
                if ev is None:
                    return
                if isinstance(ev, RequestError):
                    self._event(ev.body())
                    break
                n += 1
                delta = text.push(ev.token_id) + (text.flush() if ev.finished else "")
                reason = service.finish_reason(ev, request.params) if ev.finished else None
                self._event({**envelope, "choices": [{"index": 0, "text": delta, "token_ids": [ev.token_id],
                                                      "logprobs": None, "finish_reason": reason}]})
            else:
                if request.include_usage:
                    self._event({**envelope, "choices": [], "usage": _usage(request, n)})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except OSError:
            # The client went away (or stopped reading for read_timeout_s) mid-stream.
            if ev is None or not ev.finished:
                self._abort(request_id, "client disconnected mid-stream")
            self.close_connection = True

    def _event(self, obj: dict) -> None:
        self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        # Framing and data in one write: the socket is unbuffered.
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


def send_json(handler: BaseHTTPRequestHandler, status: int, obj: dict, headers: dict | None = None) -> None:
    """A whole JSON response, with its length (keep-alive clients read by it)."""
    data = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


def _envelope(service: CompletionService) -> dict:
    return {"id": f"cmpl-{time.monotonic_ns():x}", "object": "text_completion", "created": int(time.time()),
            "model": service.model_name}


def _usage(request: CompletionRequest, completion_tokens: int) -> dict:
    prompt_tokens = len(request.prompt_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def start_server(loaded: LoadedModel, host: str = "127.0.0.1", port: int = 0, max_batch: int = 16,
                 max_seq_len: int = 2048, model_name: str | None = None, engine_thread: bool = True,
                 limits: ServerLimits = ServerLimits()):
    """Serve `loaded` in background threads: (server, base url, stop function). Stopping
    closes every open connection at once, as a killed server would. With
    engine_thread=False the caller runs the engine: `server.service.loop.run()`."""
    engine = NativeBackend(loaded, max_batch=max_batch, max_seq_len=max_seq_len)
    service = CompletionService(EngineLoop(engine, own_thread=engine_thread), loaded.tokenizer,
                                model_name or Path(loaded.path).stem, loaded.config.vocab_size, engine.max_seq_len,
                                int(time.time()), engine.max_seq_len * max_token_chars(loaded.tokenizer))
    try:
        server = BoundedHTTPServer((host, port), _Handler, service, limits)
    except BaseException:
        service.loop.stop()
        raise
    if limits.api_key is None and not is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach this address can use it "
                    "(set WALLPERF_API_KEY in the server's environment to require one)", host)
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="wallperf-http", daemon=True)
    thread.start()
    url = f"http://{host}:{server.server_address[1]}"

    def stop() -> None:
        server.shutdown()
        for conn in list(server.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        service.loop.stop()
        thread.join()

    return server, url, stop
