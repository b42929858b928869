"""Manifests: CSV, TSV, JSONL and parquet tables with a path-or-URL column and one or more caption columns.

Rows are streamed (parquet by record batches), so memory does not grow with the manifest. Columns are
checked when the reader is created, so a wrong column name fails before any work starts.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shards_tools.config import InputSpec
from shards_tools.errors import UsageError
from shards_tools.items import ItemError, SourceItem
from shards_tools.readers.common import (
    captions_from_value,
    csv_header,
    csv_rows,
    input_path,
    lower_names,
    no_caption,
    open_text,
    require_file,
    resolve_source,
    template_captions,
)
from shards_tools.shard_format import parse_json_object

# Column names recognised when --url-column / --caption-column are not given (case-insensitive),
# most specific first.
URL_COLUMN_NAMES = tuple(
    "url image_url audio_url uri path filepath file_path file filename file_name"
    " image image_path img audio audio_path wav location".split()
)
CAPTION_COLUMN_NAMES = tuple(
    "caption captions text texts title description sentence sentences raw_caption alt_text alt prompt".split()
)
# caption_1..caption_5 (Clotho-like tables) or text1, text2: several captions per row.
_NUMBERED_CAPTION = re.compile(r"^(caption|text)_?\d+$", re.IGNORECASE)
PARQUET_BATCH_ROWS = 1024
DELIMITERS = {"csv": ",", "tsv": "\t"}


@dataclass(frozen=True)
class ManifestColumns:
    """Which columns hold the path/URL, the captions and the label; every other column becomes meta."""

    url: str
    captions: tuple[str, ...]  # empty when captions come from the label and the caption templates
    label: str | None

    def used(self) -> set[str]:
        return {self.url, *self.captions, *([self.label] if self.label else [])}


def choose_columns(
    spec: InputSpec, path: Path, columns: Sequence[str], url_candidates: Sequence[str] | None = None
) -> ManifestColumns:
    """The configured columns, or the recognised names; UsageError naming the file and flag otherwise.

    url_candidates limits auto-detection to columns that can hold a path (parquet string columns).
    """
    by_lower = lower_names(columns)
    if spec.url_column:
        url = _configured_column(spec.url_column, by_lower, path, columns, "--url-column")
    else:
        url = _first_recognised(URL_COLUMN_NAMES, by_lower, url_candidates)
    if spec.caption_columns:
        captions = [
            _configured_column(c, by_lower, path, columns, "--caption-column") for c in spec.caption_columns
        ]
    else:
        captions = _recognised_captions(columns, by_lower, exclude=url)
    label = (
        _configured_column(spec.label_column, by_lower, path, columns, "--label-column")
        if spec.label_column
        else None
    )
    if url is None or (not captions and label is None):
        raise UsageError(
            _unrecognised_message(path, columns, missing_url=url is None, missing_caption=not captions)
        )
    return ManifestColumns(url, tuple(captions), label)


def _configured_column(
    name: str, by_lower: dict[str, str], path: Path, columns: Sequence[str], flag: str
) -> str:
    if name in columns:
        return name
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    raise UsageError(
        f"{flag} {name!r}: no such column in {path}; its columns are: {', '.join(columns) or '(none)'}"
    )


def _first_recognised(
    names: Iterable[str], by_lower: dict[str, str], allowed: Sequence[str] | None
) -> str | None:
    for name in names:
        column = by_lower.get(name)
        if column is not None and (allowed is None or column in allowed):
            return column
    return None


def _recognised_captions(columns: Sequence[str], by_lower: dict[str, str], exclude: str | None) -> list[str]:
    single = _first_recognised(
        (n for n in CAPTION_COLUMN_NAMES if by_lower.get(n) != exclude), by_lower, None
    )
    if single is not None:
        return [single]
    return [c for c in columns if _NUMBERED_CAPTION.match(c) and c != exclude]


def _unrecognised_message(
    path: Path, columns: Sequence[str], missing_url: bool, missing_caption: bool
) -> str:
    wanted = []
    if missing_url:
        wanted.append("the path or URL (set --url-column NAME)")
    if missing_caption:
        wanted.append("the caption (set --caption-column NAME, repeatable for several captions)")
    message = (
        f"{path}: cannot tell which column holds {' and '.join(wanted)}; its columns are: "
        f"{', '.join(columns) or '(none)'}"
    )
    if any("://" in c for c in columns):
        message += ". The first line looks like data, not a header: add a header line (e.g. caption<TAB>url)"
    return message


def row_to_item(
    row: dict[Any, Any], columns: ManifestColumns, spec: InputSpec, root: str, where: str
) -> SourceItem:
    """One manifest row as a SourceItem; `where` (FILE:LINE) names a row whose path cell is empty."""
    cell = row.get(columns.url)
    cell = "" if cell is None else str(cell).strip()
    if cell:
        source, problem = resolve_source(root, cell, spec.allow_outside_root)
    else:
        source, problem = where, ItemError("missing_file", f"{where}: column {columns.url!r} is empty")
    raw_label = row.get(columns.label) if columns.label else None
    label = str(raw_label).strip() if raw_label is not None else ""
    if columns.captions:
        captions = [
            caption for column in columns.captions for caption in captions_from_value(row.get(column))
        ]
    else:
        captions = template_captions(label, spec.caption_templates()) if label else []
    if problem is None and not captions:
        problem = no_caption(
            f"{where}: no caption in column(s) {', '.join(columns.captions or [str(columns.label)])}"
        )
    used = columns.used()
    meta = {key: value for key, value in row.items() if key is not None and key not in used}
    return SourceItem(source=source, captions=captions, label=label or None, meta=meta, problem=problem)


def _media_root(spec: InputSpec, manifest: Path) -> str:
    """Relative paths resolve against --media-root when given, else the manifest's folder."""
    if spec.media_root is not None:
        return os.path.abspath(os.path.expanduser(spec.media_root))
    return str(manifest.parent)


