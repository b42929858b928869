"""A momentum teacher: an exponential moving average of the model that judges whether pairs match.

The EMA smooths out the student's step-to-step noise, so its per-pair losses separate clean from
mismatched pairs earlier and more stably; it can also supply soft targets (its own distribution over the
batch) that stop the student from being pulled hard towards a wrong caption.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmcl.losses import contrastive_loss
from mmcl.losses.distributed import gather_no_grad
from mmcl.noise.local_fdr import null_pvalues


class MomentumTeacher:
    """An EMA copy of a DualEncoder without gradients: dropout and augmentation off, and the BatchNorms
    the student trains normalizing with the current batch's statistics.

    Batch statistics, as the momentum encoders of MoCo and BYOL use: running statistics gathered under
    other weights than the averaged ones shift the teacher's features until its losses no longer tell
    matched from mismatched pairs, and weighting by them collapses training. BatchNorms the student keeps in
    eval mode (a frozen tower) stay so.
    """

    def __init__(self, model: nn.Module, momentum: float) -> None:
        self.model = copy.deepcopy(model).train()
        batch_statistics = [m for m in self.model.modules() if isinstance(m, _BatchNorm) and m.training]
        self.model.eval()
        for module in batch_statistics:
            module.train()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.momentum = momentum

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, after each optimizer step."""
        for teacher_param, param in zip(self.model.parameters(), model.parameters(), strict=True):
            teacher_param.lerp_(param.detach(), 1.0 - self.momentum)

    @torch.no_grad()
    def judge(self, media: Tensor, tokens: Tensor, soft_targets: bool) -> dict:
        """Per-pair teacher losses (high = likely mismatched), their in-batch p-values (`null_pvalues`, for
        the weighting's gate) and, if asked, its target distributions over the global batch for both
        directions (rows of this rank's media and texts)."""
        out = self.model(media, tokens)
        probe = contrastive_loss(out["media_features"], out["text_features"], out["logit_scale"])
        pvalues = null_pvalues(out["media_features"], out["text_features"], out["logit_scale"])
        result = {"per_sample_loss": probe["per_sample_loss"], "pvalues": pvalues, "soft_targets": None}
        if soft_targets:
            all_media = gather_no_grad(out["media_features"])
            all_text = gather_no_grad(out["text_features"])
            scale = out["logit_scale"]
            media_to_text = (scale * out["media_features"] @ all_text.T).softmax(dim=-1)
            text_to_media = (scale * out["text_features"] @ all_media.T).softmax(dim=-1)
            result["soft_targets"] = (media_to_text, text_to_media)
        return result

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)
