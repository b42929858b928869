"""Weighted sigmoid (SigLIP) pair loss with global negatives: weights scale positives, noisy pairs stay
negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcl.losses.common import LossOutput, check_features, local_weights
from mmcl.losses.distributed import gather_with_grad, rank_and_world_size


def sigmoid_loss(
    media_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    weights: Tensor | None = None,
    *,
    gather: bool = True,
    unlearn_weight: float = 0.0,
) -> LossOutput:
    """Weighted SigLIP loss: this rank's media against the texts of every rank.

    ``loss = (1 / B) * sum_i [w_i * -log sigmoid(z_ii) + sum_{j != i} -log sigmoid(-z_ij)]`` with
    ``z = logit_scale * media @ texts.T + logit_bias``. With ``weights=None`` this is open_clip's
    ``SigLipLoss`` (whose distributed modes give the same value on each rank).

    Args:
        media_features: ``[B, D]`` L2-normalized media embeddings of this rank.
        text_features: ``[B, D]`` L2-normalized text embeddings; row i is paired with media row i.
        logit_scale: the exponentiated temperature.
        logit_bias: the learned bias (SigLIP initializes it around -10).
        weights: ``[B]`` per-pair weights in [0, 1] for the positive terms (no gradient); None = all ones.
        gather: use the texts of every rank of the default process group as negatives (every rank must
            hold the same number of pairs). Ignored when not distributed.
        unlearn_weight: negative learning on the pairs the weights doubt: pair i's diagonal also gets
            ``unlearn_weight * (1 - w_i) * -log sigmoid(-z_ii)``, the negative term it would have as a
            mismatch (see ``contrastive_loss``). Needs ``weights`` in [0, 1]; 0 (the default) adds nothing.

    Returns:
        ``loss``, ``per_sample_loss`` (pair i's unweighted positive term ``-log sigmoid(z_ii)``,
        detached) and ``logits_per_media`` (``[B, B_global]``, detached); see ``LossOutput``.

    Weights scale only the positive (diagonal) terms. Negative terms stay unweighted: a mismatched pair
    (media i, text i) is still a valid negative for every other text and media, so a down-weighted pair
    keeps teaching "these do not match". The sum is divided by the local batch size, as in open_clip, and
    the weights are not renormalized: each sigmoid term is an independent binary loss (there is no softmax
    row to renormalize), ``w_i`` reads as the confidence that pair i is a true positive, and dividing by
    ``sum w`` would inflate the surviving positives and shift the learned bias.

    Scaling under DDP: rank r sums its media rows against all global texts and divides by ``B``; the sum
    over ranks is ``world_size`` times the single-process loss of the global batch (divided by
    ``B_global``), so DDP's averaged gradient equals the single-process gradient on the global batch.
    """
    check_features(media_features, text_features)
    batch = media_features.shape[0]
    rank, world_size = rank_and_world_size() if gather else (0, 1)
    weights = local_weights(weights, media_features)
    all_text = gather_with_grad(text_features) if world_size > 1 else text_features

    logits = logit_scale * media_features @ all_text.T + logit_bias
    rows = torch.arange(batch, device=logits.device)
    positive_cols = rows + rank * batch
    is_positive = torch.zeros_like(logits, dtype=torch.bool)
    is_positive[rows, positive_cols] = True
    pair_loss = -F.logsigmoid(torch.where(is_positive, logits, -logits))
    positive = pair_loss[rows, positive_cols]
    negative = pair_loss.masked_fill(is_positive, 0.0).sum(dim=1)
    loss = (weights * positive + negative).sum() / batch
    if unlearn_weight:
        doubt = (1.0 - weights).clamp(0.0, 1.0)
        loss = loss + unlearn_weight * (doubt * -F.logsigmoid(-logits[rows, positive_cols])).sum() / batch
    return {"loss": loss, "per_sample_loss": positive.detach(), "logits_per_media": logits.detach()}
