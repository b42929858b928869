"""fetch_bytes against real files, real tar shards and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import select
import socket
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from localhost import clear_proxies, refusing_port
from processes import HANG_GUARD_S

from shards_tools.config import FetchOptions
from shards_tools.fetch import fetch_bytes, split_tar_member, url_scheme
from shards_tools.items import ItemError


def loopback(**options) -> FetchOptions:
    """Options for a server on 127.0.0.1, whose timeout and deadline are only hang guards: such a server
    answers well within them however busy the machine is (the timeout test sets its own, for a server that
    holds its answer until the client has given up)."""
    return FetchOptions(**{"timeout": HANG_GUARD_S, "deadline": HANG_GUARD_S, **options})


LOOPBACK = loopback()


def fetch_error(source: str, options: FetchOptions | None = None) -> ItemError:
    with pytest.raises(ItemError) as err:
        fetch_bytes(source, options or FetchOptions())
    return err.value


# --- local files and tar members -------------------------------------------------------------------


def test_local_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01data")
    (tmp_path / "empty.txt").write_bytes(b"")
    assert fetch_bytes(str(tmp_path / "a.bin"), FetchOptions()) == b"\x00\x01data"
    assert fetch_error(str(tmp_path / "nope.jpg")).reason == "missing_file"
    assert fetch_error(str(tmp_path / "empty.txt")).reason == "empty_file"
    assert fetch_error(str(tmp_path)).reason == "missing_file"
    assert fetch_error("").reason == "missing_file"


def test_other_schemes_are_unsupported(tmp_path):
    for source in (
        "file:///etc/hostname",
        "ftp://127.0.0.1/a.jpg",
        "s3://bucket/a.jpg",
        "pipe:cat /etc/hostname",
    ):
        assert fetch_error(source).reason == "unsupported_url"
    assert url_scheme("HTTPS://127.0.0.1/x") == "https"
    assert url_scheme("C:\\data\\x.jpg") is None
    assert url_scheme("/data/x:y.jpg") is None


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_members(tmp_path):
    shard = write_tar(
        tmp_path / "shard#1.tar", {"k1.jpg": b"one", "dir/k2.jpg": b"two", "k3.txt": b"", "k#4.jpg": b"four"}
    )
    options = FetchOptions()
    assert fetch_bytes(f"{shard}#k1.jpg", options) == b"one"
    assert fetch_bytes(f"{shard}#dir/k2.jpg", options) == b"two"
    assert fetch_bytes(f"{shard}#k#4.jpg", options) == b"four"
    assert split_tar_member(f"{shard}#k#4.jpg") == (str(shard), "k#4.jpg")
    assert fetch_error(f"{shard}#k3.txt").reason == "empty_file"
    assert fetch_error(f"{shard}#absent.jpg").reason == "missing_file"
    assert fetch_error(f"{tmp_path / 'absent.tar'}#k1.jpg").reason == "missing_file"
    not_tar = tmp_path / "plain.tar"
    not_tar.write_bytes(b"this is not a tar file" * 40)
    assert fetch_error(f"{not_tar}#k1.jpg").reason == "decode_error"


def test_gzipped_tar_members(tmp_path):
    shard = tmp_path / "shard.tar.gz"
    with tarfile.open(shard, "w:gz") as tar:
        for i in range(5):
            info = tarfile.TarInfo(f"{i}.wav")
            info.size = 3
            tar.addfile(info, io.BytesIO(f"w{i:02d}".encode()[:3]))
    assert [fetch_bytes(f"{shard}#{i}.wav", FetchOptions()) for i in (4, 0, 2)] == [b"w04", b"w00", b"w02"]


def test_rewritten_tar_is_read_again(tmp_path):
    shard = write_tar(tmp_path / "s.tar", {"a.jpg": b"old"})
    assert fetch_bytes(f"{shard}#a.jpg", FetchOptions()) == b"old"
    first = shard.stat()
    write_tar(shard, {"a.jpg": b"new content", "b.jpg": b"b"})  # the same size (one tar record)
    # a later mtime, whatever the clock did
    os.utime(shard, ns=(first.st_atime_ns, first.st_mtime_ns + 10**9))
    assert fetch_bytes(f"{shard}#a.jpg", FetchOptions()) == b"new content"


def _read_members(args: tuple[str, list[str]]) -> list[bytes]:
    shard, names = args
    return [fetch_bytes(f"{shard}#{name}", FetchOptions()) for name in names]


def test_forked_workers_read_members_of_a_tar_the_parent_has_open(tmp_path):
    members = {f"{i:04d}.jpg": bytes([i % 256]) * (100 + i) for i in range(60)}
    shard = write_tar(tmp_path / "s.tar", members)
    names = list(members)
    assert _read_members((str(shard), names[:1])) == [members[names[0]]]  # the parent caches the open tar
    with multiprocessing.get_context("fork").Pool(2) as pool:
        chunks = pool.map(_read_members, [(str(shard), names[i::2]) for i in range(2)])
    assert chunks == [[members[n] for n in names[i::2]] for i in range(2)]


# --- http(s) against a real server on 127.0.0.1 ----------------------------------------------------


class QuietHandler(BaseHTTPRequestHandler):
    """A test server's handler: answers with a Content-Length (so connections can be kept) and logs
    nothing."""

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class Handler(QuietHandler):
    """/ok, /empty, /status/<code>, /flaky/<id> (500 on the first request, then 200), /slow (answers only once
    the test sets `slow_released`, after its client has given up)."""

    hits: Counter = Counter()
    slow_released = threading.Event()
    slow_answered = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        Handler.hits[path] += 1
        if path == "/ok":
            self.reply(200, b"image bytes")
        elif path == "/empty":
            self.reply(200, b"")
        elif path.startswith("/status/"):
            self.reply(int(path.rsplit("/", 1)[1]), b"error page")
        elif path.startswith("/flaky/"):
            self.reply(500 if Handler.hits[path] == 1 else 200, b"second time lucky")
        elif path == "/slow":
            Handler.slow_released.wait(HANG_GUARD_S)
            Handler.slow_answered += 1
            with contextlib.suppress(OSError):  # the client has gone
                self.reply(200, b"too late")
        else:
            self.reply(404, b"not found")


class LoopbackServer(ThreadingHTTPServer):
    """Bound to 127.0.0.1 port 0 (the kernel picks a free port: nothing can take it between choosing and
    binding); remembers its connections, so that closing it also ends connections a client keeps alive."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.connections: list[socket.socket] = []

    def process_request(self, request, client_address) -> None:
        self.connections.append(request)
        super().process_request(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        for connection in self.connections:  # a kept-alive connection to a closed server must not linger
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A server on 127.0.0.1 answering with `handler` in a background thread; yields its base URL."""
    httpd = LoopbackServer(handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server():
    with serving(Handler) as base:
        yield base


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Requests to 127.0.0.1 must not go through a proxy (nor skip one, for the proxy test) because of what
    the machine's environment says: every *_proxy variable is removed; the proxy test sets its own."""
    clear_proxies(monkeypatch)


def test_http_ok_and_empty(server):
    assert fetch_bytes(f"{server}/ok", LOOPBACK) == b"image bytes"
    assert fetch_error(f"{server}/empty", LOOPBACK).reason == "empty_file"


def test_http_4xx_is_final(server):
    err = fetch_error(f"{server}/status/404", loopback(retries=3))
    assert err.reason == "fetch_error" and err.detail == f"{server}/status/404: HTTP 404"
    assert Handler.hits["/status/404"] == 1


def test_http_5xx_is_retried(server):
    assert fetch_bytes(f"{server}/flaky/a", loopback(retries=1)) == b"second time lucky"
    assert Handler.hits["/flaky/a"] == 2
    err = fetch_error(f"{server}/flaky/b", loopback(retries=0))
    assert err.detail == f"{server}/flaky/b: HTTP 500"
    err = fetch_error(f"{server}/status/503", loopback(retries=2))
    assert err.detail == f"{server}/status/503: HTTP 503 (after 3 attempts)"
    assert Handler.hits["/status/503"] == 3


def test_http_timeout(server):
    """The server holds /slow until the client has given up: the client can only have returned by timing out,
    before any answer, however long the machine took to get there."""
    Handler.slow_released.clear()
    Handler.slow_answered = 0
    try:
        err = fetch_error(f"{server}/slow", loopback(timeout=0.2, retries=0))
        answered_before_the_client_returned = Handler.slow_answered
    finally:
        Handler.slow_released.set()
    assert err.reason == "fetch_error" and "timed out after 0.2s" in err.detail
    assert Handler.hits["/slow"] == 1 and answered_before_the_client_returned == 0


def test_http_proxy_from_the_environment_is_used(server, monkeypatch):
    """http_proxy is honoured (as urllib and img2dataset do): the request goes to the proxy with the full URL,
    also when it is set after requests without it (the lookup is cached per environment) and no longer once
    it is removed. The URL names a port that refuses connections (an address, no name to resolve): only the
    proxy can answer for it."""
    with refusing_port() as port:
        url = f"http://127.0.0.1:{port}/ok"
        assert fetch_error(url, loopback(retries=0)).reason == "fetch_error"
        monkeypatch.setenv("http_proxy", server)
        before = Handler.hits["/ok"]
        assert fetch_bytes(url, loopback(retries=0)) == b"image bytes"
        assert Handler.hits["/ok"] == before + 1
        monkeypatch.delenv("http_proxy")
        assert fetch_error(url, loopback(retries=0)).reason == "fetch_error"


def test_http_connection_refused():
    with refusing_port() as port:
        err = fetch_error(f"http://127.0.0.1:{port}/x.jpg", loopback(retries=1))
    assert err.reason == "fetch_error"
    assert "refused" in err.detail.lower() and "(after 2 attempts)" in err.detail


class KeepAliveHandler(QuietHandler):
    """HTTP/1.1 with keep-alive: /img/<n> (bytes naming the connection that served them), /moved/<n> (302 to
    /img/<n>), /loop (redirects to itself); the server closes a connection after 3 requests."""

    protocol_version = "HTTP/1.1"
    connections = 0

    def setup(self) -> None:
        super().setup()
        KeepAliveHandler.connections += 1
        self.number, self.served = KeepAliveHandler.connections, 0

    def do_GET(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        self.served += 1
        headers = {}
        if self.served == 3:
            headers["Connection"] = "close"
            self.close_connection = True
        if path.startswith("/moved/"):
            self.reply(302, b"", {"Location": "/img/" + path.rsplit("/", 1)[1], **headers})
        elif path == "/loop":
            self.reply(301, b"", {"Location": "/loop", **headers})
        else:
            self.reply(200, f"{path} on connection {self.number}".encode(), headers)


def test_http_connections_are_kept_alive_and_redirects_followed():
    with serving(KeepAliveHandler) as base:
        KeepAliveHandler.connections = 0
        bodies = [fetch_bytes(f"{base}/img/{n}", LOOPBACK).decode() for n in range(7)]
        # one connection carries requests until the server says "Connection: close" (after 3)
        assert bodies == [f"/img/{n} on connection {1 + n // 3}" for n in range(7)]
        assert fetch_bytes(f"{base}/moved/9", LOOPBACK).decode().startswith("/img/9 on connection")
        err = fetch_error(f"{base}/loop", loopback(retries=0))
        assert err.reason == "fetch_error" and "more than 10 redirects" in err.detail


class IdleClosingHandler(KeepAliveHandler):
    """Keeps connections alive but closes an idle one once its idle timeout has passed, as servers do. The
    test says when that is (`idle_timeout_passed`), instead of a clock that a busy machine would stretch
    between two requests; `closed` is set once such a connection is closed."""

    idle_timeout_passed = threading.Event()
    closed = threading.Event()

    def handle_one_request(self) -> None:
        while not select.select([self.connection], [], [], 0.01)[0]:  # idle: no request yet
            if IdleClosingHandler.idle_timeout_passed.is_set():
                self.close_connection = True
                return
        super().handle_one_request()

    def finish(self) -> None:
        super().finish()
        if self.close_connection and IdleClosingHandler.idle_timeout_passed.is_set():
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)  # as socketserver closes a connection
            self.connection.close()
            IdleClosingHandler.closed.set()


def test_http_kept_connection_closed_by_the_server_is_reopened():
    """A request on a kept connection that the server has meanwhile closed is re-sent on a new one, not
    failed."""
    IdleClosingHandler.idle_timeout_passed.clear()
    IdleClosingHandler.closed.clear()
    with serving(IdleClosingHandler) as base:
        KeepAliveHandler.connections = 0
        assert fetch_bytes(f"{base}/img/1", loopback(retries=0)) == b"/img/1 on connection 1"
        assert fetch_bytes(f"{base}/img/2", loopback(retries=0)) == b"/img/2 on connection 1"
        # the client now leaves its kept connection idle too long
        IdleClosingHandler.idle_timeout_passed.set()
        assert IdleClosingHandler.closed.wait(HANG_GUARD_S), "the server did not close the idle connection"
        IdleClosingHandler.idle_timeout_passed.clear()
        assert fetch_bytes(f"{base}/img/3", loopback(retries=0)) == b"/img/3 on connection 2"


class SlowImageHandler(QuietHandler):
    """/img/<n>.jpg: a real JPEG (a stand-in for a remote host); counts requests in flight. With `hold` set, a
    request is answered only once another one has been in flight beside it at some point (a slow host, whose
    first answer takes as long as a client with several threads needs to send a second request); a client
    that sends one request at a time is never held."""

    lock = threading.Condition()
    in_flight = 0
    most_in_flight = 0
    hold = False

    def do_GET(self) -> None:  # noqa: N802
        cls = SlowImageHandler
        with cls.lock:
            cls.in_flight += 1
            cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
            cls.lock.notify_all()
            if cls.hold:
                cls.lock.wait_for(lambda: cls.most_in_flight >= 2, HANG_GUARD_S)
            # done before answering: the client may send its next request as soon as it has the body
            cls.in_flight -= 1
        name = urlsplit(self.path).path.rsplit("/", 1)[-1]
        if not name.endswith(".jpg"):
            body, status = b"not found", 404
        else:
            from PIL import Image

            buffer = io.BytesIO()
            Image.new("RGB", (32, 24), (int(name[:-4]) * 9 % 256, 80, 160)).save(buffer, "JPEG")
            body, status = buffer.getvalue(), 200
        self.reply(status, body)


def test_urls_are_downloaded_concurrently_in_plan_order(tmp_path):
    """--fetch-threads overlaps downloads (several requests in flight at once) without changing a byte of the
    output; an item that fails to download is recorded and skipped in its place."""
    from shards_tools.config import build_config
    from shards_tools.run import run_sharding

    with serving(SlowImageHandler) as base:
        rows = [f"{base}/img/{n}.jpg,picture {n}" for n in range(40)] + [f"{base}/img/missing,gone"]
        (tmp_path / "urls.csv").write_text("url,caption\n" + "\n".join(rows) + "\n")
        outputs = {}
        for threads in (1, 8):
            SlowImageHandler.most_in_flight, SlowImageHandler.hold = 0, threads > 1
            out = tmp_path / f"out-{threads}"
            config = build_config(
                {
                    "input": {"modality": "image", "path": tmp_path / "urls.csv"},
                    "output": out,
                    "shard_size": 16,
                    "workers": 1,
                    "fetch": {"threads": threads, "timeout": HANG_GUARD_S, "deadline": HANG_GUARD_S},
                }
            )
            run_sharding(config, progress=False)
            outputs[threads] = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
            assert (
                SlowImageHandler.most_in_flight == 1
                if threads == 1
                else 2 <= SlowImageHandler.most_in_flight <= 8
            )
            manifest = json.loads((out / "manifest.json").read_text())
            assert manifest["totals"]["samples"] == 40
            errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
            assert [e["source"] for e in errors] == [f"{base}/img/missing"]
    assert len(outputs[1]) == 3 and outputs[1] == outputs[8]
