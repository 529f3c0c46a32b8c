"""`wallperf serve`: an OpenAI-compatible completions server over the native engine.

One loop owns the engine and does continuous batching (in `wallperf serve` on
the main thread, whose OpenMP pool the CPU kernels use; see sut/adapter.py);
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
anything that would sample or change the output (temperature > 0, n > 1,
logprobs, stop strings, echo) is refused with a 400 rather than ignored.

Text prompts are tokenized without added special tokens, as `wallperf run`
tokenizes its prompts. The engine cannot abort a sequence: a client that
disconnects leaves its request decoding to its limit.
"""
from __future__ import annotations

import itertools
import json
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sut.loading import LoadedModel
from sut.backends.native import NativeBackend
from sut.completion_request import MAX_BODY_BYTES, CompletionRequest, RequestError, parse_completion_request
from sut.engine import SamplingParams, TokenEvent

log = logging.getLogger(__name__)


class EngineLoop:
    """The loop that owns the engine, on its own thread or the caller's. `submit`
    returns the queue its TokenEvents arrive on;
    a RequestError on that queue means the engine failed or stopped."""

    def __init__(self, engine, own_thread: bool = True):
        """With own_thread=False the caller runs `run()` on its own thread (the
        main one, for the CPU kernels' OpenMP pool: see sut/adapter.py)."""
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, queue.SimpleQueue] = {}
        self._ids = itertools.count()
        # Taken by submit and by the final drain, so no request slips in after the drain.
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self.error: str | None = None
        self._thread = None
        if own_thread:
            self._thread = threading.Thread(target=self.run, name="wallperf-engine", daemon=True)
            self._thread.start()

    def submit(self, prompt_ids, params: SamplingParams) -> queue.SimpleQueue:
        events: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if self._closed:
                raise RequestError(503, f"the engine is not running: {self.error or 'server stopped'}")
            self._inbox.put((next(self._ids), list(prompt_ids), params, events))
        return events

    def request_stop(self) -> None:
        """Ask the loop to end (safe from a signal handler); `stop` also waits for it."""
        self._stop.set()
        self._inbox.put(None)

    def stop(self) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join()

    def run(self) -> None:
        """The loop, until request_stop: on its own thread, or (own_thread=False) the caller's."""
        try:
            while not self._stop.is_set():
                self._admit(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    for ev in self.engine.step():
                        self._streams[ev.request_id].put(ev)
                        if ev.finished:
                            del self._streams[ev.request_id]
        except Exception as e:  # noqa: BLE001 - every waiting client must hear of it
            self.error = f"{type(e).__name__}: {e}"
            log.exception("the engine failed")
        failure = RequestError(503, f"the engine stopped: {self.error or 'server shutting down'}")
        with self._lock:
            self._closed = True
        for events in self._streams.values():
            events.put(failure)
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if item is not None:
                item[3].put(failure)

    def _admit(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    rid, prompt, params, events = item
                    try:
                        self.engine.add_request(rid, prompt, params)
                        self._streams[rid] = events
                    except ValueError as e:
                        events.put(RequestError(400, str(e)))
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass


class TextStream:
    """Incremental detokenization over a sliding window (as TGI and vLLM do), so each
    token costs a short decode. Byte-level BPE may split a character over tokens:
    text ending in U+FFFD is held back until the character is whole."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        # ids[prefix:read] is text already sent, decoded again for context.
        self.prefix = self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        sent = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(sent) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(sent):]

    def flush(self) -> str:
        sent = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(sent):]


@dataclass(frozen=True)
class CompletionService:
    loop: EngineLoop
    tokenizer: object
    model_name: str
    vocab_size: int
    max_seq_len: int
    created: int

    def parse(self, body) -> CompletionRequest:
        return parse_completion_request(body, self.tokenizer, self.vocab_size, self.max_seq_len, self.model_name)

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
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, fmt, *args) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            send_json(self, 200, self.server.service.models())
        elif self.path == "/health":
            send_json(self, 200, {"status": "ok"})
        else:
            send_json(self, 404, RequestError(404, f"no route {self.path}").body())

    def do_POST(self) -> None:
        service = self.server.service
        try:
            if self.path != "/v1/completions":
                # Its body is left unread: the connection cannot carry another request.
                self.close_connection = True
                raise RequestError(404, f"no route {self.path}; served: /v1/completions")
            request = service.parse(self._read_json())
            events = service.loop.submit(request.prompt_ids, request.params)
        except RequestError as e:
            send_json(self, e.status, e.body())
            return
        if request.stream:
            self._stream(service, request, events)
        else:
            self._complete(service, request, events)

    def _read_json(self):
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or not 0 < int(length) <= MAX_BODY_BYTES:
            # The body was not read: the connection cannot carry another request.
            self.close_connection = True
            raise RequestError(413 if length.isdigit() and int(length) else 400,
                               f"a JSON body with Content-Length is required (at most {MAX_BODY_BYTES} bytes)")
        length = int(length)
        try:
            return json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON: {e}") from None

    def _complete(self, service: CompletionService, request: CompletionRequest, events) -> None:
        ids, ev = [], None
        while ev is None or not ev.finished:
            ev = events.get()
            if isinstance(ev, RequestError):
                send_json(self, ev.status, ev.body())
                return
            ids.append(ev.token_id)
        choice = {"index": 0, "text": service.tokenizer.decode(ids), "token_ids": ids, "logprobs": None,
                  "finish_reason": service.finish_reason(ev, request.params)}
        send_json(self, 200, {**_envelope(service), "choices": [choice], "usage": _usage(request, len(ids))})

    def _stream(self, service: CompletionService, request: CompletionRequest, events) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        envelope, text, n, ev = _envelope(service), TextStream(service.tokenizer), 0, None
        try:
            while ev is None or not ev.finished:
                ev = events.get()
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
            # The client went away; its request decodes on (the engine cannot abort one).
            self.close_connection = True

    def _event(self, obj: dict) -> None:
        self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        # Framing and data in one write: the socket is unbuffered.
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))



def send_json(handler: BaseHTTPRequestHandler, status: int, obj: dict) -> None:
    """A whole JSON response, with its length (keep-alive clients read by it)."""
    data = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _envelope(service: CompletionService) -> dict:
    return {"id": f"cmpl-{time.monotonic_ns():x}", "object": "text_completion", "created": int(time.time()),
            "model": service.model_name}


def _usage(request: CompletionRequest, completion_tokens: int) -> dict:
    prompt_tokens = len(request.prompt_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Many clients connect at once under a benchmark's load.
    request_queue_size = 1024

    def __init__(self, address, service: CompletionService):
        super().__init__(address, _Handler)
        self.service, self.connections = service, set()


def start_server(loaded: LoadedModel, host: str = "127.0.0.1", port: int = 0, max_batch: int = 16,
                 max_seq_len: int = 2048, model_name: str | None = None, engine_thread: bool = True):
    """Serve `loaded` in background threads: (server, base url, stop function). Stopping
    closes every open connection at once, as a killed server would. With
    engine_thread=False the caller runs the engine: `server.service.loop.run()`."""
    engine = NativeBackend(loaded, max_batch=max_batch, max_seq_len=max_seq_len)
    service = CompletionService(EngineLoop(engine, own_thread=engine_thread), loaded.tokenizer,
                                model_name or Path(loaded.path).stem, loaded.config.vocab_size, engine.max_seq_len,
                                int(time.time()))
    server = _Server((host, port), service)
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
