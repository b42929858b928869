"""Helpers shared by the readers: media extensions, caption cleaning, safe path resolution, CSV streaming."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from shards_tools.config import InputSpec
from shards_tools.errors import UsageError
from shards_tools.fetch import HTTP_SCHEMES, url_scheme
from shards_tools.items import ItemError
from shards_tools.shard_format import MAX_META_BYTES

# The media files a reader takes as input, by extension (any format decode.py may open, in any case); the
# extensions of media *members* in shards are shard_format.MEDIA_EXTENSIONS.
INPUT_EXTENSIONS = {
    "image": (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    "audio": (".wav", ".flac", ".ogg", ".mp3", ".oga", ".opus"),
}
CAPTION_EXTENSIONS = (".txt", ".json")


def is_media(name: str, modality: str) -> bool:
    """Whether a file name has one of the modality's media extensions (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in INPUT_EXTENSIONS[modality]


def decode_text(data: bytes) -> str:
    """UTF-8 text with invalid bytes kept as surrogates, so the encoder can report ``caption_not_utf8``."""
    return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def captions_from_value(value: Any) -> list[str]:
    """The non-blank captions in a cell: a string is one caption, a list (JSON/parquet) several."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    stripped = (v.strip() if isinstance(v, str) else str(v).strip() for v in values if v is not None)
    return [caption for caption in stripped if caption]


def template_captions(label: str, templates: Sequence[str]) -> list[str]:
    """One caption per template, ``{label}`` replaced by the label with ``_`` read as a space."""
    name = label.replace("_", " ")
    return [template.replace("{label}", name) for template in templates]


def no_caption(detail: str) -> ItemError:
    return ItemError("empty_caption", detail)


def read_small_file(path: Path) -> bytes:
    """A caption or metadata file beside the media, at most MAX_META_BYTES; ItemError otherwise."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_META_BYTES + 1)
    except OSError as err:
        raise ItemError("missing_file", f"{path}: cannot read: {err.strerror or err}") from None
    if len(data) > MAX_META_BYTES:
        raise ItemError("too_large", f"{path}: over {MAX_META_BYTES:,} bytes for a caption or metadata file")
    return data


def is_within(path: str, root: str) -> bool:
    """Whether normalised absolute `path` is `root` or lies below it."""
    return os.path.commonpath([path, root]) == root


def local_source(root: str, value: str, allow_outside: bool) -> tuple[str, ItemError | None]:
    """Absolute path of `value` (relative to `root` unless absolute) and a problem if it leaves `root`.

    The check is lexical (``..`` and absolute paths), so a symlink the user placed inside the root is
    followed like any folder: it guards against manifests pointing anywhere, not against the user.
    """
    resolved = os.path.normpath(os.path.join(root, value))
    if allow_outside or is_within(resolved, root):
        return resolved, None
    return resolved, ItemError(
        "path_escapes_root",
        f"{value} resolves to {resolved}, outside {root} (--allow-outside-root accepts such paths)",
    )


def resolve_source(root: str, value: str, allow_outside: bool) -> tuple[str, ItemError | None]:
    """A manifest's (non-empty) path-or-URL cell as a SourceItem source, with the problem that rules it
    out if any: a scheme other than http(s), or a path leaving `root`."""
    scheme = url_scheme(value)
    if scheme in HTTP_SCHEMES:
        return value, None
    if scheme is not None:
        return value, ItemError(
            "unsupported_url",
            f"{value}: scheme {scheme}: is not supported; use http(s) URLs or local paths "
            "(write ./NAME for a local file whose name contains ':')",
        )
    return local_source(root, value, allow_outside)


def input_path(spec: InputSpec) -> Path:
    """The input path made absolute and normalised (lexically: symlinks stay as the user named them)."""
    return Path(os.path.abspath(os.path.expanduser(spec.path)))


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist or is not a file")
    return path


