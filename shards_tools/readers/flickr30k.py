"""Flickr30k captions in either common CSV: Kaggle's ``results.csv`` or ``flickr_annotations_30k.csv``.

``results.csv``: ``image_name| comment_number| comment``, one caption per line, pipe-separated with
padding spaces. ``flickr_annotations_30k.csv``: ``raw`` (JSON list of the 5 captions), ``sentids``,
``split``, ``filename``, ``img_id``, one image per row. Either way: one item per image, all its captions,
uid = image file name. The whole file is grouped in memory: it is a fixed 31k-image dataset.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shards_tools.config import InputSpec
from shards_tools.errors import UsageError
from shards_tools.items import SourceItem
from shards_tools.readers.common import (
    captions_from_value,
    csv_header,
    csv_rows,
    input_path,
    local_source,
    media_root,
    no_caption,
    open_text,
    read_header_line,
    require_file,
)

RESULTS_COLUMNS = ("image_name", "comment_number", "comment")
ANNOTATIONS_COLUMNS = ("raw", "sentids", "filename")
# Kaggle's results.csv has a line whose second pipe is missing: "2199200615.jpg| 4   A dog runs ...".
_NUMBER_THEN_CAPTION = re.compile(r"^\s*(\d+)\s+(.*)$")


def flickr30k_layout(header_line: str) -> str | None:
    """ "results" or "annotations" for the two Flickr30k CSV headers, None for anything else."""
    names = {name.strip().lower() for name in re.split(r"[|,]", header_line)}
    if names.issuperset(RESULTS_COLUMNS):
        return "results"
    if names.issuperset(ANNOTATIONS_COLUMNS):
        return "annotations"
    return None


def default_image_dirs(csv_path: Path) -> list[Path]:
    folder = csv_path.parent
    return [folder / "flickr30k-images", folder / "flickr30k_images", folder / "Images", folder / "images"]


def read_flickr30k(spec: InputSpec) -> Iterator[SourceItem]:
    """One item per image, in order of first appearance in the CSV."""
    path = require_file(input_path(spec), "Flickr30k captions file")
    layout = flickr30k_layout(read_header_line(path))
    if layout is None:
        raise UsageError(
            f"{path} is not a Flickr30k captions file: expected the header "
            f"'{'| '.join(RESULTS_COLUMNS)}' (results.csv) or columns {', '.join(ANNOTATIONS_COLUMNS)} "
            "(flickr_annotations_30k.csv)"
        )
    root = str(media_root(spec, default_image_dirs(path), "Flickr30k image"))
    grouped = _results_captions(path) if layout == "results" else _annotation_captions(path)

    def items() -> Iterator[SourceItem]:
        for filename, (captions, meta) in grouped.items():
            source, problem = local_source(root, filename, spec.allow_outside_root)
            if problem is None and not captions:
                problem = no_caption(f"Flickr30k image {filename} has no caption")
            yield SourceItem(source=source, captions=captions, meta=meta, uid=filename, problem=problem)

    return items()


def _results_captions(path: Path) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """filename -> (captions, meta) from results.csv, parsed by hand: captions may contain quotes."""
    grouped: dict[str, tuple[list[str], dict[str, Any]]] = {}
    with open_text(path) as f:
        next(f, None)  # header
        for line in f:
            parts = [part.strip() for part in line.rstrip("\r\n").split("|", 2)]
            if not parts[0]:
                continue
            if len(parts) == 2 and (match := _NUMBER_THEN_CAPTION.match(parts[1])):
                parts = [parts[0], match.group(1), match.group(2)]
            caption = parts[2] if len(parts) == 3 else ""
            grouped.setdefault(parts[0], ([], {}))[0].extend(captions_from_value(caption))
    return grouped


def _annotation_captions(path: Path) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """filename -> (captions, meta) from flickr_annotations_30k.csv; meta keeps split, img_id, sentids."""
    header = csv_header(path)
    grouped: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for _, row in csv_rows(path):
        filename = (row.get("filename") or "").strip()
        if not filename:
            continue
        captions, meta = grouped.setdefault(filename, ([], {}))
        captions.extend(captions_from_value(_json_list(row.get("raw"))))
        meta.update({name: row[name] for name in header if name not in ("raw", "filename") and name in row})
    return grouped


def _json_list(cell: str | None) -> Any:
    """The ``raw`` cell: a JSON list of captions; a cell that is not JSON is taken as one caption."""
    try:
        return json.loads(cell or "[]")
    except (json.JSONDecodeError, RecursionError):
        return cell
