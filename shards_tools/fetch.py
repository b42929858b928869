"""Read the bytes behind a SourceItem.source: a local file, an http(s) URL or a member of a tar file.

Every failure is an ItemError (the item is skipped and recorded), never an exception that stops a run. Nothing
is read past `max_bytes` (a file, a URL body whatever its Content-Length says, a tar member judged by its
header), and a URL gets `deadline` seconds in all, retries included, however slowly its server trickles.
"""

from __future__ import annotations

import functools
import http.client
import os
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field

from shards_tools.config import FetchOptions
from shards_tools.http_client import (
    USER_AGENT,
    BodyTooLarge,
    Deadline,
    read_body,
    watch_connection,
    watched_opener,
)
from shards_tools.items import ItemError
from shards_tools.shard_format import HTTP_SCHEMES, url_scheme
from shards_tools.tar_stream import open_tarfile

# Server answers worth another try: rate limiting and server-side failures. Other 4xx are final.
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_MAX_BACKOFF_S = 2.0
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 10
_MAX_OPEN_TARS = 8
_MAX_DRAINED = 1 << 16  # a redirect's or error's body is read (to keep the connection) up to this much


def fetch_bytes(source: str, options: FetchOptions) -> bytes:
    """Return the content of `source`, or raise ItemError with the skip reason.

    Local paths and ``TARPATH#MEMBER`` sources are read from disk; http(s) URLs are downloaded with
    `options.timeout` (per connection attempt and per read), up to `options.retries` retries and
    `options.deadline` seconds in all. More than `options.max_bytes` is never read (reason ``too_large``).
    """
    if not source:
        raise ItemError("missing_file", "empty source")
    scheme = url_scheme(source)
    if scheme in HTTP_SCHEMES:
        data = _fetch_url(source, options)
    elif scheme is not None:
        raise ItemError(
            "unsupported_url", f"{source}: scheme {scheme}: is not supported (use http(s) or a local path)"
        )
    else:
        data = _read_local(source, options.max_bytes)
    if not data:
        raise ItemError("empty_file", f"{source}: 0 bytes")
    return data


def _too_large(what: str, size: int, max_bytes: int) -> ItemError:
    return ItemError("too_large", f"{what}: {size:,} bytes, over --max-bytes {max_bytes:,}")


def _read_local(source: str, max_bytes: int) -> bytes:
    """A plain file, or else the member of a tar named by ``TARPATH#MEMBER``."""
    if os.path.isfile(source):
        return _read_file(source, max_bytes)
    tar_and_member = split_tar_member(source)
    if tar_and_member is not None:
        return _read_tar_member(*tar_and_member, max_bytes)
    if os.path.isdir(source):
        raise ItemError("missing_file", f"{source}: is a directory, not a file")
    raise ItemError("missing_file", f"{source}: no such file")


