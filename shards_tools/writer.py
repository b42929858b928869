"""Write one planned shard: fetch, encode and pack each item, then publish the tar atomically.

A shard is written to a hidden temporary name, flushed to disk and renamed; only then is its record
(count, bytes, sha256, the items it skipped and why) written beside it under `_progress/`. A killed run
therefore leaves either a complete shard with its record or nothing that a re-run would keep.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

from shards_tools.config import ShardConfig
from shards_tools.encode import EncodedMedia, check_captions, encode_audio, encode_image
from shards_tools.fetch import HTTP_SCHEMES, fetch_bytes, url_scheme
from shards_tools.items import ItemError
from shards_tools.plan import PlannedItem, ShardPlan

TAR_MTIME = 0  # fixed member timestamps make shards byte-reproducible (an int: a float costs a pax header)


def sample_bytes(sample: dict[str, bytes]) -> bytes:
    """One sample as the tar members `KEY.EXT`, extensions sorted: the bytes webdataset's
    `TarWriter(encoder=False, mtime=0, user="mmcl", group="mmcl")` writes for it (tarfile's default pax
    format, plain ustar headers for ASCII names; mode 0444); tested against it. The stdlib does it here
    because importing webdataset imports torch: ~3 s and ~0.8 GB in every `mmcl shard` process. Being plain
    bytes, a shard's samples can be encoded in pieces by several workers and joined in order."""
    key = sample["__key__"]
    members = []
    for ext in sorted(k for k in sample if k != "__key__"):
        data = sample[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
        info.uname = info.gname = "mmcl"
        members += [
            info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"),
            data,
            _padding(len(data), tarfile.BLOCKSIZE),
        ]
    return b"".join(members)


def tar_end(size: int) -> bytes:
    """What closes a tar of `size` bytes of members: two zero blocks, then zeros up to a whole record,
    as tarfile writes them."""
    return bytes(2 * tarfile.BLOCKSIZE) + _padding(size + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE)


def _padding(size: int, unit: int) -> bytes:
    return bytes(-size % unit)


PROGRESS_DIR = "_progress"


@dataclass
class ShardJob:
    """Everything a worker needs besides the plan; small and picklable (sent once per shard)."""

    config: ShardConfig
    class_index: dict[str, int] = field(default_factory=dict)
    noise_active: bool = False


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def record_path(output: Path, name: str) -> Path:
    return output / PROGRESS_DIR / f"{name}.json"


def open_new(path: Path) -> BinaryIO:
    """Create `path` for writing, never through a link: in a shared output folder another user could have
    put a symlink where a temporary file is about to be written. A leftover file of that name (a killed run
    with the same pid) is removed first; removing a link removes the link, not its target."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        os.unlink(path)
        fd = os.open(path, flags, 0o644)
    return os.fdopen(fd, "wb")


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes under a temporary name in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open_new(tmp) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_item(entry: PlannedItem, job: ShardJob) -> bytes:
    """The item's media bytes, or ItemError: a problem found while reading the input, no usable caption
    (checked first, so nothing is downloaded for an item that is skipped anyway), or the fetch's."""
    if entry.item.problem is not None:
        raise entry.item.problem
    check_captions(entry.captions)
    return fetch_bytes(entry.item.source, job.config.fetch)


def fetched_items(
    items: list[PlannedItem], job: ShardJob
) -> Iterator[tuple[PlannedItem, Callable[[], bytes]]]:
    """Each item with a call returning its bytes (or raising ItemError), in plan order.

    URLs are downloaded by up to `fetch.threads` threads, at most 2 x threads items ahead of the encoder,
    so waiting on the network overlaps with encoding; local files are read in order, in this thread.
    """
    threads = job.config.fetch.threads
    if threads == 1 or not any(url_scheme(entry.item.source or "") in HTTP_SCHEMES for entry in items):
        for entry in items:
            yield entry, partial(fetch_item, entry, job)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="fetch") as pool:
        pending: deque[tuple[PlannedItem, Future]] = deque()
        upcoming = iter(items)
        for entry in itertools.islice(upcoming, 2 * threads):
            pending.append((entry, pool.submit(fetch_item, entry, job)))
        while pending:
            entry, future = pending.popleft()
            for more in itertools.islice(upcoming, 1):
                pending.append((more, pool.submit(fetch_item, more, job)))
            yield entry, future.result


