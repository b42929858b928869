"""The unit every reader yields and every encoder consumes, and the error a bad item raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Why an item was skipped; counted by reason in manifest.json and listed in _errors.jsonl.
SKIP_REASONS = (
    "missing_file",  # the path does not exist
    "empty_file",  # zero bytes
    "too_large",  # a file, URL body or tar member over --max-bytes
    "decode_error",  # truncated or corrupt image/audio, or not a media file at all
    "decompression_bomb",  # image larger than Pillow's safety limit
    "too_small",  # smaller than --min-size
    "empty_caption",  # no caption, or only whitespace
    "caption_not_utf8",  # caption bytes are not valid UTF-8
    "fetch_error",  # URL unreachable after retries, HTTP error, timeout
    "path_escapes_root",  # a manifest path that points outside the input folder
    "unsupported_url",  # a scheme other than http(s) or a local path
    "duplicate_id",  # the same id appears twice in the input; the first is kept
)


@dataclass
class SourceItem:
    """One input pair before encoding.

    source: a local path (absolute, or relative to the reader's root), an http(s) URL, or a member of
      a tar file written as ``TARPATH#MEMBER`` (re-sharding img2dataset / WebDataset input).
    captions: one or more captions. Readers keep undecodable bytes as surrogate escapes
      (``errors="surrogateescape"``) so the encoder can report them as ``caption_not_utf8``.
    label: class name for labelled inputs (class folders, ESC-50), written as .cls and into .json.
    meta: anything else the input carries (manifest columns, dataset ids); copied into .json.
    uid: the dataset's own id where it has one; a repeated uid is skipped as ``duplicate_id``.
    problem: set by a reader that already knows the item is bad (a path escaping the input root, an
      undecodable caption file); the item is then recorded as skipped without being fetched.
    """

    source: str
    captions: list[str]
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    uid: str | None = None
    problem: ItemError | None = None


class ItemError(Exception):
    """A single bad item: skipped and recorded, never fatal to the run."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # readers attach ItemErrors to items that travel to worker processes: pickle by fields
        return (ItemError, (self.reason, self.detail))
