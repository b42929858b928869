"""The `noise:` section of a training config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The methods that compare each pair with the other pairs of its process's batch (the in-batch null), and the
# pairs per process and step they need: B (B - 1) off-diagonal pairs make the null: 56 at 8, 4,032 at 64.
IN_BATCH_NULL_METHODS = ("local_fdr", "loss_mixture")
IN_BATCH_NULL_MIN_PAIRS = 8


class NoiseConfig(BaseModel):
    """How pairs are weighted. `method: none` trains with the plain contrastive loss."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["none", "local_fdr", "loss_mixture", "teacher", "alignment_score"] = "none"
    warmup_steps: int = Field(
        200, ge=0, description="uniform weights until this step (the model must learn first)"
    )
    ramp_steps: int = Field(
        100, ge=0, description="then blend from uniform to estimated weights over this many steps"
    )
    floor: float = Field(0.0, ge=0, le=1, description="no pair weighs less than this")
    window: int = Field(
        4096, ge=64, description="recent per-pair signals (losses, p-values) the estimate is fitted on"
    )
    refit_every: int = Field(10, ge=1, description="steps between refits of the estimate")
    mixture: Literal["gaussian", "beta"] = "gaussian"
    teacher_momentum: float = Field(0.99, gt=0, lt=1, description="EMA momentum of the teacher's weights")
    soft_target_alpha: float = Field(
        0.0, ge=0, le=1, description="teacher: mix this much of the teacher's distribution into the targets"
    )
    unlearn_weight: float = Field(
        0.0,
        ge=0,
        description="negative learning on doubted pairs: push a pair apart by (1 - weight) x this, "
        "as far as the model still matches it (unlearns mismatched pairs memorized before they were doubted)",
    )
    score_range: tuple[float, float] | None = Field(
        None,
        description="alignment_score: scores mapped linearly to weights 0..1 (None: fit the mixture on them)",
    )
    combine_scores: bool = Field(
        False,
        description="local_fdr, loss_mixture, teacher: multiply their weights by each pair's alignment_score "
        "mapped through score_range, from the first step (precomputed scores and the in-training estimate)",
    )

    @model_validator(mode="after")
    def _check(self) -> NoiseConfig:
        if self.soft_target_alpha and self.method != "teacher":
            raise ValueError("noise.soft_target_alpha needs noise.method: teacher (the targets come from it)")
        if self.unlearn_weight and self.method == "none":
            raise ValueError(
                "noise.unlearn_weight needs a noise.method (it acts on the pairs the estimate doubts); "
                "set noise.method, e.g. loss_mixture, or unlearn_weight: 0"
            )
        if self.combine_scores and (self.method in ("none", "alignment_score") or self.score_range is None):
            raise ValueError(
                "noise.combine_scores multiplies an in-training estimate by the mapped alignment scores: it "
                "needs noise.method local_fdr, loss_mixture or teacher, and noise.score_range [low, high]"
            )
        if self.score_range is not None and not self.score_range[0] < self.score_range[1]:
            raise ValueError(
                f"noise.score_range must be [low, high] with low < high, got {list(self.score_range)}"
            )
        return self

    def check_pairs_per_step(self, pairs: int) -> None:
        """ValueError when the method needs more pairs per process and step (data.batch_size x
        train.accumulation_steps) than `pairs`."""
        if self.method in IN_BATCH_NULL_METHODS and pairs < IN_BATCH_NULL_MIN_PAIRS:
            raise ValueError(
                f"noise.method {self.method} compares each pair with the other pairs of its "
                f"process's batch: data.batch_size x train.accumulation_steps = {pairs} is "
                f"too few; raise it to at least {IN_BATCH_NULL_MIN_PAIRS} or choose noise.method: teacher"
            )
