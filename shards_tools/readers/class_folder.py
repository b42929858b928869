"""ImageFolder layout, ``ROOT/<label>/<file>``, for images and audio: captions come from the label."""

from __future__ import annotations

import os
from collections.abc import Iterator

from shards_tools.config import InputSpec
from shards_tools.errors import UsageError
from shards_tools.items import SourceItem
from shards_tools.readers.common import (
    input_path,
    is_media,
    label_templates,
    require_dir,
    template_captions,
    walk_files,
)


def class_folder_names(spec: InputSpec) -> list[str]:
    """The sorted class folders of ROOT, as torchvision's ImageFolder lists them (hidden folders left out).

    The index of a label in this list is its ``label_index``, so it matches ImageFolder's class indices.
    """
    root = require_dir(input_path(spec), "input folder")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise UsageError(f"{root} has no class subfolders (expected ROOT/<label>/<file>)")
    return names


def read_class_folder(spec: InputSpec) -> Iterator[SourceItem]:
    """One item per media file under each class folder (recursive), classes and files in sorted order."""
    root = input_path(spec)
    classes = class_folder_names(spec)
    templates = label_templates(spec)
    return (
        SourceItem(
            source=str(path),
            captions=template_captions(label, templates),
            label=label,
            meta={"label_index": index},
        )
        for index, label in enumerate(classes)
        for path in walk_files(root / label)
        if is_media(path.name, spec.modality)
    )
