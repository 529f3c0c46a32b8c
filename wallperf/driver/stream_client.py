"""One streamed completion over asyncio, timed by the client that sends it: the
load generator of `wallperf sweep --concurrency` and `wallperf bench client`.

A small HTTP/1.1 client of the standard library (asyncio streams): a request
goes out on a keep-alive connection of its user, and the answer is read as
server-sent events from a Content-Length or chunked body. Only a connection
that sat idle in the pool and was closed by the server meanwhile is opened
again; any other failure fails the request, on its replica, with its reason
(no request is ever retried, least of all elsewhere).

Times are the client's own (time.monotonic, one clock for the whole machine):
`sent` when the request's bytes were handed to the socket, `first` at the
first non-empty text fragment on any channel (the MLPerf Endpoints TTFT: a
reasoning model's reasoning_content counts; an empty fragment does not),
`last` at the last token. Token counts are the server's `usage` where it
sends one, else the token ids or, failing those, the fragments streamed.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from wallperf.sut.backends.sse import DONE, RequestFailed, choice_content, choices, error_message, parse_event, usage
from wallperf.sut.redact import hold_back, redact

# A stream line longer than this is a broken or hostile server, as sut.backends.openai treats it.
MAX_LINE_BYTES = 1 << 20
MAX_ERROR_BODY = 2000


@dataclass
class Replica:
    """One OpenAI-compatible server: where to post, and how many requests it has now."""

    url: str
    host: str
    port: int
    path: str
    outstanding: int = 0

    @classmethod
    def parse(cls, url: str) -> "Replica":
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"endpoint {redact(url)!r}: the load generator takes http://host[:port][/v1] URLs")
        base = parts.path.rstrip("/")
        return cls(redact(url), parts.hostname, parts.port or 80,
                   f"{base}/completions" if base.endswith("/v1") else f"{base}/v1/completions")


@dataclass
class Timing:
    """What one request took; times in seconds of time.monotonic."""

    replica: int
    scheduled: float
    sent: float | None = None
    first: float | None = None
    last: float | None = None
    done: float | None = None
    tokens: int = 0
    # Tokens that arrived inside the measured window (system tokens/s counts these).
    tokens_in_window: int = 0
    error: str | None = None
    # Issued from the window's start on: one of the point's issued samples, which the
    # rules' counts are about (a warm-up request is not).
    counted: bool = False


class Connection:
    """A user's keep-alive connection to one replica."""

    def __init__(self, replica: Replica, timeout_s: float):
        self.replica, self.timeout_s = replica, timeout_s
        self.reader = self.writer = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.replica.host, self.replica.port, limit=MAX_LINE_BYTES * 2),
            self.timeout_s)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, body: bytes, headers: dict, timing: Timing) -> tuple[int, dict]:
        """Send; (status, headers) once the response head is in. A pooled connection the
        server closed while idle is opened again once, before anything was answered."""
        for fresh in (self.writer is None, True):
            if fresh:
                self.close()
                await self.open()
            head = (f"POST {self.replica.path} HTTP/1.1\r\nHost: {self.replica.host}:{self.replica.port}\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                    + f"Content-Length: {len(body)}\r\n\r\n").encode()
            self.writer.write(head + body)
            timing.sent = time.monotonic()
            try:
                await self.writer.drain()
                status_line = await asyncio.wait_for(self.reader.readline(), self.timeout_s)
            except (ConnectionError, asyncio.IncompleteReadError):
                status_line = b""
            if status_line:
                break
            if fresh:
                raise RequestFailed("the server closed the connection without answering", retryable=False)
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise RequestFailed(f"not an HTTP response: {redact(status_line.decode('latin-1'), 200)!r}",
                                retryable=False)
        response_headers = {}
        while (line := await asyncio.wait_for(self.reader.readline(), self.timeout_s)) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            response_headers[name.strip().lower()] = value.strip()
        return int(parts[1]), response_headers

    async def body_lines(self, headers: dict):
        """The body's lines (chunked or Content-Length); the connection is closed after
        a body that asks for it, or that has neither framing."""
        reader, timeout = self.reader, self.timeout_s
        if headers.get("transfer-encoding", "").lower() == "chunked":
            pending = b""
            while True:
                size = int((await asyncio.wait_for(reader.readline(), timeout)).split(b";")[0] or b"0", 16)
                if size == 0:
                    await asyncio.wait_for(reader.readline(), timeout)
                    break
                data = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
                pending += data[:-2]
                *lines, pending = pending.split(b"\n")
                if len(pending) > MAX_LINE_BYTES:
                    raise RequestFailed(f"a stream line longer than {MAX_LINE_BYTES} bytes", retryable=False)
                for line in lines:
                    yield line
            if pending:
                yield pending
        elif "content-length" in headers:
            remaining = int(headers["content-length"])
            while remaining > 0:
                line = await asyncio.wait_for(reader.readline(), timeout)
                if not line:
                    raise RequestFailed("the body ended before its Content-Length", retryable=False)
                remaining -= len(line)
                yield line
        else:
            while line := await asyncio.wait_for(reader.readline(), timeout):
                yield line
            self.close()
            return
        if headers.get("connection", "").lower() == "close":
            self.close()


async def stream_completion(conn: Connection, body: bytes, headers: dict, timing: Timing,
                            window: tuple[float, float]) -> None:
    """Post `body` on `conn` and read its stream into `timing` (RequestFailed when it fails)."""
    try:
        status, response_headers = await conn.post(body, headers, timing)
        if status != 200:
            detail = b""
            async for line in conn.body_lines(response_headers):
                detail += line
                # A key's length past the cut: a key that starts before it is whole when redacted.
                if len(detail) > MAX_ERROR_BODY + hold_back():
                    break
            conn.close()
            raise RequestFailed(f"HTTP {status}: {error_message(detail, MAX_ERROR_BODY)}", retryable=False)
        counted, reported, ended = 0, None, False
        # Read to the body's end even past [DONE], so the kept-alive connection is clean.
        async for line in conn.body_lines(response_headers):
            chunk = None if ended else parse_event(line)
            if chunk is DONE:
                ended = True
            if chunk is None or chunk is DONE:
                continue
            reported = (usage(chunk) or {}).get("completion_tokens", reported)
            for choice in choices(chunk):
                text, ids, _ = choice_content(choice)
                n = len(ids) or (1 if text else 0)
                if not n:
                    continue
                now = time.monotonic()
                if timing.first is None and text:
                    timing.first = now
                counted += n
                timing.last = now
                if window[0] <= now < window[1]:
                    timing.tokens_in_window += n
        if not ended:
            raise RequestFailed("the stream ended without [DONE]", retryable=False)
        if counted == 0:
            raise RequestFailed("the stream carried no tokens", retryable=False)
        timing.tokens = reported if isinstance(reported, int) and reported > 0 else counted
        if timing.first is None:
            # A server that streams ids without text: its first token stands for the fragment.
            timing.first = timing.last
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        conn.close()
        reason = (f"timeout: no data within {conn.timeout_s:g} s" if isinstance(e, asyncio.TimeoutError)
                  else f"{type(e).__name__}: {e}")
        raise RequestFailed(redact(reason, 500), retryable=False) from None
    except RequestFailed:
        conn.close()
        raise
    finally:
        timing.done = time.monotonic()


def completion_body(model: str, prompt: list[int], max_tokens: int, min_tokens: int = 0,
                    ignore_eos: bool = False) -> bytes:
    """The request, as sut.backends.openai sends it (greedy, streamed, with usage and token ids)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}
    if min_tokens:
        body["min_tokens"] = min_tokens
    if ignore_eos:
        body["ignore_eos"] = True
    return json.dumps(body).encode()
