"""Folders of media files with same-stem caption files (``cat.jpg`` + ``cat.txt`` or ``cat.json``).

This is also img2dataset's "files" output layout (``00000/000000001.jpg``, ``.txt``, ``.json``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shards_tools.config import InputSpec
from shards_tools.items import ItemError, SourceItem
from shards_tools.readers.common import (
    captions_from_value,
    decode_text,
    input_path,
    is_media,
    no_caption,
    read_small_file,
    require_dir,
    walk_folders,
)
from shards_tools.shard_format import parse_json_object

JSON_CAPTION_KEYS = ("caption", "text", "captions")


def read_folder(spec: InputSpec) -> Iterator[SourceItem]:
    """One item per media file under spec.path (recursive, sorted), captioned by its .txt or .json."""
    root = require_dir(input_path(spec), "input folder")
    return (
        item for folder, names in walk_folders(root) for item in _folder_items(folder, names, spec.modality)
    )


def _folder_items(folder: Path, names: list[str], modality: str) -> Iterator[SourceItem]:
    siblings = set(names)
    for name in names:
        if is_media(name, modality):
            yield media_item(folder / name, siblings)


def media_item(media: Path, siblings: set[str]) -> SourceItem:
    """The item of one media file; `siblings` are the names in its folder, so no extra stat is needed.

    A ``.txt`` gives one caption per non-empty line; otherwise a ``.json`` gives its caption/text/captions
    value. The ``.json`` object's other keys become meta either way. A caption file over 1 MiB or unreadable
    is the item's problem.
    """
    stem = os.path.splitext(media.name)[0]
    txt, js = f"{stem}.txt", f"{stem}.json"
    meta: dict[str, Any] = {}
    captions: list[str] = []
    problem: ItemError | None = None
    try:
        if js in siblings:
            meta, captions, problem = _json_caption(media.parent / js)
        if txt in siblings:
            captions = caption_lines(read_small_file(media.parent / txt))
            problem = None if captions else no_caption(f"{media.parent / txt} is empty")
        elif js not in siblings:
            problem = no_caption(f"no caption file {txt} or {js} beside {media}")
    except ItemError as err:
        problem = err
    return SourceItem(source=str(media), captions=captions, meta=meta, problem=problem)


def caption_lines(data: bytes) -> list[str]:
    """One caption per non-blank line of a caption file, invalid UTF-8 kept as surrogates."""
    lines = decode_text(data).replace("\r\n", "\n").split("\n")
    return [line.strip() for line in lines if line.strip()]


def _json_caption(path: Path) -> tuple[dict[str, Any], list[str], ItemError | None]:
    """(meta, captions, problem) from a sidecar JSON object; the caption key is not repeated in meta."""
    try:
        value = parse_json_object(decode_text(read_small_file(path)))
    except ValueError as err:
        return {}, [], no_caption(f"{path}: {err}")
    key = next((k for k in JSON_CAPTION_KEYS if k in value), None)
    if key is None:
        return value, [], no_caption(f"{path} has no {'/'.join(JSON_CAPTION_KEYS)} key")
    captions = captions_from_value(value[key])
    meta = {k: v for k, v in value.items() if k != key}
    return meta, captions, None if captions else no_caption(f"{path}: {key!r} is empty")
