"""Recordings longer than the audio tower's window (`model.audio.long_clips`), in training and evaluation.

* `crop` (default): the data pipeline cuts every recording to one window of clip_seconds (a random one
  in training, the centre in evaluation) and repeats a shorter one; the tower sees [B, clip_samples].
* `average`: the pipeline hands each recording over whole, up to `max_seconds`, padded with NaN to
  [B, max_samples] (mmcl.data.audio.MARKED_PAD), so each clip's length travels in the one tensor. The
  clip is cut into consecutive windows of clip_samples, the last one ending at the clip's end (so it
  overlaps the one before rather than being padded); a clip shorter than a window is repeated to fill it,
  as the pipeline repeats short clips. The tower embeds every window; the clip's embedding is the mean
  of its windows' L2-normalised embeddings.
* `fusion` (CLAP models with enable_fusion): the same whole clips go to the tower, whose features are
  CLAP's fusion input (mmcl.models.hf_audio.ClapFeatures.fusion): a clip longer than the extractor's
  max_length_s gets the mel of the whole clip squeezed to the window plus 3 windows of it, and
  is_longer; a shorter one is padded as the extractor pads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def unmark(wave: Tensor) -> tuple[Tensor, list[int]]:
    """A NaN-padded batch [B, T] -> (the batch with zeros for the padding, each clip's length)."""
    present = ~wave.isnan()
    lengths = present.sum(dim=-1).tolist()
    return wave.masked_fill(~present, 0.0), lengths


def window_starts(length: int, window: int) -> list[int]:
    """Starts of the consecutive windows covering a clip of `length` samples; the last window ends at the
    clip's end. One window at 0 for a clip no longer than a window."""
    if length <= window:
        return [0]
    count = math.ceil(length / window)
    return [i * window for i in range(count - 1)] + [length - window]


def repeat_to(clip: Tensor, length: int) -> Tensor:
    """A clip shorter than `length` repeated until it is that long."""
    return clip.repeat(math.ceil(length / clip.shape[-1]))[:length]


def average_windows(embed: Callable[[Tensor], Tensor], wave: Tensor, window: int) -> Tensor:
    """The mean of the L2-normalised embeddings `embed` gives the windows of each NaN-padded clip of `wave`
    [B, max_samples] -> [B, D]. All windows of the batch go through `embed` at once."""
    wave, lengths = unmark(wave)
    pieces, owners = [], []
    for index, length in enumerate(lengths):
        clip = wave[index, : max(length, 1)]
        if length < window:
            pieces.append(repeat_to(clip, window))
            owners.append(index)
            continue
        for start in window_starts(length, window):
            pieces.append(clip[start : start + window])
            owners.append(index)
    embeddings = F.normalize(embed(torch.stack(pieces)), dim=-1)
    owner = torch.tensor(owners, device=embeddings.device)
    total = embeddings.new_zeros(len(lengths), embeddings.shape[-1]).index_add_(0, owner, embeddings)
    counts = torch.bincount(owner, minlength=len(lengths)).to(embeddings.dtype)
    return total / counts[:, None]