def encode_item(entry: PlannedItem, job: ShardJob, raw: bytes) -> dict[str, bytes | str]:
    """Turn one planned item and its bytes into a WebDataset sample, or raise ItemError saying why it is
    skipped."""
    item = entry.item
    captions = check_captions(entry.captions)
    media: EncodedMedia
    if job.config.modality == "image":
        media = encode_image(raw, job.config.image)
    else:
        media = encode_audio(raw, job.config.audio)

    record: dict = {**item.meta, **media.meta, "key": entry.key, "source": item.source, "text": captions}
    sample: dict[str, bytes | str] = {
        "__key__": entry.key,
        media.extension: media.data,
        "txt": captions[0].encode("utf-8"),
    }
    if item.label is not None:
        record["label"] = item.label
        if item.label in job.class_index:
            record["label_index"] = job.class_index[item.label]
            sample["cls"] = str(job.class_index[item.label]).encode("ascii")
    if job.noise_active:
        record["noisy"] = entry.noisy
        if entry.noisy:
            record["original_text"] = check_captions(entry.original_captions or [])
    sample["json"] = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return sample


def encoded_samples(items: list[PlannedItem], job: ShardJob, errors: list[dict]) -> Iterator[bytes]:
    """Each good item as its tar members, in plan order; a skipped item is appended to `errors` with its
    reason."""
    for entry, raw in fetched_items(items, job):
        try:
            sample = encode_item(entry, job, raw())
        except ItemError as err:
            errors.append(
                {"key": entry.key, "source": entry.item.source, "reason": err.reason, "detail": err.detail}
            )
            continue
        except Exception as err:  # whatever one item's bytes make a decoder or the JSON writer raise
            detail = f"{type(err).__name__}: {str(err)[:300]}"
            errors.append(
                {"key": entry.key, "source": entry.item.source, "reason": "decode_error", "detail": detail}
            )
            continue
        yield sample_bytes(sample)


