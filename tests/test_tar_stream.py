"""The plain-tar header reader (shards_tools.tar_stream._ustar_members) against tarfile itself.

A local plain tar is read by mmcl's own header reader for as long as its headers are plain ustar regular
files, and by tarfile from the first header that is not. Read as a non-seekable stream, the same bytes
go through tarfile alone. Every archive below must give the same members both ways (names, bytes,
refusals): tars written by tarfile in each of its formats, with the records the header reader hands on
(pax headers, GNU long names, name prefixes, directories old and new, links, sparse members) in the middle
of a shard.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from hostile_inputs import sparse_member

from shards_tools.tar_stream import USTAR_MAGICS, Member, ShardReadError, _ustar_regular, iter_members
from shards_tools.writer import sample_bytes, tar_end

CAP = 1 << 20


def _member(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = (len(data) if kind == tarfile.REGTYPE else 0), kind, 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "000000.jpg"
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _tar(tar_format: int, odd: list[tuple[str, bytes, bytes]]) -> bytes:
    """Two ordinary samples, the `odd` members (name, data, type), two more ordinary samples."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tar_format) as tar:
        for key in ("000000", "000001"):
            _member(tar, f"{key}.jpg", b"\xff\xd8" + key.encode() * 300)
            _member(tar, f"{key}.txt", f"caption {key}".encode())
        for name, data, kind in odd:
            _member(tar, name, data, kind)
        for key in ("000003", "000004"):
            _member(tar, f"{key}.jpg", b"\xff\xd8" + key.encode() * 77)
            _member(tar, f"{key}.txt", f"caption {key}".encode())
    return out.getvalue()


LONG = "d/" * 60 + "000002.jpg"  # 130 characters: a prefix in ustar, a pax or GNU long-name record else
ARCHIVES = {
    "posix ustar, plain": lambda: _tar(tarfile.USTAR_FORMAT, []),
    "gnu, plain": lambda: _tar(tarfile.GNU_FORMAT, []),
    "ustar name prefix": lambda: _tar(tarfile.USTAR_FORMAT, [(LONG, b"long", tarfile.REGTYPE)]),
    "gnu long name": lambda: _tar(tarfile.GNU_FORMAT, [(LONG, b"long", tarfile.REGTYPE)]),
    "pax long name": lambda: _tar(tarfile.PAX_FORMAT, [(LONG, b"long", tarfile.REGTYPE)]),
    "pax non-ascii name": lambda: _tar(tarfile.PAX_FORMAT, [("00000é.jpg", b"accent", tarfile.REGTYPE)]),
    "directory and link": lambda: _tar(
        tarfile.PAX_FORMAT, [("000002", b"", tarfile.DIRTYPE), ("000002.png", b"", tarfile.SYMTYPE)]
    ),
    "old-style directory": lambda: _tar(tarfile.USTAR_FORMAT, [("000002/", b"", tarfile.AREGTYPE)]),
    "over the cap": lambda: _tar(tarfile.PAX_FORMAT, [("000002.jpg", bytes(CAP + 1), tarfile.REGTYPE)]),
    "caption over its cap": lambda: _tar(
        tarfile.PAX_FORMAT, [("000002.txt", b"x" * (2 << 20), tarfile.REGTYPE)]
    ),
}


def _read(data: bytes, *, stream: bool, path: Path) -> tuple[list[Member], str | None]:
    members: list[Member] = []
    try:
        if stream:
            members += iter_members(io.BufferedReader(io.BytesIO(data)), max_member_bytes=CAP, stream=True)
        else:
            path.write_bytes(data)
            with open(path, "rb") as handle:
                members += iter_members(handle, max_member_bytes=CAP, stream=False)
    except ShardReadError as err:
        return members, str(err)
    return members, None


