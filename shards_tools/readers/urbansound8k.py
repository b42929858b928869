"""UrbanSound8K: ``ROOT/metadata/UrbanSound8K.csv`` + ``ROOT/audio/fold<N>/<slice_file_name>``.

Label = class, captions from the caption templates; spec.folds keeps only those folds. The class list
is the classes ordered by ``classID``, so on the full dataset ``label_index`` equals the classID.
"""

from __future__ import annotations

from collections.abc import Iterator
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

# The columns the reader needs (fsID, start, end and salience are kept in meta when present).
REQUIRED_COLUMNS = ("slice_file_name", "fold", "classID", "class")
METADATA = Path("metadata", "UrbanSound8K.csv")


def urbansound8k_root(spec: InputSpec) -> Path:
    """The dataset root, given either the root folder or its ``metadata/UrbanSound8K.csv``."""
    path = input_path(spec)
    return path.parent.parent if path.is_file() else path


def _metadata(spec: InputSpec) -> Path:
    path = require_file(urbansound8k_root(spec) / METADATA, "UrbanSound8K metadata file")
    require_columns(path, csv_header(path), REQUIRED_COLUMNS, "UrbanSound8K")
    return path


def urbansound8k_class_names(spec: InputSpec) -> list[str]:
    """All classes (whatever spec.folds), ordered by classID."""
    path = _metadata(spec)
    by_id: dict[int, str] = {}
    for line, row in csv_rows(path):
        by_id[parse_int(row["classID"], f"{path}:{line}", "classID")] = row["class"].strip()
    return [by_id[class_id] for class_id in sorted(by_id)]


def read_urbansound8k(spec: InputSpec) -> Iterator[SourceItem]:
    """Items in metadata row order; meta keeps fold, classID, fsID, start, end, salience, label_index."""
    path = _metadata(spec)
    classes = urbansound8k_class_names(spec)
    templates = label_templates(spec)
    audio_root = urbansound8k_root(spec) / "audio"
    label_index = {name: index for index, name in enumerate(classes)}
    folds = set(spec.folds) if spec.folds else None

    def items() -> Iterator[SourceItem]:
        for line, row in csv_rows(path):
            where = f"{path}:{line}"
            fold = parse_int(row["fold"], where, "fold")
            if folds is not None and fold not in folds:
                continue
            filename, label = row["slice_file_name"].strip(), row["class"].strip()
            source, problem = local_source(str(audio_root / f"fold{fold}"), filename, spec.allow_outside_root)
            meta = {
                "fold": fold,
                "classID": parse_int(row["classID"], where, "classID"),
                "fsID": row.get("fsID"),
                "start": row.get("start"),
                "end": row.get("end"),
                "salience": row.get("salience"),
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