def media_root(spec: InputSpec, candidates: Sequence[Path], what: str) -> Path:
    """spec.media_root if set, else the first existing candidate; UsageError naming them all otherwise."""
    if spec.media_root is not None:
        root = Path(os.path.abspath(os.path.expanduser(spec.media_root)))
        if not root.is_dir():
            raise UsageError(f"--media-root {root} is not a folder")
        return root
    for candidate in candidates:
        if candidate.is_dir():
            return Path(os.path.normpath(candidate))
    tried = ", ".join(str(Path(os.path.normpath(c))) for c in candidates)
    raise UsageError(f"cannot find the {what} folder for {spec.path} (tried {tried}); pass --media-root")


def walk_folders(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """Each folder under `root` (itself first) with its sorted file names; subfolders in sorted order.

    Hidden entries (``.DS_Store``, ``.ipynb_checkpoints``) are skipped; symlinked folders are followed,
    each real folder once (a link cycle is not walked forever).
    """
    seen: set[str] = set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(folder), sorted(name for name in filenames if not name.startswith("."))


def walk_files(root: Path) -> Iterator[Path]:
    """Every file under `root` in walk_folders order: a folder's files before its subfolders."""
    for folder, names in walk_folders(root):
        for name in names:
            yield folder / name


def label_templates(spec: InputSpec) -> list[str]:
    """The caption templates for labelled inputs; UsageError if one lacks ``{label}`` (all captions alike)."""
    templates = spec.caption_templates()
    for template in templates:
        if "{label}" not in template:
            raise UsageError(
                f"caption template {template!r} has no {{label}}: every caption would be the same"
            )
    return templates


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UsageError(f"{what} {path} does not exist or is not a folder")
    return path


def parse_int(value: str | None, where: str, column: str) -> int:
    """An integer cell of a dataset's metadata table; UsageError naming the row if it is not one."""
    try:
        return int(str(value).strip())
    except ValueError:
        raise UsageError(f"{where}: column {column!r} should be an integer, got {value!r}") from None


def require_columns(path: Path, header: Sequence[str], needed: Sequence[str], layout: str) -> None:
    """UsageError naming the missing columns when a dataset's table lacks the layout's columns."""
    missing = [name for name in needed if name not in header]
    if missing:
        raise UsageError(
            f"{path} is not a {layout} table: missing column(s) {', '.join(missing)}; "
            f"its columns are: {', '.join(header) or '(none)'}"
        )


def open_text(path: Path) -> TextIO:
    """Open a text input: UTF-8 with optional BOM, invalid bytes kept as surrogates, newlines untouched."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def read_header_line(path: Path) -> str:
    """The first line of a text file (empty for an empty file)."""
    with open_text(path) as f:
        return f.readline().strip()


def _dict_reader(f: TextIO, path: Path, delimiter: str, quoting: int) -> csv.DictReader:
    """A DictReader whose column names are stripped (``image_name| comment`` has padded names)."""
    reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
    try:
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
    except csv.Error as err:
        raise UsageError(f"{path}: cannot parse the header: {err}") from None
    return reader


def csv_header(path: Path, delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL) -> list[str]:
    """The column names of a CSV/TSV file, stripped."""
    with open_text(path) as f:
        return list(_dict_reader(f, path, delimiter, quoting).fieldnames or [])


def csv_rows(
    path: Path, delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL
) -> Iterator[tuple[int, dict[str, str]]]:
    """Stream (line number, row) pairs of a CSV/TSV file; memory does not grow with the file.

    A malformed row raises UsageError naming the file and line.
    """
    with open_text(path) as f:
        reader = _dict_reader(f, path, delimiter, quoting)
        try:
            for row in reader:
                yield reader.line_num, row
        except csv.Error as err:
            raise UsageError(f"{path}, line {reader.line_num}: {err}") from None


def lower_names(names: Iterable[str]) -> dict[str, str]:
    """Map lower-case column names to the names as written, for case-insensitive lookups."""
    mapping: dict[str, str] = {}
    for name in names:
        mapping.setdefault(name.lower(), name)
    return mapping
