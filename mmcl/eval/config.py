"""The typed schema of evaluation during training (the `eval:` section of a train config), and the check of
an evaluation's model flags.

No torch import, so a train config or an `mmcl eval` command line is checked before anything expensive is
built; unknown keys are errors, and every default lives here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmcl.errors import UsageError

ClassificationFormat = Literal[
    "auto", "shards", "class-folder", "cifar10", "cifar100", "esc50", "urbansound8k"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ZeroShotTask(_Strict):
    """One zero-shot classification set, e.g. `{name: cifar10, data: data/cifar, templates: short}`."""

    name: str = Field(min_length=1, description="prefix of this task's metrics, e.g. cifar10/acc1")
    data: str = Field(description="the dataset path (see `mmcl eval zero-shot --help` for the layouts)")
    format: ClassificationFormat = "auto"
    templates: str | None = Field(
        None,
        description="openai, short, audio or a template file; default: short for images, audio for audio",
    )
    folds: list[int] | None = Field(None, description="ESC-50 / UrbanSound8K folds to evaluate on")
    classes: str | None = Field(None, description="file of class names, one per line, in class-index order")


class RetrievalTask(_Strict):
    """One retrieval set: captioned shards, e.g. `{name: coco-val, data: shards/coco-val}`."""

    name: str = Field(min_length=1, description="prefix of this task's metrics")
    data: str = Field(description="a folder of shards, a .tar or a brace pattern")


class EvalConfig(_Strict):
    """What to evaluate every `every_steps` optimizer steps (0 turns periodic evaluation off)."""

    every_steps: int = Field(0, ge=0, description="evaluate every this many steps; 0: never")
    zero_shot: list[ZeroShotTask] = Field(default_factory=list)
    retrieval: list[RetrievalTask] = Field(default_factory=list)
    batch_size: int = Field(64, gt=0)
    max_samples: int | None = Field(
        1000, gt=0, description="items per task (an even subset), so evaluation stays short; null: all"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> EvalConfig:
        names = [task.name for task in [*self.zero_shot, *self.retrieval]]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"eval task names must be unique (they prefix the metrics): {repeated} repeat")
        return self


def check_model_choice(
    checkpoint: Path | None, open_clip_name: str | None, pretrained: str | None, hf_clap: str | None = None
) -> None:
    """Exactly one model (--checkpoint, --open-clip or --hf-clap), and --pretrained only with --open-clip;
    UsageError otherwise."""
    if sum(x is not None for x in (checkpoint, open_clip_name, hf_clap)) != 1:
        raise UsageError(
            "give exactly one model: --checkpoint RUN/checkpoints/step-..., --open-clip NAME or "
            "--hf-clap NAME"
        )
    if pretrained is not None and open_clip_name is None:
        raise UsageError("--pretrained goes with --open-clip; --checkpoint and --hf-clap hold their weights")
