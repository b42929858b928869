"""Read samples out of tar shards that nobody vetted: local files, http(s) streams and (only when explicitly
allowed) pipe: commands, with bounded memory and time.

Every member is checked *before* it is read: a member larger than the cap (default 64 MiB; the small
.txt/.json/.cls members 1 MiB), a sparse member (a few KiB on disk that read back as gigabytes), or a name
longer than a path can be is refused and reported with its sample, which the consumer skips and counts.
tarfile's own header records (pax headers, GNU long names) are capped the same way, since tarfile reads
them whole. After a refused member in a compressed or remote stream the rest of the shard is not read
(skipping it would mean inflating or downloading what an attacker sized); in a plain local tar it is a seek.

A plain local tar is read by a short header reader for the one record shards are made of, a POSIX or GNU
ustar header of a regular file with a valid checksum and octal fields (`_ustar_regular`), at half of
tarfile's cost a sample (tarfile sums each header's checksum both ways over Python ints and builds a file
object per member: 3-5 % of a loader worker's time an image; docs/BENCHMARKS.md, "Image loader"). The
first header it does not take (pax, GNU long names, links, sparse, base-256 numbers, a bad checksum, the
end) goes to tarfile from that header on, so every other record means exactly what it means to tarfile.

Members are grouped into samples by webdataset's rule (consecutive members sharing the key, the name up to
the first dot of its base name), so a sample is what webdataset's `tarfile_to_samples` would give:
``{"__key__", "__url__", EXT: bytes, ...}``, plus ``"__problem__"`` (why a member was refused) when one was.
An http(s) shard that delivers less than 64 KiB in `http_timeout` seconds, or sends nothing for that long,
is abandoned, so a stalled server cannot hang training.
"""

from __future__ import annotations

import http.client
import io
import os
import stat
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Callable, Collection, Generator, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from shards_tools.http_client import USER_AGENT, Deadline, watched_opener
from shards_tools.shard_format import HTTP_SCHEMES, MAX_META_BYTES, META_EXTENSIONS, split_key, url_scheme

DEFAULT_MAX_MEMBER_BYTES = 64 << 20
MAX_NAME_CHARS = 4096
MAX_HEADER_BYTES = 1 << 20  # a pax header or GNU long name record (real ones are under a KiB)
DEFAULT_HTTP_TIMEOUT = 60.0
MIN_PROGRESS_BYTES = 64 << 10  # an http shard must deliver this much per http_timeout

Handler = Callable[[Exception], bool]


class ShardReadError(Exception):
    """A shard that cannot be (fully) read: it cannot be opened, is not a tar, is cut short or stalled."""


class PipeRefused(Exception):
    """A pipe: URL reached the opener without being allowed: a bug upstream, never skipped like bad data."""


class _RefusedHeader(tarfile.TarError):
    """A pax or GNU long-name record too large to read (tarfile would read it whole)."""


class _CappedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized header records before tarfile reads them."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        special = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                   tarfile.SOLARIS_XHDTYPE)  # fmt: skip
        if self.type in special and self.size > MAX_HEADER_BYTES:
            raise _RefusedHeader(
                f"a {self.size:,}-byte tar header record (more than {MAX_HEADER_BYTES:,} bytes)"
            )
        return super()._proc_member(tarfile_)


def open_tarfile(fileobj: BinaryIO, mode: str = "r:*") -> tarfile.TarFile:
    """A TarFile over `fileobj` that refuses oversized header records; `mode` as tarfile.open's ("r|*" for
    non-seekable input, "r:" where the tar is known to be uncompressed)."""
    return tarfile.open(fileobj=fileobj, mode=mode, tarinfo=_CappedTarInfo)