@pytest.mark.parametrize("archive", list(ARCHIVES))
def test_the_header_reader_gives_what_tarfile_gives(archive: str, tmp_path: Path) -> None:
    data = ARCHIVES[archive]()
    local, local_error = _read(data, stream=False, path=tmp_path / "shard.tar")
    streamed, streamed_error = _read(data, stream=True, path=tmp_path / "unused")
    assert local_error is None
    if "cap" in archive:  # a stream stops at a refused member (the rest would be downloaded to skip)
        assert streamed_error is not None and "not read" in streamed_error
        assert [m.name for m in local[:5]] == [m.name for m in streamed]
        assert local[4].problem is not None and "over the cap" in local[4].problem
        assert [m.name for m in local[5:]] == ["000003.jpg", "000003.txt", "000004.jpg", "000004.txt"]
        assert all(m.data is not None for m in local[5:])
        return
    assert streamed_error is None
    assert local == streamed
    assert [m.name for m in local[:4]] == ["000000.jpg", "000000.txt", "000001.jpg", "000001.txt"]
    assert local[-1].data == b"caption 000004"


def test_every_header_mmcl_writes_is_one_the_header_reader_takes() -> None:
    """mmcl's shards (and webdataset's TarWriter's, the same bytes) never need tarfile's parser."""
    samples = [
        {"__key__": f"{i:06d}", "jpg": bytes(900 + i), "txt": b"a cat", "json": b"{}"} for i in range(3)
    ]
    body = b"".join(sample_bytes(s) for s in samples)
    names, offset = [], 0
    while body[offset : offset + 512] != bytes(512) and offset < len(body):
        name, size = _ustar_regular(body[offset : offset + 512])
        assert body[offset + 257 : offset + 265] in USTAR_MAGICS
        names.append(name)
        offset += 512 + -(-size // 512) * 512
    assert names == [f"{i:06d}.{ext}" for i in range(3) for ext in ("jpg", "json", "txt")]


def test_a_shard_cut_inside_a_member_is_an_error_after_the_members_before_it(tmp_path: Path) -> None:
    body = b"".join(sample_bytes({"__key__": f"{i:06d}", "jpg": bytes(3000), "txt": b"t"}) for i in range(3))
    for cut in (len(body) - 600, len(body) - 1024 - 1, len(body) - 100):  # in the data, a header, padding
        members, error = _read(body[:cut], stream=False, path=tmp_path / "cut.tar")
        assert error is not None, cut
        assert [m.name for m in members[:4]] == ["000000.jpg", "000000.txt", "000001.jpg", "000001.txt"]


def test_a_refused_member_past_the_end_of_a_cut_shard_is_reported_and_so_is_the_cut(tmp_path: Path) -> None:
    body = sample_bytes({"__key__": "000000", "jpg": bytes(3000), "txt": b"t"})
    info = tarfile.TarInfo("000001.jpg")
    info.size = 1 << 30  # octal in the header: the header reader's, refused by the cap, then cut short
    members, error = _read(
        body + info.tobuf(tarfile.USTAR_FORMAT) + bytes(512), stream=False, path=tmp_path / "a.tar"
    )
    assert [m.name for m in members] == ["000000.jpg", "000000.txt", "000001.jpg"]
    assert members[2].problem is not None and error is not None and "cut short" in error


def test_a_damaged_header_after_good_members_is_an_error(tmp_path: Path) -> None:
    body = b"".join(sample_bytes({"__key__": f"{i:06d}", "jpg": bytes(700), "txt": b"t"}) for i in range(2))
    second = len(sample_bytes({"__key__": "000000", "jpg": bytes(700), "txt": b"t"}))
    damaged = bytearray(body + tar_end(len(body)))
    damaged[second + 130] ^= 0x01  # a size digit: the checksum no longer matches
    members, error = _read(bytes(damaged), stream=False, path=tmp_path / "d.tar")
    assert [m.name for m in members] == ["000000.jpg", "000000.txt"]
    assert error is not None and "ends inside a tar header" in error


def test_a_sparse_member_in_the_middle_is_refused_and_the_rest_read(tmp_path: Path) -> None:
    head = sample_bytes({"__key__": "000000", "jpg": bytes(700), "txt": b"t"})
    tail = sample_bytes({"__key__": "000002", "jpg": bytes(700), "txt": b"t"})
    body = head + sparse_member("000001.jpg") + tail
    members, error = _read(body + tar_end(len(body)), stream=False, path=tmp_path / "s.tar")
    assert error is None
    assert [m.name for m in members] == ["000000.jpg", "000000.txt", "000001.jpg", "000002.jpg", "000002.txt"]
    assert "sparse" in members[2].problem and members[3].data == bytes(700)