def _read_file(path: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise _too_large(path, size, max_bytes)
            data = f.read(max_bytes + 1)  # the file may have grown since fstat
            if len(data) > max_bytes:
                raise _too_large(path, len(data), max_bytes)
            return data
    except FileNotFoundError:  # removed between the check and the read
        raise ItemError("missing_file", f"{path}: no such file") from None
    except OSError as err:
        raise ItemError("fetch_error", f"{path}: cannot read: {err.strerror or err}") from None


def split_tar_member(source: str) -> tuple[str, str] | None:
    """Split ``TARPATH#MEMBER`` at the first ``#`` whose left side is an existing file; None if none is.

    Trying each ``#`` in turn lets both the tar path and the member name contain ``#``.
    """
    start = 0
    while (cut := source.find("#", start)) != -1:
        if os.path.isfile(source[:cut]):
            return source[:cut], source[cut + 1 :]
        start = cut + 1
    return None


# --- tar members -----------------------------------------------------------------------------------


@dataclass
class _OpenTar:
    """An open tar file and its member index; the lock serialises reads that share the file position."""

    tar: tarfile.TarFile
    members: dict[str, tarfile.TarInfo]
    lock: threading.Lock = field(default_factory=threading.Lock)


class _TarCache:
    """The few tar files this process read last, kept open with their member index.

    A worker reading thousands of members of one shard scans the shard once instead of once per member.
    Entries are keyed by path, size and mtime (a rewritten tar is re-indexed) and belong to the process
    that opened them: after a fork the child starts empty rather than share file offsets with its parent.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[tuple[str, int, int], _OpenTar] = OrderedDict()
        self.pid = os.getpid()
        self.lock = threading.Lock()

    def get(self, tar_path: str) -> _OpenTar:
        stat = os.stat(tar_path)
        key = (os.path.realpath(tar_path), stat.st_size, stat.st_mtime_ns)
        with self.lock:
            if self.pid != os.getpid():
                self.entries = OrderedDict()
                self.pid = os.getpid()
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
                return entry
            entry = _open_tar(tar_path)
            self.entries[key] = entry
            while len(self.entries) > self.capacity:
                _, evicted = self.entries.popitem(last=False)
                evicted.tar.close()
            return entry


def _open_tar(tar_path: str) -> _OpenTar:
    """Open a (possibly compressed) tar and index its regular members; a truncated tar keeps what it has."""
    handle = open(tar_path, "rb")  # closed with the TarFile when the cache evicts it
    try:
        tar = open_tarfile(handle)
    except Exception as err:  # tarfile and its decompressors: a damaged or hostile archive
        handle.close()
        raise ItemError(
            "decode_error", f"{tar_path}: not a readable tar file ({type(err).__name__}: {err})"
        ) from None
    tar._extfileobj = False  # the TarFile owns the handle: close() closes it
    members: dict[str, tarfile.TarInfo] = {}
    try:
        for info in tar:
            if info.isreg():
                members[info.name] = info
    except Exception:  # truncated or corrupt after this point: the members read so far stay readable
        pass
    return _OpenTar(tar, members)


_TAR_CACHE = _TarCache(_MAX_OPEN_TARS)


def _read_tar_member(tar_path: str, member: str, max_bytes: int) -> bytes:
    try:
        entry = _TAR_CACHE.get(tar_path)
    except FileNotFoundError:  # removed since the caller saw it
        raise ItemError("missing_file", f"{tar_path}: no such file") from None
    info = entry.members.get(member)
    if info is None:
        raise ItemError("missing_file", f"{tar_path}#{member}: no such member in the tar file")
    if info.issparse():
        raise ItemError(
            "decode_error", f"{tar_path}#{member}: a sparse member ({info.size:,} bytes when read back)"
        )
    if info.size > max_bytes:
        raise _too_large(f"{tar_path}#{member}", info.size, max_bytes)
    try:
        with entry.lock:
            extracted = entry.tar.extractfile(info)
            assert extracted is not None  # regular members always have a file object
            return extracted.read()
    except Exception as err:  # tarfile and its decompressors on a damaged archive
        raise ItemError(
            "decode_error", f"{tar_path}#{member}: cannot read member ({type(err).__name__}: {err})"
        ) from None


# --- http(s) ---------------------------------------------------------------------------------------


class _Retryable(Exception):
    """A failure that another attempt may fix; carries the message for the final ItemError."""


def _fetch_url(url: str, options: FetchOptions) -> bytes:
    """Download `url`; retry connection errors, timeouts, 429 and 5xx with a short exponential backoff, all
    within `options.deadline` seconds."""
    failures = 0
    with Deadline(options.deadline) as deadline:
        while True:
            try:
                return _get_once(url, options, deadline)
            except _Retryable as err:
                if deadline.expired:
                    raise ItemError(
                        "fetch_error", f"{url}: not done within --url-deadline {options.deadline:g}s"
                    ) from None
                failures += 1
                if failures > options.retries:
                    tries = f" (after {failures} attempts)" if failures > 1 else ""
                    raise ItemError("fetch_error", f"{url}: {err}{tries}") from None
                time.sleep(min(0.1 * 2 ** (failures - 1), _MAX_BACKOFF_S, deadline.remaining()))


def _get_once(url: str, options: FetchOptions, deadline: Deadline) -> bytes:
    """One download attempt (redirects followed). Through a proxy the environment names (http_proxy, ...)
    urllib does the request; otherwise it goes over this thread's kept-alive connection to the host."""
    timeout = options.timeout
    try:
        parts = urllib.parse.urlsplit(url)
        proxy = _proxy_for(parts.scheme.lower(), parts.hostname or "")
        if proxy:
            status, body = _get_via_urllib(url, options, deadline, {parts.scheme.lower(): proxy})
        else:
            for _ in range(_MAX_REDIRECTS + 1):
                status, body, location = _CONNECTIONS.get(parts, options, deadline)
                if location is None:
                    break
                parts = urllib.parse.urlsplit(urllib.parse.urljoin(parts.geturl(), location))
                if parts.scheme.lower() not in HTTP_SCHEMES:
                    raise ItemError("fetch_error", f"{url}: redirected to unsupported {parts.geturl()}")
            else:
                raise ItemError("fetch_error", f"{url}: more than {_MAX_REDIRECTS} redirects")
    except BodyTooLarge as err:
        raise ItemError("too_large", f"{url}: {err} (--max-bytes)") from None
    except TimeoutError:
        raise _Retryable(f"timed out after {timeout:g}s") from None
    except (http.client.InvalidURL, ValueError) as err:  # malformed URL: another try cannot help
        raise ItemError("fetch_error", f"{url}: invalid URL ({err})") from None
    except (OSError, http.client.HTTPException) as err:  # refused or reset connections, truncated bodies
        raise _Retryable(f"{type(err).__name__}: {err}") from None
    if deadline.expired:  # a body read "to the end" may have ended because the deadline shut the socket
        raise _Retryable("deadline passed")
    if status in _RETRY_STATUS:
        raise _Retryable(f"HTTP {status}")
    if status != 200:
        raise ItemError("fetch_error", f"{url}: HTTP {status}")
    return body


def _proxy_for(scheme: str, host: str) -> str | None:
    """The proxy the environment names for `scheme` (http_proxy, ...), unless no_proxy exempts `host`."""
    proxy = _environment_proxies(tuple(map(os.environ.get, _PROXY_VARIABLES))).get(scheme)
    return proxy if proxy and not urllib.request.proxy_bypass(host) else None


# What urllib reads for an http(s) proxy. getproxies() decodes the whole environment, which took a third
# of a kept-alive request's CPU, so it is called again only when one of these changes.
_PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "REQUEST_METHOD")