class ShardFile:
    """A shard being written: samples go to a hidden temporary file; `publish` closes the tar, flushes it to
    disk, renames it to its final name and then stores its record beside it."""

    def __init__(self, job: ShardJob, index: int) -> None:
        self.output = Path(job.config.output)
        self.index = index
        self.name = shard_name(job.config.prefix, index)
        self.tmp = self.output / f".{self.name}.tmp-{os.getpid()}"
        self.stream = open_new(self.tmp)
        self.digest = hashlib.sha256()
        self.size = 0
        self.count = 0

    def write(self, data: bytes, samples: int = 1) -> None:
        self.stream.write(data)
        self.digest.update(data)
        self.size += len(data)
        self.count += samples

    def append(self, piece: Path, samples: int) -> None:
        """Move a piece file's samples to the end of the shard."""
        with open(piece, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                self.write(block, samples=0)
        self.count += samples
        piece.unlink()

    def publish(self, items: int, errors: list[dict]) -> dict:
        """Finish the shard; returns its record (count, bytes, sha256, the items skipped and why)."""
        self.write(tar_end(self.size), samples=0)
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        os.replace(self.tmp, self.output / self.name)
        record = {
            "name": self.name,
            "index": self.index,
            "count": self.count,
            "items": items,
            "bytes": self.size,
            "sha256": self.digest.hexdigest(),
            "errors": errors,
        }
        write_atomic(
            record_path(self.output, self.name), json.dumps(record, ensure_ascii=False).encode("utf-8")
        )
        return record

    def discard(self) -> None:
        self.stream.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(plan: ShardPlan, job: ShardJob) -> dict:
    """Write shard `plan.index` whole; returns (and stores) its record. Runs in a worker process."""
    errors: list[dict] = []
    shard = ShardFile(job, plan.index)
    try:
        for data in encoded_samples(plan.items, job, errors):
            shard.write(data)
    except BaseException:
        shard.discard()
        raise
    return shard.publish(len(plan.items), errors)


@dataclass
class ShardPiece:
    """Consecutive items of shard `index`, encoded on their own when a shard is split across workers."""

    index: int
    piece: int
    pieces: int
    items: list[PlannedItem]


@dataclass
class EncodedPiece:
    """A piece's samples, written as tar members to a temporary file beside the shard (joined in piece order,
    the pieces are the shard's bytes), and the items it skipped."""

    index: int
    piece: int
    pieces: int
    items: int
    count: int
    path: Path
    errors: list[dict]


def piece_files(job: ShardJob, index: int) -> Path:
    """What the temporary piece files of shard `index` are named with, before the piece number and worker pid;
    matched by the re-run's clean-up of `.NAME.tmp-*`."""
    return Path(job.config.output) / f".{shard_name(job.config.prefix, index)}.tmp-piece"


def encode_piece(piece: ShardPiece, job: ShardJob) -> EncodedPiece:
    """Encode one piece of a split shard to a temporary file; the sharding process joins the pieces. Runs in a
    worker process. On disk, not in memory: pieces that finish before one ahead of them wait there."""
    prefix = piece_files(job, piece.index)
    path = prefix.with_name(f"{prefix.name}{piece.piece:05d}-{os.getpid()}")
    errors: list[dict] = []
    count = 0
    with open_new(path) as stream:
        for data in encoded_samples(piece.items, job, errors):
            stream.write(data)
            count += 1
    return EncodedPiece(piece.index, piece.piece, piece.pieces, len(piece.items), count, path, errors)


@dataclass
class _JoiningShard:
    file: ShardFile
    waiting: dict[int, EncodedPiece] = field(default_factory=dict)  # arrived before a piece ahead of them
    errors: list[dict] = field(default_factory=list)
    next_piece: int = 0
    items: int = 0


class PieceJoiner:
    """Writes split shards from their pieces, which arrive in any order: each piece is appended as soon as
    every piece before it is in, and a shard is published with its last. The bytes are those `write_shard`
    writes for the whole shard."""

    def __init__(self, job: ShardJob) -> None:
        self.job = job
        self.shards: dict[int, _JoiningShard] = {}
        self.unpublished: set[int] = set()  # split shards with pieces sent out

    def sent(self, piece: ShardPiece) -> ShardPiece:
        """Note a piece going out to a worker, so that `discard` knows its shard's files."""
        self.unpublished.add(piece.index)
        return piece

    def add(self, piece: EncodedPiece) -> dict | None:
        """Take one piece; returns the shard's record when this piece completed it."""
        if piece.index not in self.shards:
            self.shards[piece.index] = _JoiningShard(ShardFile(self.job, piece.index))
        shard = self.shards[piece.index]
        shard.waiting[piece.piece] = piece
        while shard.next_piece in shard.waiting:
            ready = shard.waiting.pop(shard.next_piece)
            shard.file.append(ready.path, ready.count)
            shard.errors.extend(ready.errors)
            shard.items += ready.items
            shard.next_piece += 1
        if shard.next_piece < piece.pieces:
            return None
        del self.shards[piece.index]
        self.unpublished.discard(piece.index)
        return shard.file.publish(shard.items, shard.errors)

    def discard(self) -> None:
        """Remove the temporary files of split shards left unfinished when the run stops early: the shards'
        own and their pieces', including pieces that workers finished after the stop."""
        for shard in self.shards.values():
            shard.file.discard()
        self.shards.clear()
        for index in self.unpublished:
            prefix = piece_files(self.job, index)
            for path in prefix.parent.glob(f"{prefix.name}*"):
                path.unlink(missing_ok=True)
        self.unpublished.clear()


def finished_record(output: Path, name: str, expected_items: int) -> dict | None:
    """The stored record of a shard that a previous run completed, if the tar on disk still matches it."""
    tar = output / name
    path = record_path(output, name)
    if not tar.exists() or not path.exists():
        return None
    try:
        record = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("items") != expected_items or record.get("bytes") != tar.stat().st_size:
        return None
    if record.get("sha256") != sha256_file(tar):
        return None
    return record
