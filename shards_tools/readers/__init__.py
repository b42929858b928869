"""Readers: turn each supported input layout into a deterministic stream of SourceItems.

``read_items(spec)`` picks the reader for spec.format (detecting it when "auto"); ``class_names(spec)``
gives the class list of labelled inputs. Each layout has its own module; readers check their input
(files, columns, folders) when called, so a bad input fails before any item is processed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

from shards_tools.config import InputSpec
from shards_tools.items import SourceItem
from shards_tools.readers.audiocaps import read_audiocaps
from shards_tools.readers.class_folder import class_folder_names, read_class_folder
from shards_tools.readers.clotho import read_clotho
from shards_tools.readers.coco import read_coco
from shards_tools.readers.detect import detect_format
from shards_tools.readers.flickr30k import read_flickr30k
from shards_tools.readers.fold_datasets import LAYOUTS as FOLD_LAYOUTS
from shards_tools.readers.fold_datasets import fold_class_names, read_fold_dataset
from shards_tools.readers.folder import read_folder
from shards_tools.readers.manifest import manifest_class_names, read_delimited, read_jsonl, read_parquet
from shards_tools.readers.webdataset_input import read_webdataset

__all__ = ["class_names", "detect_format", "input_format", "read_items"]

READERS: dict[str, Callable[[InputSpec], Iterator[SourceItem]]] = {
    "csv": partial(read_delimited, fmt="csv"),
    "tsv": partial(read_delimited, fmt="tsv"),
    "jsonl": read_jsonl,
    "parquet": read_parquet,
    "folder": read_folder,
    "class-folder": read_class_folder,
    "coco": read_coco,
    "flickr30k": read_flickr30k,
    "audiocaps": read_audiocaps,
    "clotho": read_clotho,
    **{fmt: partial(read_fold_dataset, fmt=fmt) for fmt in FOLD_LAYOUTS},
    "webdataset": read_webdataset,
}
MANIFEST_FORMATS = ("csv", "tsv", "jsonl", "parquet")


def input_format(spec: InputSpec) -> str:
    """spec.format, or the detected format when it is "auto"."""
    return detect_format(spec.path, spec.modality) if spec.format == "auto" else spec.format


def read_items(spec: InputSpec) -> Iterator[SourceItem]:
    """The input's items in a deterministic order (sorted listings, file row order), streamed."""
    return READERS[input_format(spec)](spec)


def class_names(spec: InputSpec) -> list[str] | None:
    """The class list of a labelled input (index = label_index); None for unlabelled formats.

    Class folders: sorted folder names. ESC-50 / UrbanSound8K: classes by their dataset id, all folds.
    Manifests: sorted distinct values of spec.label_column, if one is set.
    """
    fmt = input_format(spec)
    if fmt == "class-folder":
        return class_folder_names(spec)
    if fmt in FOLD_LAYOUTS:
        return fold_class_names(spec, fmt)
    if fmt in MANIFEST_FORMATS:
        return manifest_class_names(spec, fmt)
    return None
