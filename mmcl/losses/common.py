"""The output contract shared by mmcl's losses and their input checks, so trainers and noise estimators can
swap losses."""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import Tensor


class LossOutput(TypedDict):
    """What every mmcl loss returns. Only ``loss`` carries gradient.

    loss: scalar to call ``backward()`` on (already scaled for DDP's gradient averaging).
    per_sample_loss: ``[B_local]``, detached and unweighted: each pair's own loss, for noise estimators.
    logits_per_media: ``[B_local, B_global]``, detached: this rank's media rows against every text.
    """

    loss: Tensor
    per_sample_loss: Tensor
    logits_per_media: Tensor


def check_features(media_features: Tensor, text_features: Tensor) -> None:
    """Raise ``ValueError`` unless both embeddings are ``[B, D]`` with the same shape."""
    if media_features.ndim != 2 or media_features.shape != text_features.shape:
        raise ValueError(
            "media_features and text_features must both be [B, D] with the same shape; got "
            f"{tuple(media_features.shape)} and {tuple(text_features.shape)}"
        )


def local_weights(weights: Tensor | None, media_features: Tensor) -> Tensor:
    """Return detached per-pair weights ``[B]`` (ones when ``weights`` is None), at least float32."""
    dtype = torch.promote_types(media_features.dtype, torch.float32)
    batch = media_features.shape[0]
    if weights is None:
        return torch.ones(batch, dtype=dtype, device=media_features.device)
    if weights.shape != (batch,):
        raise ValueError(
            f"weights must have shape [{batch}] (one per local pair); got {tuple(weights.shape)}"
        )
    return weights.detach().to(device=media_features.device, dtype=dtype)
