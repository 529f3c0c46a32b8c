"""One OpenAI-compatible server as the openai backend sees it: its URL (shown as
scheme, host, port and path only: user-info and query credentials are never
shown, and are registered as secrets), the path to post to, a pool of idle
keep-alive connections, and whether it takes token-id prompts."""
from __future__ import annotations

import http.client
import threading
from urllib.parse import urlsplit

from wallperf.sut.redact import public_url, register_url, split_url

# What sending on a keep-alive connection the server has since closed looks like.
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class Endpoint:
    def __init__(self, url: str, timeout_s: float):
        register_url(url)
        scheme, _, rest = split_url(url)
        # What stats, logs and results show.
        self.url, self.timeout_s = public_url(url), timeout_s
        try:
            parts = urlsplit(f"{scheme}://{rest}")
            port = parts.port
        except ValueError as e:
            raise ValueError(f"endpoint {self.url!r} is not a valid URL: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint {self.url!r} must be an http(s)://host[:port][/v1] URL")
        self._conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port = parts.hostname, port
        base = parts.path.rstrip("/")
        self.path = f"{base}/completions" if base.endswith("/v1") else f"{base}/v1/completions"
        self._idle: list = []
        self._lock = threading.Lock()
        self.outstanding = 0
        self.text_prompts = False

    def connection(self, reuse: bool = True):
        """(connection, whether it was idle in the pool)."""
        with self._lock:
            if reuse and self._idle:
                return self._idle.pop(), True
        # The timeout bounds the connect and every read: no byte for timeout_s fails the request.
        return self._conn_class(self._host, self._port, timeout=self.timeout_s), False

    def release(self, conn) -> None:
        with self._lock:
            self._idle.append(conn)

    def post(self, headers: dict, body: bytes):
        """(response, connection): on a pooled connection, or a new one when the pooled one was stale."""
        conn, reused = self.connection()
        while True:
            try:
                conn.request("POST", self.path, body, headers)
                return conn.getresponse(), conn
            except _STALE_CONNECTION:
                conn.close()
                if not reused:
                    raise
                # The server closed an idle keep-alive connection: not a failure of this request.
                conn, reused = self.connection(reuse=False)
            except BaseException:
                conn.close()
                raise

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