# --- CSV / TSV -------------------------------------------------------------------------------------


def _delimited_dialect(fmt: str) -> tuple[str, int]:
    """CSV quotes fields; TSV (CC3M, img2dataset inputs) has no quoting, so a caption may contain '"'."""
    return DELIMITERS[fmt], csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL


def read_delimited(spec: InputSpec, fmt: str) -> Iterator[SourceItem]:
    """Items of a CSV (fmt "csv") or TSV (fmt "tsv") manifest with a header row, in row order."""
    path = require_file(input_path(spec), "manifest")
    delimiter, quoting = _delimited_dialect(fmt)
    columns = choose_columns(spec, path, csv_header(path, delimiter, quoting))
    root = _media_root(spec, path)
    return (
        row_to_item(row, columns, spec, root, f"{path}:{line}")
        for line, row in csv_rows(path, delimiter, quoting)
    )


# --- JSONL -----------------------------------------------------------------------------------------


def _jsonl_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, object) for each non-blank line; the object is None when the line is not a JSON
    object."""
    with open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = parse_json_object(line)
            except ValueError:  # not JSON, not an object, or nested deep enough to overflow a parser
                value = None
            yield number, value


def read_jsonl(spec: InputSpec) -> Iterator[SourceItem]:
    """Items of a JSON Lines manifest (one object per line); columns are taken from the first object.

    A line that is not a JSON object becomes an item with problem ``decode_error`` rather than ending the run.
    """
    path = require_file(input_path(spec), "manifest")
    first = next((obj for _, obj in _jsonl_lines(path) if obj is not None), None)
    if first is None:
        return iter(())
    columns = choose_columns(spec, path, list(first))
    root = _media_root(spec, path)

    def items() -> Iterator[SourceItem]:
        for number, obj in _jsonl_lines(path):
            where = f"{path}:{number}"
            if obj is None:
                yield SourceItem(where, [], problem=ItemError("decode_error", f"{where}: not a JSON object"))
            else:
                yield row_to_item(obj, columns, spec, root, where)

    return items()


# --- parquet ---------------------------------------------------------------------------------------


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise UsageError(f"{path}: not a readable parquet file ({err})") from None


def _is_text(field: pa.Field) -> bool:
    return pa.types.is_string(field.type) or pa.types.is_large_string(field.type)


def _json_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Parquet meta as JSON can carry it: timestamps and decimals as text, binary columns left out."""
    return {
        key: value if value is None or isinstance(value, (str, int, float, bool, list, dict)) else str(value)
        for key, value in meta.items()
        if not isinstance(value, (bytes, bytearray))
    }


def read_parquet(spec: InputSpec) -> Iterator[SourceItem]:
    """Items of a parquet manifest, read one record batch at a time, in row order."""
    path = require_file(input_path(spec), "manifest")
    parquet = _open_parquet(path)
    schema = parquet.schema_arrow
    text_columns = [f.name for f in schema if _is_text(f)]
    columns = choose_columns(spec, path, schema.names, url_candidates=text_columns)
    if columns.url not in text_columns:
        raise UsageError(
            f"--url-column {columns.url!r} in {path} holds {schema.field(columns.url).type} values, "
            "not paths or URLs (embedded media bytes are not supported)"
        )
    root = _media_root(spec, path)

    def items() -> Iterator[SourceItem]:
        row_number = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                item = row_to_item(row, columns, spec, root, f"{path}:row {row_number}")
                item.meta = _json_meta(item.meta)
                row_number += 1
                yield item

    return items()


# --- labels ----------------------------------------------------------------------------------------


def manifest_class_names(spec: InputSpec, fmt: str) -> list[str] | None:
    """The sorted distinct labels of spec.label_column (one streaming pass), None without a label column."""
    if not spec.label_column:
        return None
    path = require_file(input_path(spec), "manifest")
    labels: set[str] = set()
    if fmt == "parquet":
        parquet = _open_parquet(path)
        names = parquet.schema_arrow.names
        column = _configured_column(spec.label_column, lower_names(names), path, names, "--label-column")
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            labels.update(str(v).strip() for v in batch.column(0).to_pylist() if v is not None)
    else:
        items = read_jsonl(spec) if fmt == "jsonl" else read_delimited(spec, fmt)
        labels.update(item.label for item in items if item.label)
    labels.discard("")
    return sorted(labels)
