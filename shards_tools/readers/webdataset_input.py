"""Existing WebDataset / img2dataset shards as input: a .tar, a folder of .tar files or a brace pattern.

Members are grouped into samples the way webdataset does: consecutive members with the same key, the
key being the member name up to the first dot of its base name (folders kept). Each sample's media
member becomes the source ``TARPATH#MEMBER``, read later by fetch.fetch_bytes; the small .txt, .json and
.cls members are read here, in one sequential pass over each tar.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from shards_tools.config import InputSpec
from shards_tools.errors import UsageError
from shards_tools.items import ItemError, SourceItem
from shards_tools.readers.common import INPUT_EXTENSIONS, captions_from_value, decode_text, no_caption
from shards_tools.shard_format import parse_json_object
from shards_tools.tar_stream import Member, ShardReadError, iter_members, open_shard

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TEXT_SUFFIXES = ("txt", "json", "cls")
# webdataset's own rule (base_plus_ext): key = folders + base name up to its first dot, suffix = the rest.
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def is_brace_pattern(text: str) -> bool:
    return "{" in text and "}" in text


def tar_paths(spec: InputSpec) -> list[Path]:
    """The shards to read, in order: the pattern's expansion, the folder's sorted tars, or the one tar."""
    text = os.path.expanduser(str(spec.path))
    if is_brace_pattern(text):
        paths = [Path(os.path.abspath(p)) for p in braceexpand(text)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise UsageError(f"{spec.path}: no such shard {', '.join(missing[:3])}{more}")
        return paths
    path = Path(os.path.abspath(text))
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.is_file() and is_tar_name(p.name))
        if not paths:
            raise UsageError(f"{path} has no {'/'.join(TAR_SUFFIXES)} files")
        return paths
    if path.is_file():
        return [path]
    raise UsageError(f"input {spec.path} does not exist")


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, suffix) of a member name as webdataset groups it; None for names it ignores (no dot in the
    base name, like ``__meta__`` or ``README``)."""
    match = _KEY_AND_SUFFIX.match(name)
    return (match.group(1), match.group(2)) if match else None


@dataclass
class _Sample:
    """The members of one sample: the first media member's name and the small text members' bytes."""

    key: str
    media: str | None = None
    texts: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None  # a member that must not be read


def read_webdataset(spec: InputSpec) -> Iterator[SourceItem]:
    """One item per sample of each shard, shards in order and samples in tar order."""
    paths = tar_paths(spec)
    return (item for path in paths for item in _tar_items(path, spec.modality))


def _tar_items(path: Path, modality: str) -> Iterator[SourceItem]:
    """The samples of one tar; a truncated or corrupt tar yields what it holds, then a decode_error item.

    Only the small .txt/.json/.cls members are read here (each under tar_stream's cap for them); a member that
    must not be read (sparse, an oversized caption file) marks its sample with the reason. Media members are
    read later, by fetch, under --max-bytes.
    """
    media_suffixes = {ext.lstrip(".") for ext in INPUT_EXTENSIONS[modality]}
    sample: _Sample | None = None
    try:
        with open_shard(str(path)) as (fileobj, stream):
            members = iter_members(
                fileobj,
                max_member_bytes=sys.maxsize,
                stream=stream,
                wanted=lambda name: _suffix(name) in TEXT_SUFFIXES,
            )
            for member in members:
                parsed = split_member_name(member.name)
                if parsed is None:
                    continue
                key, suffix = parsed
                if sample is None or key != sample.key:
                    if sample is not None:
                        yield _sample_item(path, sample, modality)
                    sample = _Sample(key)
                _add_member(member, suffix.lower(), sample, media_suffixes)
    except (ShardReadError, OSError) as err:
        if sample is not None:
            yield _sample_item(path, sample, modality)
        yield SourceItem(str(path), [], problem=ItemError("decode_error", f"{path}: {err}"))
        return
    if sample is not None:
        yield _sample_item(path, sample, modality)


def _suffix(name: str) -> str:
    parsed = split_member_name(name)
    return parsed[1].lower() if parsed else ""


def _add_member(member: Member, suffix: str, sample: _Sample, media: set[str]) -> None:
    """Record a member: the first media member by name; caption/meta/label members by content."""
    if member.problem is not None:
        sample.problem = sample.problem or member.problem
    elif suffix in TEXT_SUFFIXES:
        if member.data is not None:
            sample.texts.setdefault(suffix, member.data)
    elif sample.media is None and suffix.rsplit(".", 1)[-1] in media:
        sample.media = member.name


def _sample_item(path: Path, sample: _Sample, modality: str) -> SourceItem:
    meta = _json_object(sample.texts.get("json"))
    captions = captions_from_value(decode_text(sample.texts["txt"])) if "txt" in sample.texts else []
    if not captions:
        captions = captions_from_value(meta.get("caption", meta.get("text")))
    label = decode_text(sample.texts["cls"]).strip() if "cls" in sample.texts else ""
    problem = None
    if sample.problem is not None:
        problem = ItemError("decode_error", f"{path}: sample {sample.key}: {sample.problem}")
    elif sample.media is None:
        extensions = "/".join(INPUT_EXTENSIONS[modality])
        problem = ItemError(
            "missing_file", f"{path}: sample {sample.key} has no {modality} member ({extensions})"
        )
    elif not captions:
        problem = no_caption(f"{path}#{sample.media}: no .txt caption and no caption/text in .json")
    source = f"{path}#{sample.media or sample.key}"
    return SourceItem(source=source, captions=captions, label=label or None, meta=meta, problem=problem)


def _json_object(data: bytes | None) -> dict[str, Any]:
    """A sample's .json as a dict; missing, malformed or over-nested JSON gives no meta rather than dropping
    the sample."""
    if data is None:
        return {}
    try:
        return parse_json_object(decode_text(data))
    except ValueError:
        return {}
