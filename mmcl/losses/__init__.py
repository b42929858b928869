"""Contrastive losses for paired media/text embeddings: weighted (noise-aware), with global negatives under
DDP."""

from mmcl.losses.common import LossOutput
from mmcl.losses.contrastive import WEIGHT_SUM_EPS, contrastive_loss
from mmcl.losses.distributed import gather_no_grad, gather_with_grad, rank_and_world_size
from mmcl.losses.siglip import sigmoid_loss

__all__ = [
    "WEIGHT_SUM_EPS",
    "LossOutput",
    "contrastive_loss",
    "gather_no_grad",
    "gather_with_grad",
    "rank_and_world_size",
    "sigmoid_loss",
]