def member_problem(name: str, size: int, max_member_bytes: int, *, sparse: bool = False) -> str | None:
    """Why a regular member must not be read, or None. Checked on the header alone, before any data."""
    if len(name) > MAX_NAME_CHARS:
        return f"member name of {len(name):,} characters"
    if sparse:
        return f"{name}: a sparse member ({size:,} bytes when read back)"
    limit = MAX_META_BYTES if split_key(name)[1] in META_EXTENSIONS else max_member_bytes
    if size > limit:
        return f"{name}: {size:,} bytes, over the cap of {limit:,} (--max-bytes / data.max_member_bytes)"
    return None


@dataclass
class Member:
    """One regular member: its data, or None with the reason it was refused."""

    name: str
    data: bytes | None
    problem: str | None = None


def iter_members(
    fileobj: BinaryIO, *, max_member_bytes: int, stream: bool, wanted: Callable[[str], bool] | None = None
) -> Iterator[Member]:
    """The regular members of a tar in order (a member `wanted` rejects comes with data None, unread).

    Raises ShardReadError when the tar cannot be parsed, a member is cut short, or the archive ends inside
    a header (tarfile stops there without a word; detected for seekable plain tars).
    """
    try:
        resumed = not stream and (yield from _ustar_members(fileobj, max_member_bytes, wanted))
        # the rest (all of a compressed or streamed tar) through tarfile; a plain tar the header reader
        # began is known to be uncompressed, so tarfile must not try to inflate its middle
        with open_tarfile(fileobj, "r:" if resumed else "r|*" if stream else "r:*") as tar:
            plain = tar.fileobj is fileobj  # not inflated through gzip/bz2/xz, not a stream
            for info in tar:
                tar.members = []  # keep no index: memory must not grow with the shard
                if not info.isreg():
                    continue
                problem = member_problem(info.name, info.size, max_member_bytes, sparse=info.issparse())
                if problem is not None:
                    yield Member(info.name, None, problem)
                    if stream or not plain:
                        raise ShardReadError(
                            f"{problem}; the rest of this compressed or streamed shard is not read"
                        )
                    continue
                if wanted is not None and not wanted(info.name):
                    yield Member(info.name, None)
                    continue
                try:
                    data = tar.extractfile(info).read()
                except tarfile.ReadError:
                    raise ShardReadError(f"{info.name}: cut short (the shard is truncated)") from None
                yield Member(info.name, data)
            if not stream and plain:
                _check_end(tar)
    except ShardReadError:
        raise
    except Exception as err:  # tarfile, zlib, bz2, lzma and their parsers: a damaged or hostile archive
        raise ShardReadError(f"not a readable tar ({type(err).__name__}: {_short(err)})") from None


USTAR_MAGICS = (b"ustar\x0000", b"ustar  \x00")  # POSIX, GNU
# the numbers tarfile parses in every header: checksum, mode, uid, gid, size, mtime, devmajor, devminor
_OCTAL_FIELDS = tuple(slice(a, b) for a, b in ((148, 156), (100, 108), (108, 116), (116, 124), (124, 136),
                                                (136, 148), (329, 337), (337, 345)))  # fmt: skip
_NOT_OCTAL = bytes(b for b in range(256) if b not in b"01234567")


def _ustar_members(
    fileobj: BinaryIO, max_member_bytes: int, wanted: Callable[[str], bool] | None
) -> Generator[Member, None, bool]:
    """iter_members over a plain seekable tar for as long as its headers are `_ustar_regular`; returns
    whether it read any, with `fileobj` at the first header that is not (or at the end), for tarfile to go
    on from."""
    offset = start = fileobj.tell()
    end = fileobj.seek(0, os.SEEK_END)
    fileobj.seek(offset)
    while True:
        found = _ustar_regular(fileobj.read(tarfile.BLOCKSIZE))
        if found is None:
            fileobj.seek(offset)
            return offset != start
        name, size = found
        offset += tarfile.BLOCKSIZE + size + -size % tarfile.BLOCKSIZE
        problem = member_problem(name, size, max_member_bytes)
        if problem is not None or (wanted is not None and not wanted(name)):
            yield Member(name, None, problem)
        else:
            data = fileobj.read(size)
            if len(data) != size:
                raise ShardReadError(f"{name}: cut short (the shard is truncated)")
            yield Member(name, data)
        if offset > end:  # the member's data or padding runs past the end of the file
            raise ShardReadError(f"{name}: cut short (the shard is truncated)")
        fileobj.seek(offset)


