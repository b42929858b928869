"""HTTP against servers nobody vetted: a wall-clock deadline for a whole exchange, and bodies read under a
cap.

A socket timeout bounds one wait, not a whole exchange: a server that trickles a byte every few seconds never
trips it, through the headers or the body. A `Deadline` shuts down the sockets it watches when it passes, so
whatever read is blocked on them returns at once and the caller sees `expired`; one watchdog thread per
process serves every deadline. `watched_opener` is urllib (proxies from the environment honoured) with its
connections' sockets handed to a deadline. `read_body` never reads more than a cap, whatever Content-Length
says, so a server announcing terabytes cannot make the reader allocate them.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import os
import socket
import threading
import time
import urllib.request

USER_AGENT = "mmcl-shards/0.1"
_CHUNK = 1 << 16


class Deadline:
    """Use as a context manager around one exchange; `watch(sock)` every socket it opens."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = False
        _watchdog().add(self)

    def watch(self, sock: socket.socket | None) -> socket.socket | None:
        """Shut `sock` down when the deadline passes (at once if it already has); returns `sock`."""
        if sock is not None:
            with self._lock:
                if self.expired:
                    _shutdown(sock)
                elif not self._done:
                    self._sockets.append(sock)
        return sock

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def close(self) -> None:
        """The exchange is over: forget the sockets (a kept-alive connection outlives its deadline)."""
        with self._lock:
            self._done = True
            self._sockets.clear()

    def expire(self) -> None:
        """Called by the watchdog thread when the deadline passes."""
        with self._lock:
            if self._done:
                return
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)
            self._sockets.clear()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _Watchdog:
    """A daemon thread that expires deadlines in time order (finished ones are dropped when due)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.heap: list[tuple[float, int, Deadline]] = []
        self.order = itertools.count()
        self.wake = threading.Condition()
        threading.Thread(target=self._run, name="mmcl-deadlines", daemon=True).start()

    def add(self, deadline: Deadline) -> None:
        with self.wake:
            heapq.heappush(self.heap, (deadline.at, next(self.order), deadline))
            self.wake.notify()

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.heap or self.heap[0][0] > time.monotonic():
                    self.wake.wait(self.heap[0][0] - time.monotonic() if self.heap else None)
                _, _, deadline = heapq.heappop(self.heap)
            deadline.expire()


_WATCHDOG: _Watchdog | None = None
_WATCHDOG_LOCK = threading.Lock()


def _watchdog() -> _Watchdog:
    """This process's watchdog; a forked child starts its own (threads do not survive a fork)."""
    global _WATCHDOG
    with _WATCHDOG_LOCK:
        if _WATCHDOG is None or _WATCHDOG.pid != os.getpid():
            _WATCHDOG = _Watchdog()
        return _WATCHDOG


def watch_connection(connection: http.client.HTTPConnection, deadline: Deadline) -> None:
    """Hand every socket `connection` opens to `deadline`: the raw one as soon as it exists (a proxy tunnel
    and the TLS handshake already read from it), and the TLS-wrapped one after `connect`."""
    create = connection._create_connection
    connection._create_connection = lambda *args, **kwargs: deadline.watch(create(*args, **kwargs))
    connect = connection.connect

    def watched_connect() -> None:
        connect()
        deadline.watch(connection.sock)

    connection.connect = watched_connect


class _WatchedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, deadline: Deadline, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        watch_connection(self, deadline)


class _WatchedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, deadline: Deadline, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        watch_connection(self, deadline)


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHTTPConnection, req, deadline=self.deadline)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHTTPSConnection, req, context=self._context, deadline=self.deadline)


def watched_opener(
    deadline: Deadline, proxies: dict[str, str] | None = None
) -> urllib.request.OpenerDirector:
    """An urllib opener whose connections are shut down when `deadline` passes; `proxies` as ProxyHandler
    takes them (None: from the environment)."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler(proxies), _WatchedHTTPHandler(deadline), _WatchedHTTPSHandler(deadline)
    )


class BodyTooLarge(Exception):
    """A response body (announced or received) larger than the reader's cap."""

    def __init__(self, size: int, cap: int, announced: bool) -> None:
        what = "announces" if announced else "sends more than"
        super().__init__(f"the server {what} {size:,} bytes, over the cap of {cap:,}")
        self.size = size


def read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """The whole body, or BodyTooLarge as soon as it is known to exceed `max_bytes` (from Content-Length,
    before reading, or while reading)."""
    length = response.getheader("Content-Length", "")
    if length.strip().isdigit() and int(length) > max_bytes:
        raise BodyTooLarge(int(length), max_bytes, announced=True)
    body = bytearray()
    while chunk := response.read(min(_CHUNK, max_bytes + 1 - len(body))):
        body += chunk
        if len(body) > max_bytes:
            raise BodyTooLarge(len(body), max_bytes, announced=False)
    return bytes(body)
