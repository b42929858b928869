"""Weighted symmetric InfoNCE (the CLIP/CLAP loss) with global negatives: noisy pairs are down-weighted, not
dropped."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcl.losses.common import LossOutput, check_features, local_weights
from mmcl.losses.distributed import gather_no_grad, gather_with_grad, rank_and_world_size

WEIGHT_SUM_EPS = 1e-8
"""Floor of the weight sum: a batch whose weights are all zero gives a zero loss and gradient, not NaN."""

SoftTargets = Tensor | tuple[Tensor, Tensor]


def contrastive_loss(
    media_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    weights: Tensor | None = None,
    *,
    logit_bias: Tensor | float | None = None,
    gather: bool = True,
    local_loss: bool = False,
    soft_targets: SoftTargets | None = None,
    unlearn_weight: float = 0.0,
) -> LossOutput:
    """Weighted symmetric InfoNCE over this rank's pairs, with every rank's pairs as negatives.

    ``loss = sum_i w_i * (CE_media->text(i) + CE_text->media(i)) / 2 / sum_i w_i`` over the global batch.
    A weight scales pair i's own term in both directions; the logits are unchanged, so a down-weighted
    pair still serves as a negative for every other pair. With ``weights=None`` this is open_clip's
    ``ClipLoss`` (``gather_with_grad=True`` when distributed).

    Args:
        media_features: ``[B, D]`` L2-normalized media embeddings of this rank.
        text_features: ``[B, D]`` L2-normalized text embeddings; row i is paired with media row i.
        logit_scale: the exponentiated temperature (what open_clip models return).
        weights: ``[B]`` per-pair weights in [0, 1], treated as constants (no gradient); None = all ones.
        logit_bias: optional additive bias (softmax cross-entropy is invariant to it; kept for parity).
        gather: use the pairs of every rank of the default process group as negatives. Every rank must
            then hold the same number of pairs. Ignored when not distributed.
        local_loss: when distributed, compute only this rank's rows (``[B, B_global]`` logits) instead of
            the whole ``[B_global, B_global]`` matrix on every rank; same gradients, less compute.
        soft_targets: optional target distributions over the global batch replacing the one-hot labels
            (no gradient), e.g. one-hot mixed with a momentum teacher's softmax. A ``[B, B_global]``
            tensor is used for both directions: row i is the target of media i over all texts and of
            text i over all media. A pair ``(media_to_text, text_to_media)`` gives each direction its own
            rows; for a teacher matrix ``S = s * M @ T.T`` the second is the rows of ``S.T`` that belong
            to this rank's texts.
        unlearn_weight: negative learning on the pairs the weights doubt: adds
            ``unlearn_weight * sum_i (1 - w_i) * -(log(1 - p_i->t) + log(1 - p_t->i)) / 2 / B_global``, where
            ``p`` is the softmax probability of the pair's own partner in each direction. It pushes a doubted
            pair's media and text apart only as far as the model still matches them (``-log(1 - p) ~ p``), so
            a mismatched pair the model memorized before it was doubted is unlearned, while a doubted pair it
            never matched costs nothing. Needs ``weights`` in [0, 1]; 0 (the default) adds nothing.

    Returns:
        ``loss``, ``per_sample_loss`` (unweighted mean of the two directions, detached) and
        ``logits_per_media`` (``[B, B_global]``, this rank's rows, detached); see ``LossOutput``.

    Scaling under DDP: DDP averages parameter gradients over ranks, and ``gather_with_grad`` hands each
    rank the sum of the gradients that all ranks' losses send its features. So each rank returns a loss
    whose sum over ranks is ``world_size`` times the loss of the concatenated global batch: with
    ``local_loss=False`` every rank computes the global loss itself (as open_clip does); with
    ``local_loss=True`` rank r returns ``world_size * sum_{i in r} w_i l_i / sum_{all i} w_i``. Either
    way the averaged gradient equals the single-process gradient on the global batch.
    """
    check_features(media_features, text_features)
    batch = media_features.shape[0]
    rank, world_size = rank_and_world_size() if gather else (0, 1)
    weights = local_weights(weights, media_features)
    if world_size > 1:
        all_media = gather_with_grad(media_features)
        all_text = gather_with_grad(text_features)
        all_weights = gather_no_grad(weights)
    else:
        all_media, all_text, all_weights = media_features, text_features, weights
    global_batch = all_media.shape[0]
    targets = _soft_target_pair(soft_targets, batch, global_batch)

    if world_size > 1 and not local_loss:
        # The whole global matrix on every rank (open_clip's local_loss=False); this rank's rows are
        # sliced out for the per-sample outputs.
        logits_per_media = logit_scale * all_media @ all_text.T
        if logit_bias is not None:
            logits_per_media = logits_per_media + logit_bias
        logits_per_text = logits_per_media.T
        labels = torch.arange(global_batch, device=media_features.device)
        if targets is not None:
            targets = (gather_no_grad(targets[0]), gather_no_grad(targets[1]))
        row_weights, ranks_share = all_weights, 1
        rows = slice(rank * batch, (rank + 1) * batch)
    else:
        # This rank's rows against every column, in both directions.
        logits_per_media = logit_scale * media_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_media.T
        if logit_bias is not None:
            logits_per_media = logits_per_media + logit_bias
            logits_per_text = logits_per_text + logit_bias
        labels = torch.arange(batch, device=media_features.device) + rank * batch
        row_weights, ranks_share = weights, world_size
        rows = slice(None)

    media_targets, text_targets = targets if targets is not None else (labels, labels)
    per_sample = (
        F.cross_entropy(logits_per_media, media_targets, reduction="none")
        + F.cross_entropy(logits_per_text, text_targets, reduction="none")
    ) / 2
    loss = ranks_share * (row_weights * per_sample).sum() / all_weights.sum().clamp_min(WEIGHT_SUM_EPS)
    if unlearn_weight:
        doubt = (1.0 - row_weights).clamp(0.0, 1.0)
        unlearn = (
            -(_log_not_partner(logits_per_media, labels) + _log_not_partner(logits_per_text, labels)) / 2
        )
        loss = loss + unlearn_weight * ranks_share * (doubt * unlearn).sum() / global_batch
    return {
        "loss": loss,
        "per_sample_loss": per_sample[rows].detach(),
        "logits_per_media": logits_per_media[rows].detach(),
    }


def _log_not_partner(logits: Tensor, labels: Tensor) -> Tensor:
    """log(1 - softmax(logits)[r, labels[r]]) for each row r, without forming 1 - p (no cancellation)."""
    partner = F.one_hot(labels, logits.shape[1]).bool()
    return torch.logsumexp(logits.masked_fill(partner, float("-inf")), dim=1) - torch.logsumexp(logits, dim=1)


def _soft_target_pair(
    soft_targets: SoftTargets | None, batch: int, global_batch: int
) -> tuple[Tensor, Tensor] | None:
    """Return detached ``(media_to_text, text_to_media)`` targets, checking both are ``[B, B_global]``."""
    if soft_targets is None:
        return None
    pair = (soft_targets, soft_targets) if isinstance(soft_targets, Tensor) else tuple(soft_targets)
    if len(pair) != 2:
        raise ValueError("soft_targets must be a tensor or a (media_to_text, text_to_media) pair of tensors")
    for target in pair:
        if target.shape != (batch, global_batch):
            raise ValueError(
                f"soft_targets must be [local batch, global batch] = [{batch}, {global_batch}]; "
                f"got {tuple(target.shape)}"
            )
    return pair[0].detach(), pair[1].detach()