def _ustar_regular(header: bytes) -> tuple[str, int] | None:
    """(name, size) when `header` is a ustar header of a regular file that tarfile reads the same way: full
    block, ustar magic, type '0' (or NUL, not naming a directory), no name prefix, every number in octal
    digits, the checksum as an unsigned sum. None for anything else: tarfile decides what it is."""
    if (
        len(header) != tarfile.BLOCKSIZE
        or header[257:265] not in USTAR_MAGICS
        or header[156:157] not in (tarfile.REGTYPE, tarfile.AREGTYPE)
        or header[345] != 0
    ):
        return None
    numbers = []
    for field in _OCTAL_FIELDS:
        digits = header[field].split(b"\0", 1)[0].strip(b" ")
        if digits.translate(None, _NOT_OCTAL) != digits:
            return None
        numbers.append(int(digits, 8) if digits else 0)
    if numbers[0] != sum(header) - sum(header[148:156]) + 8 * 0x20:
        return None
    name = header[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    if header[156:157] == tarfile.AREGTYPE and name.endswith("/"):
        return None
    return name, numbers[4]


def _check_end(tar: tarfile.TarFile) -> None:
    """tarfile ends iteration silently at a header it cannot parse past the first member; a complete tar
    has nothing there but its zero end blocks (or nothing at all)."""
    fileobj = tar.fileobj
    fileobj.seek(tar.offset)
    block = fileobj.read(tarfile.BLOCKSIZE)
    if block and block != bytes(len(block)) or 0 < len(block) < tarfile.BLOCKSIZE:
        raise ShardReadError(
            f"ends inside a tar header at byte {tar.offset:,}: the shard is truncated or damaged"
        )


@dataclass(frozen=True)
class ReadOptions:
    """How far a reader trusts a shard: the member cap, whether pipe: URLs may run, the http stall limit."""

    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    allow_pipe: bool = False
    http_timeout: float = DEFAULT_HTTP_TIMEOUT


DEFAULT_READ_OPTIONS = ReadOptions()


def iter_samples(
    url: str,
    *,
    handler: Handler,
    options: ReadOptions = DEFAULT_READ_OPTIONS,
    extensions: Collection[str] | None = None,
) -> Iterator[dict]:
    """The samples of one shard, in tar order, grouped by key (see the module docstring).

    `extensions`: keep only members with these extensions (others are not read into memory), and only the
    first of each per sample. A shard that cannot be opened or read further goes to `handler` as a
    ShardReadError naming `url` (True: go on, the samples read before it were yielded); a pipe: URL without
    `options.allow_pipe` raises PipeRefused, whatever the handler says.
    """
    keep = None if extensions is None else {e.lower() for e in extensions}
    sample: dict | None = None
    try:
        with open_shard(url, allow_pipe=options.allow_pipe, http_timeout=options.http_timeout) as (
            fileobj,
            stream,
        ):
            members = iter_members(
                fileobj,
                max_member_bytes=options.max_member_bytes,
                stream=stream,
                wanted=None if keep is None else (lambda name: split_key(name)[1] in keep),
            )
            for member in members:
                key, ext = split_key(member.name)
                if not ext:
                    continue  # no extension: not part of any sample (webdataset skips these too)
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if member.problem is not None:
                    sample.setdefault("__problem__", member.problem)
                elif member.data is not None and ext not in sample:
                    sample[ext] = member.data
    except (ShardReadError, OSError) as err:
        if sample is not None:
            yield sample
            sample = None
        if not handler(ShardReadError(f"{url}: {_short(err)}")):
            raise
    if sample is not None:
        yield sample


class open_shard:  # noqa: N801 (a context manager used like open())
    """`with open_shard(url, ...) as (fileobj, stream)`: a binary stream of the shard's bytes and whether it
    is a non-seekable stream. Local paths must be regular files (a FIFO or device would block or never
    end); http(s) is read with the stall rule of the module docstring; pipe: runs only with `allow_pipe`."""

    def __init__(
        self, url: str, *, allow_pipe: bool = False, http_timeout: float = DEFAULT_HTTP_TIMEOUT
    ) -> None:
        self.url = url
        self.allow_pipe = allow_pipe
        self.http_timeout = http_timeout
        self.closers: list[Callable[[], None]] = []

    def __enter__(self) -> tuple[BinaryIO, bool]:
        scheme = url_scheme(self.url)
        if scheme in HTTP_SCHEMES:
            raw = _open_http(self.url, self.http_timeout)
            self.closers.append(raw.close)
            return io.BufferedReader(raw, 1 << 16), True
        if scheme == "pipe":
            if not self.allow_pipe:
                raise PipeRefused(f"{self.url}: pipe: URLs run a shell command and are not allowed here")
            process = subprocess.Popen(self.url[len("pipe:") :], shell=True, stdout=subprocess.PIPE)
            self.closers.append(lambda: _end_process(process))
            return process.stdout, True
        if scheme not in (None, "file"):
            raise ShardReadError(f"unsupported URL scheme {scheme!r}")
        path = self.url[len("file://") :] if scheme == "file" else self.url
        handle = open(_regular_file(path), "rb")  # noqa: SIM115 (closed in __exit__)
        self.closers.append(handle.close)
        return handle, False

    def __exit__(self, *exc: object) -> None:
        for close in reversed(self.closers):
            close()


def _regular_file(path: str) -> int:
    """An open descriptor of `path`, which must be a regular file (opened without blocking on a FIFO)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ShardReadError("not a regular file")
    os.set_blocking(fd, True)
    return fd


def _end_process(process: subprocess.Popen) -> None:
    process.stdout.close()
    process.kill()
    process.wait()


class _StallGuard(io.RawIOBase):
    """An http response body that raises TimeoutError when the server stalls or trickles: each read waits at
    most `timeout` seconds (the socket timeout), and every `timeout` seconds at least MIN_PROGRESS_BYTES
    must have arrived."""

    def __init__(self, response, timeout: float) -> None:
        self.response = response
        self.timeout = timeout
        self.window_start = time.monotonic()
        self.window_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        # read1: one socket read at most, so a trickle returns byte by byte instead of filling the buffer
        data = self.response.read1(len(buffer))
        count = len(data)
        buffer[:count] = data
        self.window_bytes += count
        now = time.monotonic()
        if now - self.window_start >= self.timeout:
            if self.window_bytes < MIN_PROGRESS_BYTES:
                raise TimeoutError(
                    f"stalled: {self.window_bytes} bytes in {now - self.window_start:.0f} s "
                    f"(data.http_timeout {self.timeout:g} s)"
                )
            self.window_start, self.window_bytes = now, 0
        return count

    def close(self) -> None:
        self.response.close()
        super().close()


def _open_http(url: str, timeout: float) -> _StallGuard:
    """GET `url` (proxies from the environment honoured); the status line and headers must arrive within
    `timeout` seconds in all."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with Deadline(timeout) as deadline:
        try:
            response = watched_opener(deadline).open(request, timeout=timeout)
        except (OSError, http.client.HTTPException) as err:  # HTTPException: a status line cut short
            if deadline.expired:
                raise TimeoutError(f"no answer within data.http_timeout {timeout:g} s") from None
            raise ShardReadError(f"cannot open ({_short(err)})") from None
    return _StallGuard(response, timeout)


def _short(err: Exception, limit: int = 300) -> str:
    text = str(err)
    return text if len(text) <= limit else text[:limit] + "..."
