"""What each noise.method measures: per pair of a step, a signal (higher = more likely mismatched) that
`PairWeighter` turns into weights.

`METHODS` maps a noise.method to its class; a new method is a `Method` subclass registered here, its name in
`NoiseConfig.method`, and, when its signal needs another estimator than the mixture, a case in PairWeighter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmcl.errors import RunFailed
from mmcl.losses.distributed import rank_and_world_size
from mmcl.noise.config import NoiseConfig
from mmcl.noise.local_fdr import null_pvalues
from mmcl.noise.teacher import MomentumTeacher

# The training loss without weights: (media_features, text_features, logit_scale, logit_bias) -> a dict with
# "per_sample_loss" (the trainer's loss of the configured kind, so a signal of losses is the one trained on).
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], dict]
# The model's forward outputs for the step's pairs ("media_features", "text_features", "logit_scale",
# "logit_bias"), detached.
Outputs = Mapping[str, Tensor | None]


@dataclass
class Signal:
    """A step's evidence on this rank's pairs."""

    values: Tensor  # [B] per pair, higher = more likely mismatched
    pvalues: Tensor | None = None  # [B] in-batch p-values of the same model, for the mixture methods' gate
    soft_targets: tuple[Tensor, Tensor] | None = None  # replaces the one-hot targets of the loss, when given


class Method:
    """One noise.method. `signal` is called once per optimizer step; the other hooks are for a method with
    state of its own (the teacher's weights), which checkpoints keep as tensors."""

    def __init__(self, cfg: NoiseConfig, model: nn.Module, loss: LossFn) -> None:
        self.cfg = cfg

    def signal(self, batches: list[dict], outputs: Outputs) -> Signal:
        raise NotImplementedError

    def to(self, device: torch.device) -> None:
        """Put the method's own modules on the training device."""

    def after_update(self, model: nn.Module) -> None:
        """Called after each applied optimizer step with the (unwrapped) trained model."""

    def tensors(self) -> dict[str, Tensor]:
        return {}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore what `tensors` returned."""


class LocalFdrMethod(Method):
    """local_fdr: each pair's p-value against the batch's own mismatched (off-diagonal) pairs."""

    def signal(self, batches: list[dict], outputs: Outputs) -> Signal:
        return Signal(
            null_pvalues(outputs["media_features"], outputs["text_features"], outputs["logit_scale"])
        )


class LossMixtureMethod(Method):
    """loss_mixture: the student's own per-pair training loss, with its in-batch p-values for the gate."""

    def __init__(self, cfg: NoiseConfig, model: nn.Module, loss: LossFn) -> None:
        super().__init__(cfg, model, loss)
        self.loss = loss

    def signal(self, batches: list[dict], outputs: Outputs) -> Signal:
        media, text, scale = outputs["media_features"], outputs["text_features"], outputs["logit_scale"]
        with torch.no_grad():
            losses = self.loss(media, text, scale, outputs["logit_bias"])["per_sample_loss"]
        return Signal(losses, pvalues=null_pvalues(media, text, scale).float())


class TeacherMethod(Method):
    """teacher: a momentum (EMA) teacher's per-pair losses and p-values on the step's inputs, and with
    noise.soft_target_alpha > 0 its distributions mixed into the targets."""

    def __init__(self, cfg: NoiseConfig, model: nn.Module, loss: LossFn) -> None:
        super().__init__(cfg, model, loss)
        self.teacher = MomentumTeacher(model, cfg.teacher_momentum)

    def signal(self, batches: list[dict], outputs: Outputs) -> Signal:
        device = outputs["media_features"].device
        media = torch.cat([b["media"] for b in batches]).to(device)
        text = torch.cat([b["text"] for b in batches]).to(device)
        alpha = self.cfg.soft_target_alpha
        judged = self.teacher.judge(media, text, soft_targets=alpha > 0)
        soft = tuple(_mix_one_hot(t, alpha) for t in judged["soft_targets"]) if alpha > 0 else None
        return Signal(judged["per_sample_loss"], pvalues=judged["pvalues"].float(), soft_targets=soft)

    def to(self, device: torch.device) -> None:
        self.teacher.model.to(device)

    def after_update(self, model: nn.Module) -> None:
        self.teacher.update(model)

    def tensors(self) -> dict[str, Tensor]:
        return self.teacher.state_dict()

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.teacher.load_state_dict(tensors)


class AlignmentScoreMethod(Method):
    """alignment_score: the precomputed score in each sample's .json (higher = better match), negated."""

    def signal(self, batches: list[dict], outputs: Outputs) -> Signal:
        scores = alignment_scores(batches, "noise.method alignment_score")
        return Signal(-scores.to(outputs["media_features"].device))


def alignment_scores(batches: list[dict], needed_by: str) -> Tensor:
    """The batches' precomputed alignment scores in one tensor; RunFailed naming `needed_by` when a sample
    has none (no sidecar row, no .json field)."""
    scores = [b["alignment_score"] for b in batches]
    if any(s is None for s in scores) or torch.isnan(torch.cat(scores)).any():
        raise RunFailed(
            f"{needed_by} needs an alignment_score for every sample: a scores sidecar "
            "(data.sources[i].scores, written by `mmcl shard score`) or an 'alignment_score' in its .json "
            "(a manifest column when sharding); or choose another noise.method"
        )
    return torch.cat(scores)


METHODS: dict[str, type[Method]] = {
    "local_fdr": LocalFdrMethod,
    "loss_mixture": LossMixtureMethod,
    "teacher": TeacherMethod,
    "alignment_score": AlignmentScoreMethod,
}


def _mix_one_hot(teacher_rows: Tensor, alpha: float) -> Tensor:
    """(1 - alpha) * one-hot labels + alpha * the teacher's rows; row i's positive sits at global column
    rank * local_batch + i."""
    rank, _ = rank_and_world_size()
    rows = teacher_rows.shape[0]
    one_hot = torch.zeros_like(teacher_rows)
    one_hot[torch.arange(rows), rank * rows + torch.arange(rows)] = 1.0
    return (1.0 - alpha) * one_hot + alpha * teacher_rows
