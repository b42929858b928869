"""The typed schema of the training data section: where the shards are and how they are streamed.

Unknown keys are errors, every default lives here, and each validation message names the key and
says how to fix it. No torch import, so configs can be checked before anything expensive is built.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mmcl.errors import UsageError
from shards_tools.shard_format import check_shard_url
from shards_tools.tar_stream import DEFAULT_HTTP_TIMEOUT, DEFAULT_MAX_MEMBER_BYTES

PIPE_HINT = "set data.allow_pipe: true"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Strict):
    """One shard collection, e.g. `{urls: data/cc3m/, weight: 2.0}`."""

    urls: str | list[str] = Field(
        description="a local shard, a folder of shards (*.tar), a brace pattern "
        "(data/shard-{000000..000099}.tar), an http(s) URL or pattern, or a list of these",
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="relative probability that the next sample comes from this source; a source that "
        "runs out before the others starts over within the epoch",
    )
    num_samples: int | None = Field(
        None,
        gt=0,
        description="samples in the source; overrides sizes.json / manifest.json beside the shards",
    )

    scores: str | None = Field(
        None,
        description="a scores folder written by `mmcl shard score` for these shards: each sample's "
        "alignment_score is read from its sidecar (score_field) instead of its .json",
    )
    score_field: Literal["score", "weight"] = Field(
        "score", description="which number of the sidecar rows is the alignment_score"
    )

    @field_validator("urls")
    @classmethod
    def _non_empty(cls, urls: str | list[str]) -> str | list[str]:
        listed = [urls] if isinstance(urls, str) else urls
        if not listed or any(not u.strip() for u in listed):
            raise ValueError("urls is empty: give a shard path, a folder of shards or a brace pattern")
        return urls

    def url_list(self) -> list[str]:
        return [self.urls] if isinstance(self.urls, str) else list(self.urls)


class DataConfig(_Strict):
    """How training shards are read, mixed, shuffled, decoded and batched (the `data:` section)."""

    sources: list[SourceConfig] = Field(min_length=1, description="one or more shard collections to mix")
    allow_pipe: bool = Field(
        False, description="allow `pipe:COMMAND` URLs, which run COMMAND in a shell: only for trusted configs"
    )
    batch_size: int = Field(64, gt=0, description="samples per batch on each process")
    workers: int = Field(
        2, ge=0, description="DataLoader worker processes per training process (0: in-process)"
    )
    shuffle_buffer: int = Field(
        1000, ge=0, description="samples held for shuffling per worker (0 or 1: no shuffle)"
    )
    shard_shuffle: bool = Field(True, description="permute the shard order every epoch (seeded)")
    resampled: bool = Field(
        False, description="draw shards with replacement (each worker draws its own); for few, large shards"
    )
    seed: int = Field(0, description="seeds shard order, mixing, shuffling and per-sample augmentation")
    sample_rate: int = Field(
        16000, gt=0, description="audio: Hz the waveforms are resampled to (the model's rate)"
    )
    clip_seconds: float = Field(
        10.0, gt=0, description="audio: clip length; longer clips are cropped, shorter repeated"
    )
    random_crop: bool = Field(True, description="audio: a random window of long clips (else the centre)")
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="audio: hand recordings over whole up to this length (NaN-padded) instead of cropping "
        "them to clip_seconds; follows model.audio.long_clips / max_seconds",
    )
    image_size: int | None = Field(
        None,
        gt=0,
        description="image: the model's input size; lets JPEG decoding downscale early (a hint only)",
    )
    image_on_device: bool | Literal["auto"] = Field(
        "auto",
        description="image: where the resize runs. With open_clip's plain train transform loader workers "
        "hand over uint8 pixels and the training device converts and normalises them (the same tensors as "
        "the transform run whole in a worker, a quarter of the bytes). auto: on an accelerator (GPU) workers "
        "only decode and crop, and the resize runs batched on the device too (mmcl.data.device_transform), "
        "which frees most of a worker's time per image; on a CPU the workers resize. true: resize on the "
        "device also on CPU (slower there), an error for a transform the device cannot reproduce; false: "
        "resize in the workers. Other transforms (colour jitter, timm's) run whole in the workers",
    )
    max_member_bytes: int = Field(
        DEFAULT_MAX_MEMBER_BYTES,
        gt=0,
        description="largest tar member read (media; .txt/.json/.cls are capped at 1 MiB); a sample with a "
        "larger or sparse member is skipped and counted",
    )
    http_timeout: float = Field(
        DEFAULT_HTTP_TIMEOUT,
        gt=0,
        description="seconds an http(s) shard may take to answer, or to deliver 64 KiB; a stalled shard is "
        "abandoned with a warning and the stream goes on",
    )

    @field_validator("image_on_device", mode="before")
    @classmethod
    def _true_false_or_auto(cls, value: object) -> object:
        # one message instead of pydantic's one per member of the union
        if value is True or value is False or value == "auto":
            return value
        raise ValueError("must be true, false or auto")

    @model_validator(mode="after")
    def _check_schemes(self) -> DataConfig:
        for i, source in enumerate(self.sources):
            for url in source.url_list():
                try:
                    check_shard_url(
                        url, allow_pipe=self.allow_pipe, where=f"data.sources[{i}].urls", allow_hint=PIPE_HINT
                    )
                except UsageError as err:
                    raise ValueError(str(err).removeprefix(f"data.sources[{i}].urls: ")) from None
        return self
