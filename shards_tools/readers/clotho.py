"""Clotho: ``clotho_captions_<split>.csv`` (``file_name, caption_1..caption_5``) and the ``<split>/`` audio.

One item per row with its five captions; uid = file_name. Rows are streamed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from shards_tools.config import InputSpec
from shards_tools.items import SourceItem
from shards_tools.readers.common import (
    captions_from_value,
    csv_header,
    csv_rows,
    input_path,
    local_source,
    media_root,
    no_caption,
    require_columns,
    require_file,
)

_SPLIT_FROM_NAME = re.compile(r"^clotho_captions_(?P<split>.+)\.csv$", re.IGNORECASE)
_CAPTION_COLUMN = re.compile(r"^caption_(\d+)$")


def is_clotho_header(header: list[str]) -> bool:
    return "file_name" in header and any(_CAPTION_COLUMN.match(name) for name in header)


def default_audio_dirs(csv_path: Path) -> list[Path]:
    """``clotho_captions_development.csv`` -> ``development/`` beside it or one level up (then
    ``clotho_audio_development/``)."""
    match = _SPLIT_FROM_NAME.match(csv_path.name)
    if match is None:
        return []
    split, folder = match.group("split"), csv_path.parent
    return [
        folder / split,
        folder.parent / split,
        folder / f"clotho_audio_{split}",
        folder.parent / f"clotho_audio_{split}",
    ]


def read_clotho(spec: InputSpec) -> Iterator[SourceItem]:
    """Items in CSV row order; captions from caption_1, caption_2, ... in numeric order."""
    path = require_file(input_path(spec), "Clotho captions CSV")
    header = csv_header(path)
    require_columns(path, header, ["file_name", "caption_1"], "Clotho captions")
    caption_columns = sorted(
        (n for n in header if _CAPTION_COLUMN.match(n)), key=lambda n: int(n.split("_")[1])
    )
    root = str(media_root(spec, default_audio_dirs(path), "Clotho audio"))

    def items() -> Iterator[SourceItem]:
        for line, row in csv_rows(path):
            file_name = (row.get("file_name") or "").strip()
            source, problem = local_source(root, file_name, spec.allow_outside_root)
            captions = [
                caption for column in caption_columns for caption in captions_from_value(row.get(column))
            ]
            if problem is None and not captions:
                problem = no_caption(f"{path}:{line}: {file_name} has no caption")
            meta = {
                k: v
                for k, v in row.items()
                if k is not None and k != "file_name" and k not in caption_columns
            }
            yield SourceItem(source=source, captions=captions, meta=meta, uid=file_name, problem=problem)

    return items()