@functools.lru_cache(maxsize=8)
def _environment_proxies(_variables: tuple[str | None, ...]) -> dict[str, str]:
    return urllib.request.getproxies()


class _ThreadConnections(threading.local):
    """Each thread's open connections, one per (scheme, host, port), reused from request to request.

    Opening a TCP (and TLS) connection per image costs both sides more than the request itself; like
    urllib3's pool, a connection is kept while the server allows it (HTTP/1.1 keep-alive) and a request
    on a kept connection that the server has meanwhile closed is re-sent once on a fresh one. Connections
    belong to the process that opened them: a forked child starts with none.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.open: dict[tuple[str, str, int | None], http.client.HTTPConnection] = {}

    def get(
        self, parts: urllib.parse.SplitResult, options: FetchOptions, deadline: Deadline
    ) -> tuple[int, bytes, str | None]:
        """GET one URL: (status, body, redirect location or None); a body over `options.max_bytes` raises
        BodyTooLarge, and `deadline` shuts the connection down when it passes."""
        if self.pid != os.getpid():
            self.open, self.pid = {}, os.getpid()
        scheme = parts.scheme.lower()
        key = (scheme, parts.hostname or "", parts.port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        kept = self.open.pop(key, None)
        if kept is not None:
            try:
                return self._exchange(key, kept, target, options, deadline)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if deadline.expired:
                    raise
                # the server closed the idle connection: resend on a new one
        factory = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        connection = factory(key[1], key[2], timeout=options.timeout)
        watch_connection(connection, deadline)
        return self._exchange(key, connection, target, options, deadline)

    def _exchange(
        self,
        key: tuple[str, str, int | None],
        connection: http.client.HTTPConnection,
        target: str,
        options: FetchOptions,
        deadline: Deadline,
    ) -> tuple[int, bytes, str | None]:
        """One request and its whole answer; the connection is kept for the next one if the server allows."""
        connection.timeout = options.timeout
        deadline.watch(connection.sock)  # a kept connection: opened under an earlier deadline
        if connection.sock is not None:
            connection.sock.settimeout(options.timeout)
        try:
            connection.request("GET", target, headers={"User-Agent": USER_AGENT})
            response = connection.getresponse()
            # all of the body, so that the connection can carry the next request
            body = read_body(response, options.max_bytes if response.status == 200 else _MAX_DRAINED)
        except BaseException:
            connection.close()
            raise
        if response.will_close or deadline.expired:
            connection.close()
        else:
            self.open[key] = connection
        location = response.getheader("Location") if response.status in _REDIRECT_STATUS else None
        return response.status, body, location


_CONNECTIONS = _ThreadConnections()


def _get_via_urllib(
    url: str, options: FetchOptions, deadline: Deadline, proxies: dict[str, str]
) -> tuple[int, bytes]:
    """Through the proxy the environment names now (urlopen's global opener keeps the ones of its first
    use)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with watched_opener(deadline, proxies).open(request, timeout=options.timeout) as response:
            return response.status, read_body(response, options.max_bytes)
    except urllib.error.HTTPError as err:
        err.close()
        return err.code, b""
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise TimeoutError from None
        raise _Retryable(str(err.reason)) from None
