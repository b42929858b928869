"""Read the bytes behind a SourceItem.source: a local file, an http(s) URL or a member of a tar file.

Every failure is an ItemError (the item is skipped and recorded), never an exception that stops a run.
"""

from __future__ import annotations

import functools
import http.client
import os
import re
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

from shards_tools.config import FetchOptions
from shards_tools.items import ItemError

# A URL scheme needs two or more characters, so a Windows drive ("C:\...") or a file named "1:2.jpg"
# is not mistaken for one.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
HTTP_SCHEMES = ("http", "https")
USER_AGENT = "mmcl-shards/0.1"
# Server answers worth another try: rate limiting and server-side failures. Other 4xx are final.
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_MAX_BACKOFF_S = 2.0
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 10
_MAX_OPEN_TARS = 8


def url_scheme(source: str) -> str | None:
    """The lower-case scheme of a URL-like source (``https``, ``s3``, ``pipe``...), None for a local path."""
    match = _SCHEME.match(source)
    return match.group(1).lower() if match else None


def fetch_bytes(source: str, options: FetchOptions) -> bytes:
    """Return the content of `source`, or raise ItemError with the skip reason.

    Local paths and ``TARPATH#MEMBER`` sources are read from disk; http(s) URLs are downloaded with
    `options.timeout` (per connection attempt and per read) and up to `options.retries` retries.
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
        data = _read_local(source)
    if not data:
        raise ItemError("empty_file", f"{source}: 0 bytes")
    return data


def _read_local(source: str) -> bytes:
    """A plain file, or else the member of a tar named by ``TARPATH#MEMBER``."""
    if os.path.isfile(source):
        return _read_file(source)
    tar_and_member = split_tar_member(source)
    if tar_and_member is not None:
        return _read_tar_member(*tar_and_member)
    if os.path.isdir(source):
        raise ItemError("missing_file", f"{source}: is a directory, not a file")
    raise ItemError("missing_file", f"{source}: no such file")


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
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
    try:
        tar = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ItemError("decode_error", f"{tar_path}: not a readable tar file ({err})") from None
    members: dict[str, tarfile.TarInfo] = {}
    try:
        for info in tar:
            if info.isreg():
                members[info.name] = info
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        pass  # truncated or corrupt after this point: the members read so far stay readable
    return _OpenTar(tar, members)


_TAR_CACHE = _TarCache(_MAX_OPEN_TARS)


def _read_tar_member(tar_path: str, member: str) -> bytes:
    try:
        entry = _TAR_CACHE.get(tar_path)
    except FileNotFoundError:  # removed since the caller saw it
        raise ItemError("missing_file", f"{tar_path}: no such file") from None
    info = entry.members.get(member)
    if info is None:
        raise ItemError("missing_file", f"{tar_path}#{member}: no such member in the tar file")
    try:
        with entry.lock:
            extracted = entry.tar.extractfile(info)
            assert extracted is not None  # regular members always have a file object
            return extracted.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ItemError("decode_error", f"{tar_path}#{member}: cannot read member ({err})") from None


# --- http(s) ---------------------------------------------------------------------------------------


class _Retryable(Exception):
    """A failure that another attempt may fix; carries the message for the final ItemError."""


def _fetch_url(url: str, options: FetchOptions) -> bytes:
    """Download `url`; retry connection errors, timeouts, 429 and 5xx with a short exponential backoff."""
    failures = 0
    while True:
        try:
            return _get_once(url, options.timeout)
        except _Retryable as err:
            failures += 1
            if failures > options.retries:
                tries = f" (after {failures} attempts)" if failures > 1 else ""
                raise ItemError("fetch_error", f"{url}: {err}{tries}") from None
            time.sleep(min(0.1 * 2 ** (failures - 1), _MAX_BACKOFF_S))


def _get_once(url: str, timeout: float) -> bytes:
    """One download attempt (redirects followed). Through a proxy the environment names (http_proxy, ...)
    urllib does the request; otherwise it goes over this thread's kept-alive connection to the host."""
    try:
        parts = urllib.parse.urlsplit(url)
        proxy = _proxy_for(parts.scheme.lower(), parts.hostname or "")
        if proxy:
            return _get_via_urllib(url, timeout, {parts.scheme.lower(): proxy})
        for _ in range(_MAX_REDIRECTS + 1):
            status, body, location = _CONNECTIONS.get(parts, timeout)
            if location is None:
                break
            parts = urllib.parse.urlsplit(urllib.parse.urljoin(parts.geturl(), location))
            if parts.scheme.lower() not in HTTP_SCHEMES:
                raise ItemError("fetch_error", f"{url}: redirected to unsupported {parts.geturl()}")
        else:
            raise ItemError("fetch_error", f"{url}: more than {_MAX_REDIRECTS} redirects")
    except TimeoutError:
        raise _Retryable(f"timed out after {timeout:g}s") from None
    except (http.client.InvalidURL, ValueError) as err:  # malformed URL: another try cannot help
        raise ItemError("fetch_error", f"{url}: invalid URL ({err})") from None
    except (OSError, http.client.HTTPException) as err:  # refused or reset connections, truncated bodies
        raise _Retryable(f"{type(err).__name__}: {err}") from None
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

    def get(self, parts: urllib.parse.SplitResult, timeout: float) -> tuple[int, bytes, str | None]:
        """GET one URL: (status, body, redirect location or None)."""
        if self.pid != os.getpid():
            self.open, self.pid = {}, os.getpid()
        scheme = parts.scheme.lower()
        key = (scheme, parts.hostname or "", parts.port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        kept = self.open.pop(key, None)
        if kept is not None:
            try:
                return self._exchange(key, kept, target, timeout)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                pass  # the server closed the idle connection: resend on a new one
        factory = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        return self._exchange(key, factory(key[1], key[2], timeout=timeout), target, timeout)

    def _exchange(
        self,
        key: tuple[str, str, int | None],
        connection: http.client.HTTPConnection,
        target: str,
        timeout: float,
    ) -> tuple[int, bytes, str | None]:
        """One request and its whole answer; the connection is kept for the next one if the server allows."""
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        try:
            connection.request("GET", target, headers={"User-Agent": USER_AGENT})
            response = connection.getresponse()
            body = response.read()  # all of it, so the connection can carry the next request
        except BaseException:
            connection.close()
            raise
        if response.will_close:
            connection.close()
        else:
            self.open[key] = connection
        location = response.getheader("Location") if response.status in _REDIRECT_STATUS else None
        return response.status, body, location


_CONNECTIONS = _ThreadConnections()


def _get_via_urllib(url: str, timeout: float, proxies: dict[str, str]) -> bytes:
    """Through the proxy the environment names now (urlopen's global opener keeps the ones of its first use)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        if err.code in _RETRY_STATUS:
            raise _Retryable(f"HTTP {err.code}") from None
        raise ItemError("fetch_error", f"{url}: HTTP {err.code}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise TimeoutError from None
        raise _Retryable(str(err.reason)) from None
