"""`mmcl shard verify`: re-read a shard set and check it against its manifest.

Checks every shard's size, sha256 and sample count; that every sample has its media, .txt and .json with
matching keys, unique across the set and free of dots; that the media decodes; and that sizes.json agrees.
Shards are streamed sample by sample, so memory stays flat whatever their size, and read with the training
loader's caps: a member over `max_member_bytes`, a sparse member or an image format off the allow-list is a
problem to report, never something to load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards_tools.decode import DecodeError, audio_blocks, open_audio, open_image
from shards_tools.errors import UsageError
from shards_tools.manifest import SIZES, load_manifest, read_sizes
from shards_tools.shard_format import MEDIA_EXTENSIONS, parse_json_object, split_key
from shards_tools.tar_stream import DEFAULT_MAX_MEMBER_BYTES, ShardReadError, iter_members, open_shard
from shards_tools.writer import sha256_file

MAX_LISTED_PROBLEMS = 1000  # a hostile set could have millions; the count is kept exact


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.problem_count

    def add(self, problem: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(problem)

    def summary(self) -> str:
        head = f"checked {self.shards} shards, {self.samples} samples: "
        if self.ok:
            return head + "OK"
        more = self.problem_count - len(self.problems)
        tail = f"\n  ... and {more} more" if more else ""
        return head + f"{self.problem_count} problem(s)\n" + "\n".join(f"  {p}" for p in self.problems) + tail


def decode_problem(ext: str, data: bytes) -> str | None:
    """Why a media member does not decode (as the trainer would open it), or None."""
    try:
        if ext in MEDIA_EXTENSIONS["image"]:
            with open_image(data) as image:
                image.load()
        else:
            with open_audio(data) as handle:
                frames = 0
                for block in audio_blocks(handle):
                    frames += len(block)
                    if not np.isfinite(block).all():
                        return "non-finite samples (NaN or inf)"
                if frames == 0:
                    return "no audio frames"
    except DecodeError as err:
        return str(err)
    except Exception as err:  # any decoder failure on hostile bytes is exactly what verify reports
        return f"{type(err).__name__}: {str(err)[:300]}"
    return None


@dataclass
class _Sample:
    key: str
    parts: dict[str, bytes | None] = field(default_factory=dict)  # extension -> data (None: not read)
    refused: list[str] = field(default_factory=list)


def _check_sample(
    sample: _Sample, shard: str, modality: str, decode: bool, seen: set[str], report: VerifyReport
) -> None:
    where = f"{shard}: sample {sample.key}"
    if sample.key in seen:
        report.add(f"{where}: key repeated across the set")
    seen.add(sample.key)
    if "." in sample.key:
        report.add(f"{where}: key contains a dot")
    for problem in sample.refused:
        report.add(f"{where}: {problem}")
    media_exts = MEDIA_EXTENSIONS[modality]
    media = [e for e in sample.parts if e in media_exts]
    if len(media) != 1:
        report.add(
            f"{where}: expected one media file ({'/'.join(sorted(media_exts))}), found {sorted(sample.parts)}"
        )
    for needed in ("txt", "json"):
        if needed not in sample.parts:
            report.add(f"{where}: missing .{needed}")
    if sample.parts.get("json") is not None:
        try:
            meta = parse_json_object(sample.parts["json"])
            if meta.get("key") != sample.key:
                report.add(f"{where}: .json key {str(meta.get('key'))[:100]!r} does not match")
        except ValueError as err:
            report.add(f"{where}: .json does not parse ({err})")
    if decode and media and sample.parts[media[0]] is not None:
        problem = decode_problem(media[0], sample.parts[media[0]])
        if problem:
            report.add(f"{where}: .{media[0]} does not decode ({problem})")


def _check_shard(
    path: Path, modality: str, decode: bool, seen: set[str], report: VerifyReport, max_member_bytes: int
) -> int:
    """Stream one shard's samples through `_check_sample`; returns how many samples it holds."""
    needed = {"json", *MEDIA_EXTENSIONS[modality]} if decode else {"json"}
    count, sample = 0, None
    with open_shard(str(path)) as (fileobj, stream):
        members = iter_members(
            fileobj,
            max_member_bytes=max_member_bytes,
            stream=stream,
            wanted=lambda name: split_key(name)[1] in needed,
        )
        for member in members:
            key, ext = split_key(member.name)
            if sample is None or key != sample.key:
                if sample is not None:
                    _check_sample(sample, path.name, modality, decode, seen, report)
                    count += 1
                sample = _Sample(key)
            if member.problem is not None:
                sample.refused.append(member.problem)
            sample.parts.setdefault(ext, member.data)
    if sample is not None:
        _check_sample(sample, path.name, modality, decode, seen, report)
        count += 1
    return count


def verify_shards(
    output: Path, *, decode: bool = True, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> VerifyReport:
    """Check every shard listed in OUT/manifest.json; problems are collected, not raised."""
    output = Path(output)
    manifest = load_manifest(output)
    report = VerifyReport()
    seen: set[str] = set()
    listed = {s["name"] for s in manifest["shards"]}
    for shard in manifest["shards"]:
        path = output / shard["name"]
        report.shards += 1
        if not path.is_file():
            report.add(f"{shard['name']}: missing")
            continue
        if path.stat().st_size != shard["bytes"]:
            report.add(f"{shard['name']}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
        if sha256_file(path) != shard["sha256"]:
            report.add(f"{shard['name']}: sha256 differs from the manifest (the file changed)")
        try:
            count = _check_shard(path, manifest["modality"], decode, seen, report, max_member_bytes)
        except (ShardReadError, OSError) as err:
            report.add(f"{shard['name']}: unreadable tar ({err})")
            continue
        report.samples += count
        if count != shard["count"]:
            report.add(f"{shard['name']}: {count} samples, manifest says {shard['count']}")
    for stray in sorted(p.name for p in output.glob(f"{manifest['prefix']}-*.tar") if p.name not in listed):
        report.add(f"{stray}: a shard file not listed in manifest.json")
    sizes_path = output / SIZES
    if not sizes_path.exists():
        report.add(f"{SIZES}: missing (open_clip's trainer reads it)")
    else:
        try:
            sizes = read_sizes(sizes_path)
        except UsageError as err:
            report.add(str(err))
        else:
            if sizes != {s["name"]: s["count"] for s in manifest["shards"]}:
                report.add(f"{SIZES}: counts disagree with manifest.json")
    return report
