"""COCO Captions: ``annotations/captions_<split>.json`` plus the ``<split>/`` image folder.

One item per image with all its captions (five for COCO); uid is the COCO image id.
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
    input_path,
    local_source,
    media_root,
    no_caption,
    require_file,
)

_SPLIT_FROM_NAME = re.compile(r"^captions_(?P<split>.+)\.json$")


def is_coco_captions(data: Any) -> bool:
    """Whether parsed JSON has COCO's shape: ``images`` and ``annotations`` lists."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    )


def default_image_dirs(annotations: Path) -> list[Path]:
    """Where COCO's images usually are: ``captions_val2017.json`` -> ``../val2017`` (then a few variants)."""
    match = _SPLIT_FROM_NAME.match(annotations.name)
    if match is None:
        return [annotations.parent / "images"]
    split = match.group("split")
    return [
        annotations.parent.parent / split,
        annotations.parent / split,
        annotations.parent.parent / "images" / split,
    ]


def load_coco(path: Path) -> dict[str, Any]:
    """The parsed annotations file; UsageError unless it is a COCO *captions* file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from None
    if not is_coco_captions(data):
        raise UsageError(f"{path} is not a COCO annotations file (needs 'images' and 'annotations' lists)")
    annotations = data["annotations"]
    if annotations and not all(isinstance(a, dict) and "caption" in a for a in annotations[:10]):
        raise UsageError(
            f"{path} has no captions in its annotations: use captions_<split>.json, not instances_*.json"
        )
    return data


def read_coco(spec: InputSpec) -> Iterator[SourceItem]:
    """Items in the order of the file's ``images`` list, each with its captions in annotation order."""
    path = require_file(input_path(spec), "COCO annotations file")
    data = load_coco(path)
    root = str(media_root(spec, default_image_dirs(path), "COCO image"))
    captions_by_image: dict[Any, list[Any]] = {}
    for annotation in data["annotations"]:
        captions_by_image.setdefault(annotation.get("image_id"), []).append(annotation.get("caption"))

    def items() -> Iterator[SourceItem]:
        for image in data["images"]:
            source, problem = local_source(root, str(image.get("file_name", "")), spec.allow_outside_root)
            captions = captions_from_value(captions_by_image.get(image.get("id"), []))
            if problem is None and not captions:
                problem = no_caption(f"COCO image id {image.get('id')} has no caption")
            meta = {key: value for key, value in image.items() if key != "file_name"}
            yield SourceItem(
                source=source, captions=captions, meta=meta, uid=str(image.get("id")), problem=problem
            )

    return items()
