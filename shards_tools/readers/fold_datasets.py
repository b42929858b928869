"""Labelled audio datasets laid out as one metadata CSV + audio files in folds: ESC-50 and UrbanSound8K.

ESC-50:       ``ROOT/meta/esc50.csv`` (filename, fold, target, category, esc10, src_file, take)
              + ``ROOT/audio/``.
UrbanSound8K: ``ROOT/metadata/UrbanSound8K.csv`` (slice_file_name, fsID, start, end, salience, fold,
              classID, class) + ``ROOT/audio/fold<N>/``.

Label = the class name, captions from the caption templates; spec.folds keeps only those folds. The class
list is ordered by the dataset's class id, so on the full dataset ``label_index`` equals that id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shards_tools.config import InputSpec
from shards_tools.items import SourceItem
from shards_tools.readers.common import (
    csv_header,
    csv_rows,
    input_path,
    label_templates,
    local_source,
    parse_int,
    require_columns,
    require_file,
    template_captions,
)


@dataclass(frozen=True)
class FoldLayout:
    """Where one fold dataset keeps its metadata and audio, and which columns mean what."""

    title: str
    metadata: Path  # relative to the dataset root
    file_column: str
    id_column: str
    label_column: str
    audio_folder: Callable[[Path, int], Path]  # (root, fold) -> the folder holding that fold's files
    extra_meta: Callable[[dict[str, str]], dict]  # the row's other columns kept in the sample's .json

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (self.file_column, "fold", self.id_column, self.label_column)


LAYOUTS = {
    "esc50": FoldLayout(
        title="ESC-50",
        metadata=Path("meta", "esc50.csv"),
        file_column="filename",
        id_column="target",
        label_column="category",
        audio_folder=lambda root, fold: root / "audio",
        extra_meta=lambda row: {
            "esc10": (row.get("esc10") or "").strip().lower() == "true",
            "src_file": row.get("src_file"),
            "take": row.get("take"),
        },
    ),
    "urbansound8k": FoldLayout(
        title="UrbanSound8K",
        metadata=Path("metadata", "UrbanSound8K.csv"),
        file_column="slice_file_name",
        id_column="classID",
        label_column="class",
        audio_folder=lambda root, fold: root / "audio" / f"fold{fold}",
        extra_meta=lambda row: {key: row.get(key) for key in ("fsID", "start", "end", "salience")},
    ),
}


def dataset_root(spec: InputSpec, layout: FoldLayout) -> Path:
    """The dataset root, given either the root folder or its metadata CSV."""
    path = input_path(spec)
    return path.parents[len(layout.metadata.parts) - 1] if path.is_file() else path


def _metadata(spec: InputSpec, layout: FoldLayout) -> Path:
    path = require_file(dataset_root(spec, layout) / layout.metadata, f"{layout.title} metadata file")
    require_columns(path, csv_header(path), layout.required_columns, layout.title)
    return path


def fold_class_names(spec: InputSpec, fmt: str) -> list[str]:
    """All classes (whatever spec.folds), ordered by the dataset's class id."""
    layout = LAYOUTS[fmt]
    path = _metadata(spec, layout)
    by_id: dict[int, str] = {}
    for line, row in csv_rows(path):
        by_id[parse_int(row[layout.id_column], f"{path}:{line}", layout.id_column)] = row[
            layout.label_column
        ].strip()
    return [by_id[class_id] for class_id in sorted(by_id)]


def read_fold_dataset(spec: InputSpec, fmt: str) -> Iterator[SourceItem]:
    """Items in metadata row order; meta keeps the fold, the class id, the extra columns and label_index."""
    layout = LAYOUTS[fmt]
    path = _metadata(spec, layout)
    root = dataset_root(spec, layout)
    label_index = {name: index for index, name in enumerate(fold_class_names(spec, fmt))}
    templates = label_templates(spec)
    folds = set(spec.folds) if spec.folds else None

    def items() -> Iterator[SourceItem]:
        for line, row in csv_rows(path):
            where = f"{path}:{line}"
            fold = parse_int(row["fold"], where, "fold")
            if folds is not None and fold not in folds:
                continue
            filename, label = row[layout.file_column].strip(), row[layout.label_column].strip()
            folder = str(layout.audio_folder(root, fold))
            source, problem = local_source(folder, filename, spec.allow_outside_root)
            meta = {
                "fold": fold,
                layout.id_column: parse_int(row[layout.id_column], where, layout.id_column),
                **layout.extra_meta(row),
                "label_index": label_index[label],
            }
            yield SourceItem(
                source,
                template_captions(label, templates),
                label=label,
                meta=meta,
                uid=filename,
                problem=problem,
            )

    return items()
