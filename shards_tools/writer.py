"""Write one planned shard: fetch, encode and pack each item, then publish the tar atomically.

A shard is written to a hidden temporary name, flushed to disk and renamed; only then is its record
(count, bytes, sha256, the items it skipped and why) written beside it under `_progress/`. A killed run
therefore leaves either a complete shard with its record or nothing that a re-run would keep.
"""

from __future__ import annotations

import hashlib
import io
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

from shards_tools.config import ShardConfig
from shards_tools.encode import EncodedMedia, check_captions, encode_audio, encode_image
from shards_tools.fetch import HTTP_SCHEMES, fetch_bytes, url_scheme
from shards_tools.items import ItemError
from shards_tools.plan import PlannedItem, ShardPlan

TAR_MTIME = 0  # fixed member timestamps make shards byte-reproducible (an int: a float costs a pax header)


def write_sample(tar: tarfile.TarFile, sample: dict[str, bytes]) -> None:
    """Append one sample as `KEY.EXT` members, extensions sorted: the bytes webdataset's
    `TarWriter(encoder=False, mtime=0, user="mmcl", group="mmcl")` writes (tarfile's default pax format,
    plain ustar headers for ASCII names; mode 0444); tested against it. The stdlib does it here because importing webdataset imports torch: ~3 s and ~0.8 GB
    in every `mmcl shard` process."""
    key = sample["__key__"]
    for ext in sorted(k for k in sample if k != "__key__"):
        data = sample[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
        info.uname = info.gname = "mmcl"
        tar.addfile(info, io.BytesIO(data))
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes under a temporary name in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
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
    """The item's media bytes, or ItemError: a problem found while reading the input, no usable caption (checked
    first, so nothing is downloaded for an item that is skipped anyway), or the fetch's."""
    if entry.item.problem is not None:
        raise entry.item.problem
    check_captions(entry.captions)
    return fetch_bytes(entry.item.source, job.config.fetch)


def fetched_items(items: list[PlannedItem], job: ShardJob) -> Iterator[tuple[PlannedItem, Callable[[], bytes]]]:
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


def write_shard(plan: ShardPlan, job: ShardJob) -> dict:
    """Write shard `plan.index`; returns (and stores) its record. Runs in a worker process."""
    output = Path(job.config.output)
    name = shard_name(job.config.prefix, plan.index)
    final = output / name
    tmp = output / f".{name}.tmp-{os.getpid()}"
    errors = []
    count = 0
    with open(tmp, "wb") as stream:
        with tarfile.open(fileobj=stream, mode="w|") as tar:
            for entry, raw in fetched_items(plan.items, job):
                try:
                    sample = encode_item(entry, job, raw())
                except ItemError as err:
                    errors.append(
                        {"key": entry.key, "source": entry.item.source, "reason": err.reason, "detail": err.detail}
                    )
                    continue
                write_sample(tar, sample)
                count += 1
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, final)
    record = {
        "name": name,
        "index": plan.index,
        "count": count,
        "items": len(plan.items),
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final),
        "errors": errors,
    }
    write_atomic(record_path(output, name), json.dumps(record, ensure_ascii=False).encode("utf-8"))
    return record


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
