"""The HTTP side of `wallperf serve` under abuse: a thread per connection up to
a limit, beyond it a 503 and a closed connection (answered on the accepting
thread, which never blocks on a client); every connection's reads and writes
time out after `read_timeout_s` (the handler applies it), and a request's head
and body must arrive within `request_timeout_s` of its first byte, so a client
that trickles a byte now and then cannot hold a thread either; a client that
went away is a debug line, not a traceback."""
from __future__ import annotations

import io
import ipaddress
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

from wallperf.sut.serving.completion_request import RequestError

log = logging.getLogger(__name__)

# uvicorn closes idle keep-alive connections after 5 s; a little more here, as
# benchmark clients pause between requests.
DEFAULT_READ_TIMEOUT_S = 10.0
# The whole request (head and body) by default: the read timeout plus this, room
# for a full-size body over a slow link without letting a trickle go on for long.
REQUEST_TIMEOUT_MARGIN_S = 5.0
# Room for 300 idle connections plus the live requests of a benchmark's load.
DEFAULT_MAX_CONNECTIONS = 512


@dataclass(frozen=True)
class ServerLimits:
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # Required as a bearer token on every request when set.
    api_key: str | None = field(default=None, repr=False)
    # None: read_timeout_s + REQUEST_TIMEOUT_MARGIN_S.
    request_timeout_s: float | None = None

    def __post_init__(self):
        request_timeout_ok = self.request_timeout_s is None or self.request_timeout_s > 0
        if not self.read_timeout_s > 0 or self.max_connections < 1 or not request_timeout_ok:
            raise ValueError("need read_timeout_s > 0, request_timeout_s > 0 and max_connections >= 1")

    @property
    def request_deadline_s(self) -> float:
        """Seconds from a request's first byte to the end of its body."""
        if self.request_timeout_s is None:
            return self.read_timeout_s + REQUEST_TIMEOUT_MARGIN_S
        return self.request_timeout_s


class RequestDeadline(Exception):
    """A request's head and body did not arrive within the request deadline.
    Not a TimeoutError, which http.server takes for a silent client and drops."""


class DeadlineReader(io.RawIOBase):
    """A connection's reads, each waiting at most `read_timeout_s` (as the socket's
    own timeout would), and, once `arm()`ed, all of one request's reads ending by a
    deadline that starts with its first byte: past it, RequestDeadline."""

    def __init__(self, sock, read_timeout_s: float, deadline_s: float):
        super().__init__()
        self._sock, self._read_timeout_s, self._deadline_s = sock, read_timeout_s, deadline_s
        self._deadline: float | None = None
        self._armed = False

    def readable(self) -> bool:
        return True

    def arm(self) -> None:
        """Before a request: its deadline starts with the next bytes that arrive."""
        self._deadline, self._armed = None, True

    def disarm(self) -> None:
        """After a request's body: the connection's reads wait `read_timeout_s` each again."""
        self._deadline, self._armed = None, False

    def readinto(self, buffer) -> int:
        if self._deadline is None:
            n = self._sock.recv_into(buffer)
        else:
            n = self._recv_by_deadline(buffer)
        if self._armed and n:
            self._deadline, self._armed = time.monotonic() + self._deadline_s, False
        return n

    def _recv_by_deadline(self, buffer) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise RequestDeadline()
        self._sock.settimeout(min(left, self._read_timeout_s))
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            if left < self._read_timeout_s:
                raise RequestDeadline() from None
            raise
        finally:
            self._sock.settimeout(self._read_timeout_s)


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `limits.max_connections` of them; `service` is for the handler."""

    daemon_threads = True
    # Many clients connect at once under a benchmark's load.
    request_queue_size = 1024

    def __init__(self, address, handler, service, limits: ServerLimits):
        super().__init__(address, handler)
        self.service, self.limits, self.connections = service, limits, set()
        self._open = 0
        self._open_lock = threading.Lock()

    @property
    def open_connections(self) -> int:
        with self._open_lock:
            return self._open

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            admitted = self._open < self.limits.max_connections
            self._open += admitted
        if not admitted:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._open_lock:
            self._open -= 1

    def _refuse(self, request) -> None:
        """503 on the accepting thread, without blocking it: a short response fits any socket buffer."""
        body = json.dumps(RequestError(503, f"the server holds its limit of {self.limits.max_connections} "
                                            "connections; retry later").body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)
            request.send(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """A client that went away or fell silent is one debug line, not a traceback on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("%s: connection ended: %s: %s", client_address[0], type(exc).__name__, exc)
        else:
            log.exception("%s: the request failed", client_address[0])


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
