"""Typed, validated options of `mmcl shard image-text|audio-text`.

Everything is checked before any work starts; a bad value raises UsageError naming the option and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shards_tools.errors import UsageError

InputFormat = Literal[
    "auto",
    "csv",
    "tsv",
    "jsonl",
    "parquet",
    "folder",
    "class-folder",
    "coco",
    "flickr30k",
    "audiocaps",
    "clotho",
    "esc50",
    "urbansound8k",
    "webdataset",
]
ResizeMode = Literal["none", "keep-ratio-largest", "center-crop", "shortest-side"]

DEFAULT_TEMPLATES = {
    "image": ["a photo of a {label}."],
    "audio": ["the sound of a {label}."],
}


class InputSpec(BaseModel):
    """Where the pairs come from and how to read them (the readers' whole contract)."""

    model_config = ConfigDict(extra="forbid")

    modality: Literal["image", "audio"]
    path: Path
    format: InputFormat = "auto"
    media_root: Path | None = None  # folder of the media for layouts that keep them apart (COCO, Clotho...)
    url_column: str | None = None  # manifests: column with the path or URL (auto-detected when None)
    caption_columns: list[str] | None = None  # manifests: caption column(s) (auto-detected when None)
    label_column: str | None = None  # manifests: optional class label column
    templates: list[str] | None = None  # class folders / ESC-50: caption templates with {label}
    folds: list[int] | None = None  # ESC-50 / UrbanSound8K: keep only these folds
    allow_outside_root: bool = False  # manifests: accept paths that resolve outside the manifest's folder

    def caption_templates(self) -> list[str]:
        return self.templates or DEFAULT_TEMPLATES[self.modality]


class ImageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_size: int | None = Field(default=None, ge=1)
    resize_mode: ResizeMode = "keep-ratio-largest"
    min_size: int = Field(default=0, ge=0)
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    quality: int = Field(default=95, ge=1, le=100)


class AudioOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_rate: int | None = Field(default=None, ge=1000, le=384000)
    max_seconds: float | None = Field(default=None, gt=0)
    mono: bool = True
    audio_format: Literal["flac", "wav"] = "flac"


DEFAULT_MAX_BYTES = 64 << 20


class FetchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout: float = Field(default=10.0, gt=0)  # seconds per connection attempt and per read
    retries: int = Field(default=2, ge=0)
    deadline: float = Field(default=60.0, gt=0)  # seconds per URL in all, retries included
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1)  # largest file, URL body or tar member read
    threads: int = Field(
        default=16, ge=1
    )  # concurrent URL downloads per worker process (img2dataset's thread_count)


class ShardConfig(BaseModel):
    """All options of one sharding run. `options_fingerprint()` decides whether a re-run may resume."""

    model_config = ConfigDict(extra="forbid")

    input: InputSpec
    output: Path
    prefix: str = Field(default="shard", pattern=r"^[A-Za-z0-9_\-]+$")
    shard_size: int = Field(default=1000, ge=1)
    max_shard_bytes: int | None = Field(default=None, ge=1)
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    distributor: Literal["multiprocessing", "ray"] = "multiprocessing"
    part: tuple[int, int] | None = None  # (K, N): this run does part K of N (0-based K)
    seed: int = 0
    shuffle: bool = False
    noise_rate: float = Field(default=0.0, ge=0.0, lt=1.0)
    max_error_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    image: ImageOptions = ImageOptions()
    audio: AudioOptions = AudioOptions()
    fetch: FetchOptions = FetchOptions()

    @model_validator(mode="after")
    def _check(self) -> ShardConfig:
        if self.part is not None:
            k, n = self.part
            if n < 1 or not 0 <= k < n:
                raise ValueError(f"--part must be K/N with 0 <= K < N, got {k}/{n}")
        return self

    @property
    def modality(self) -> str:
        return self.input.modality

    def output_options(self) -> dict:
        """The options that shape the output; a resumed run must match them exactly."""
        keep = self.model_dump(
            mode="json",
            exclude={
                "output": True,
                "workers": True,
                "distributor": True,
                "part": True,
                "max_error_rate": True,
                "fetch": {"threads": True},
            },
        )
        keep["input"]["path"] = str(Path(self.input.path).resolve())
        if self.input.media_root is not None:
            keep["input"]["media_root"] = str(Path(self.input.media_root).resolve())
        keep.pop("audio" if self.modality == "image" else "image")
        return keep


def format_validation_error(err: ValidationError, flag_names: dict[str, str] | None = None) -> str:
    """One line per problem, naming the option as the user typed it (``--shard-size``), not pydantic's
    path."""
    flag_names = flag_names or {}
    lines = []
    for problem in err.errors():
        loc = ".".join(str(p) for p in problem["loc"] if not isinstance(p, int) or len(problem["loc"]) == 1)
        name = flag_names.get(loc, loc or "config")
        got = problem.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{name}: {problem['msg'].removeprefix('Value error, ')}{got_text}")
    return "\n".join(lines)


def build_config(fields: dict, flag_names: dict[str, str] | None = None) -> ShardConfig:
    """Validate user options into a ShardConfig or raise UsageError with a readable message."""
    try:
        return ShardConfig.model_validate(fields)
    except ValidationError as err:
        raise UsageError(format_validation_error(err, flag_names)) from None
