"""Tell an input's layout from its name, its header line or its folder structure (``--format auto``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import get_args

from shards_tools.config import InputFormat
from shards_tools.errors import UsageError
from shards_tools.readers.audiocaps import AUDIOCAPS_COLUMNS
from shards_tools.readers.clotho import is_clotho_header
from shards_tools.readers.common import CAPTION_EXTENSIONS, is_media, read_header_line, walk_folders
from shards_tools.readers.flickr30k import flickr30k_layout
from shards_tools.readers.fold_datasets import LAYOUTS as FOLD_LAYOUTS
from shards_tools.readers.webdataset_input import is_brace_pattern, is_tar_name

# How many media files a folder sniff looks at before deciding: enough to see past a few odd files.
SNIFF_MEDIA_FILES = 200
_COCO_HEAD_BYTES = 64 * 1024
_CHUNK_BYTES = 1 << 20


def format_choices() -> list[str]:
    return [name for name in get_args(InputFormat) if name != "auto"]


class LayoutUnknown(UsageError):
    """No known layout fits the input; `reason` says what was seen (the evaluator words its own message)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"cannot tell the format of {path}: {reason}; pass --format, one of: "
            f"{', '.join(format_choices())}"
        )
        self.reason = reason


def cannot_tell(path: Path, reason: str) -> LayoutUnknown:
    return LayoutUnknown(path, reason)


def detect_format(path: Path, modality: str) -> str:
    """The input format of `path` for `modality`; UsageError naming the path and the --format values."""
    text = os.path.expanduser(str(path))
    if is_brace_pattern(text) and not os.path.exists(text):
        return "webdataset"
    resolved = Path(os.path.abspath(text))
    if not resolved.exists():
        raise UsageError(f"input {resolved} does not exist")
    if resolved.is_dir():
        return _folder_format(resolved, modality)
    return _file_format(resolved)


def _file_format(path: Path) -> str:
    name = path.name.lower()
    if is_tar_name(name):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        if is_coco_json(path):
            return "coco"
        reason = "not COCO captions ('images' + 'annotations'); name a JSON Lines manifest .jsonl"
        raise cannot_tell(path, reason)
    if name.endswith((".csv", ".tsv")):
        return dataset_table_format(read_header_line(path)) or ("tsv" if name.endswith(".tsv") else "csv")
    raise cannot_tell(path, f"unknown file type {path.suffix or '(no extension)'}")


def dataset_table_format(header_line: str) -> str | None:
    """The dataset whose metadata table has this header line, or None for a plain manifest."""
    if flickr30k_layout(header_line):
        return "flickr30k"
    names = [name.strip().lower() for name in re.split(r"[,\t|]", header_line)]
    signatures = {
        "audiocaps": AUDIOCAPS_COLUMNS,
        **{fmt: layout.required_columns for fmt, layout in FOLD_LAYOUTS.items()},
    }
    for fmt, columns in signatures.items():
        if {c.lower() for c in columns}.issubset(names):
            return fmt
    return "clotho" if is_clotho_header(names) else None


def is_coco_json(path: Path) -> bool:
    """COCO files open with "info"/"licenses"/"images" and hold "annotations" after all the images: look
    for "images" near the start and "annotations" anywhere, without parsing (train2017 is 90 MB)."""
    with open(path, "rb") as f:
        head = f.read(_COCO_HEAD_BYTES)
        if b'"images"' not in head:
            return False
        tail = head
        while b'"annotations"' not in tail:
            chunk = f.read(_CHUNK_BYTES)
            if not chunk:
                return False
            tail = tail[-len(b'"annotations"') :] + chunk
    return True


def _folder_format(path: Path, modality: str) -> str:
    for fmt, layout in FOLD_LAYOUTS.items():
        if (path / layout.metadata).is_file():
            return fmt
    if any(entry.is_file() and is_tar_name(entry.name) for entry in os.scandir(path)):
        return "webdataset"
    top_level, nested, captioned = _sniff_media(path, modality)
    if captioned:
        return "folder"
    if nested and not top_level:
        return "class-folder"
    if top_level:
        reason = (
            f"{modality} files without caption files (.txt/.json of the same name) and no class subfolders"
        )
    else:
        reason = (
            f"no {modality} files or .tar shards in it (for a manifest or annotation file, pass the file)"
        )
    raise cannot_tell(path, reason)


def _sniff_media(root: Path, modality: str) -> tuple[int, int, int]:
    """(media files directly in root, media files in subfolders, media files with a caption file),
    over the first SNIFF_MEDIA_FILES media files of the sorted walk."""
    top_level = nested = captioned = 0
    for folder, names in walk_folders(root):
        stems = {os.path.splitext(n)[0] for n in names if n.lower().endswith(CAPTION_EXTENSIONS)}
        for name in names:
            if not is_media(name, modality):
                continue
            if folder == root:
                top_level += 1
            else:
                nested += 1
            captioned += os.path.splitext(name)[0] in stems
            if top_level + nested >= SNIFF_MEDIA_FILES:
                return top_level, nested, captioned
    return top_level, nested, captioned
