"""`mmcl shard verify`: re-read a shard set and check it against its manifest.

Checks every shard's size, sha256 and sample count; that every sample has its media, .txt and .json with
matching keys, unique across the set and free of dots; that the media decodes; and that sizes.json agrees.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import soundfile
from PIL import Image

from shards_tools.manifest import SIZES, load_manifest
from shards_tools.writer import sha256_file

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp"}
AUDIO_EXTENSIONS = {"flac", "wav"}


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"checked {self.shards} shards, {self.samples} samples: "
        if self.ok:
            return head + "OK"
        return head + f"{len(self.problems)} problem(s)\n" + "\n".join(f"  {p}" for p in self.problems)


def split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _decode_problem(ext: str, data: bytes) -> str | None:
    try:
        if ext in IMAGE_EXTENSIONS:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        elif ext in AUDIO_EXTENSIONS:
            frames, _ = soundfile.read(io.BytesIO(data), dtype="float32")
            if len(frames) == 0:
                return "no audio frames"
    except Exception as err:  # any decoder failure is exactly what verify reports
        return f"{type(err).__name__}: {err}"
    return None


def _check_samples(path: Path, modality: str, decode: bool, seen: set[str], report: VerifyReport) -> int:
    media_exts = IMAGE_EXTENSIONS if modality == "image" else AUDIO_EXTENSIONS
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member(member.name)
            handle = tar.extractfile(member)
            samples.setdefault(key, {})[ext] = handle.read() if handle else b""
    for key, parts in samples.items():
        where = f"{path.name}: sample {key}"
        if key in seen:
            report.problems.append(f"{where}: key repeated across the set")
        seen.add(key)
        if "." in key:
            report.problems.append(f"{where}: key contains a dot")
        media = [e for e in parts if e in media_exts]
        if len(media) != 1:
            report.problems.append(f"{where}: expected one media file ({'/'.join(sorted(media_exts))}), found {sorted(parts)}")
        for needed in ("txt", "json"):
            if needed not in parts:
                report.problems.append(f"{where}: missing .{needed}")
        if "json" in parts:
            try:
                meta = json.loads(parts["json"])
                if meta.get("key") != key:
                    report.problems.append(f"{where}: .json key {meta.get('key')!r} does not match")
            except ValueError as err:
                report.problems.append(f"{where}: .json does not parse ({err})")
        if decode and media:
            problem = _decode_problem(media[0], parts[media[0]])
            if problem:
                report.problems.append(f"{where}: .{media[0]} does not decode ({problem})")
    return len(samples)


def verify_shards(output: Path, *, decode: bool = True) -> VerifyReport:
    """Check every shard listed in OUT/manifest.json; problems are collected, not raised."""
    output = Path(output)
    manifest = load_manifest(output)
    report = VerifyReport()
    seen: set[str] = set()
    listed = {s["name"] for s in manifest["shards"]}
    for shard in manifest["shards"]:
        path = output / shard["name"]
        report.shards += 1
        if not path.exists():
            report.problems.append(f"{shard['name']}: missing")
            continue
        if path.stat().st_size != shard["bytes"]:
            report.problems.append(f"{shard['name']}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
        if sha256_file(path) != shard["sha256"]:
            report.problems.append(f"{shard['name']}: sha256 differs from the manifest (the file changed)")
        try:
            count = _check_samples(path, manifest["modality"], decode, seen, report)
        except (tarfile.TarError, OSError, EOFError) as err:
            report.problems.append(f"{shard['name']}: unreadable tar ({err})")
            continue
        report.samples += count
        if count != shard["count"]:
            report.problems.append(f"{shard['name']}: {count} samples, manifest says {shard['count']}")
    for stray in sorted(p.name for p in output.glob(f"{manifest['prefix']}-*.tar") if p.name not in listed):
        report.problems.append(f"{stray}: a shard file not listed in manifest.json")
    sizes_path = output / SIZES
    if not sizes_path.exists():
        report.problems.append(f"{SIZES}: missing (open_clip's trainer reads it)")
    elif json.loads(sizes_path.read_text("utf-8")) != {s["name"]: s["count"] for s in manifest["shards"]}:
        report.problems.append(f"{SIZES}: counts disagree with manifest.json")
    return report
