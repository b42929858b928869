"""AudioCaps: ``train.csv`` / ``val.csv`` / ``test.csv`` with ``audiocap_id,youtube_id,start_time,caption``.

AudioCaps ships no audio: downloaders name the clips differently, so each clip is looked up under the
names they use. Rows of the same clip (5 per clip in val/test) become one item; a clip whose audio is
missing still yields an item (problem ``missing_file``) so it is counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shards_tools.config import InputSpec
from shards_tools.items import ItemError, SourceItem
from shards_tools.readers.common import (
    INPUT_EXTENSIONS,
    captions_from_value,
    csv_header,
    csv_rows,
    input_path,
    is_media,
    media_root,
    no_caption,
    require_columns,
    require_file,
    walk_files,
)

AUDIOCAPS_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
CLIP_SECONDS = 10


def default_audio_dirs(csv_path: Path) -> list[Path]:
    """``val.csv`` -> ``val/``, ``audio/val/``, ``../audio/val/``, ``audio/``, else the CSV's folder."""
    folder, split = csv_path.parent, csv_path.stem
    return [
        folder / split,
        folder / "audio" / split,
        folder.parent / "audio" / split,
        folder / "audio",
        folder,
    ]


def index_audio(root: Path) -> dict[str, Path]:
    """File stem -> audio path under `root`; when a stem has several files, the earlier extension in
    INPUT_EXTENSIONS["audio"] wins (wav before flac before ogg...)."""
    rank = {ext: i for i, ext in enumerate(INPUT_EXTENSIONS["audio"])}
    found: dict[str, Path] = {}
    for path in walk_files(root):
        if not is_media(path.name, "audio"):
            continue
        stem, ext = os.path.splitext(path.name)
        current = found.get(stem)
        if current is None or rank[ext.lower()] < rank[current.suffix.lower()]:
            found[stem] = path
    return found


def candidate_stems(youtube_id: str, start_time: str, audiocap_ids: list[str]) -> list[str]:
    """File stems a downloader may have used for a clip, most specific first (no duplicates).

    ``{ytid}_{start}``, AudioSet-style ``Y{ytid}_{start:.3f}_{end:.3f}``, ``{audiocap_id}``, ``{ytid}``,
    ``Y{ytid}``.
    """
    stems = [f"{youtube_id}_{start_time}", f"Y{youtube_id}_{start_time}"]
    try:
        start = float(start_time)
    except ValueError:
        start = None
    if start is not None:
        end = start + CLIP_SECONDS
        for prefix in ("", "Y"):
            stems += [f"{prefix}{youtube_id}_{start:.3f}_{end:.3f}", f"{prefix}{youtube_id}_{start:g}"]
    stems += [*audiocap_ids, youtube_id, f"Y{youtube_id}"]
    return list(dict.fromkeys(stems))


def read_audiocaps(spec: InputSpec) -> Iterator[SourceItem]:
    """One item per clip (youtube_id, start_time), in order of first appearance; uid ``{ytid}_{start}``."""
    path = require_file(input_path(spec), "AudioCaps CSV")
    require_columns(path, csv_header(path), AUDIOCAPS_COLUMNS[1:], "AudioCaps")
    root = media_root(spec, default_audio_dirs(path), "AudioCaps audio")
    clips = _group_clips(path)
    audio = index_audio(root)

    def items() -> Iterator[SourceItem]:
        for (youtube_id, start_time), (captions, audiocap_ids) in clips.items():
            stems = candidate_stems(youtube_id, start_time, audiocap_ids)
            found = next((audio[stem] for stem in stems if stem in audio), None)
            meta: dict[str, Any] = {
                "youtube_id": youtube_id,
                "start_time": start_time,
                "audiocap_ids": audiocap_ids,
            }
            problem = None
            if found is None:
                problem = ItemError(
                    "missing_file",
                    f"no audio for youtube_id {youtube_id} (start {start_time}) in {root}; "
                    f"looked for {', '.join(stems)} with extension {'/'.join(INPUT_EXTENSIONS['audio'])}",
                )
            elif not captions:
                problem = no_caption(f"AudioCaps clip {youtube_id} has no caption")
            source = str(found or root / f"{youtube_id}.wav")
            yield SourceItem(source, captions, meta=meta, uid=f"{youtube_id}_{start_time}", problem=problem)

    return items()


def _group_clips(path: Path) -> dict[tuple[str, str], tuple[list[str], list[str]]]:
    """(youtube_id, start_time) -> (captions, audiocap_ids), in order of first appearance."""
    clips: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for _, row in csv_rows(path):
        key = ((row.get("youtube_id") or "").strip(), (row.get("start_time") or "").strip())
        if not key[0]:
            continue
        captions, audiocap_ids = clips.setdefault(key, ([], []))
        captions.extend(captions_from_value(row.get("caption")))
        if row.get("audiocap_id"):
            audiocap_ids.append(row["audiocap_id"].strip())
    return clips
