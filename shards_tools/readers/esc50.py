"""ESC-50: ``ROOT/meta/esc50.csv`` (filename, fold, target, category, esc10, src_file, take) + ``ROOT/audio/``.

Label = category, captions from the caption templates; spec.folds keeps only those folds. The class
list is the categories ordered by ``target``, so on the full dataset ``label_index`` equals the target.
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

# The columns the reader needs (esc10, src_file and take are kept in meta when present).
REQUIRED_COLUMNS = ("filename", "fold", "target", "category")
METADATA = Path("meta", "esc50.csv")


def esc50_root(spec: InputSpec) -> Path:
    """The dataset root, given either the root folder or its ``meta/esc50.csv``."""
    path = input_path(spec)
    return path.parent.parent if path.is_file() else path


def _metadata(spec: InputSpec) -> Path:
    path = require_file(esc50_root(spec) / METADATA, "ESC-50 metadata file")
    require_columns(path, csv_header(path), REQUIRED_COLUMNS, "ESC-50")
    return path


def esc50_class_names(spec: InputSpec) -> list[str]:
    """All categories (whatever spec.folds), ordered by target."""
    path = _metadata(spec)
    by_target: dict[int, str] = {}
    for line, row in csv_rows(path):
        by_target[parse_int(row["target"], f"{path}:{line}", "target")] = row["category"].strip()
    return [by_target[target] for target in sorted(by_target)]


def read_esc50(spec: InputSpec) -> Iterator[SourceItem]:
    """Items in metadata row order; meta keeps fold, target, esc10 (bool), src_file, take, label_index."""
    path = _metadata(spec)
    classes = esc50_class_names(spec)
    templates = label_templates(spec)
    audio_root = str(esc50_root(spec) / "audio")
    label_index = {name: index for index, name in enumerate(classes)}
    folds = set(spec.folds) if spec.folds else None

    def items() -> Iterator[SourceItem]:
        for line, row in csv_rows(path):
            where = f"{path}:{line}"
            fold = parse_int(row["fold"], where, "fold")
            if folds is not None and fold not in folds:
                continue
            filename, category = row["filename"].strip(), row["category"].strip()
            source, problem = local_source(audio_root, filename, spec.allow_outside_root)
            meta = {
                "fold": fold,
                "target": parse_int(row["target"], where, "target"),
                "esc10": (row.get("esc10") or "").strip().lower() == "true",
                "src_file": row.get("src_file"),
                "take": row.get("take"),
                "label_index": label_index[category],
            }
            yield SourceItem(
                source,
                template_captions(category, templates),
                label=category,
                meta=meta,
                uid=filename,
                problem=problem,
            )

    return items()
