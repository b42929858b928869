"""Zero-shot retrieval: Recall@K, mean and median rank in both directions, items with several captions.

text -> media: every caption is a query whose single positive is its own item.
media -> text: every item is a query; all its captions are positives and the rank is that of the best
placed one (a hit at K when ANY of its captions is in the top K), as in CLIP_benchmark.

Ranks are 1-based and ties count against the model: a positive scored equal to a negative is ranked
after it, so a collapsed model (every score equal) gets rank N, not 1. Scores are computed over query
chunks ([chunk, keys] at a time, about `max_chunk_elements` scores) keeping only each query's rank, so
100k x 100k similarities never exist at once; chunked and unchunked give identical ranks.

Keys follow CLIP_benchmark: `image_retrieval_recall@K` is text -> image, `text_retrieval_recall@K` is
image -> text; for audio models `audio_retrieval_recall@K` / `text_retrieval_recall@K`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mmcl.errors import UsageError
from mmcl.eval.datasets import EvalData, MediaDecoder
from mmcl.eval.zero_shot import encode_texts, extract_features
from mmcl.models import DualEncoder

RECALL_KS = (1, 5, 10)
MAX_CHUNK_ELEMENTS = 1 << 24  # 16M scores (64 MB float32) per chunk


def _chunk_rows(num_keys: int, chunk_size: int | None) -> int:
    return chunk_size if chunk_size is not None else max(1, MAX_CHUNK_ELEMENTS // max(num_keys, 1))


@torch.no_grad()
def text_to_media_ranks(text: Tensor, media: Tensor, text_to_media: Tensor, chunk_size: int | None = None) -> Tensor:
    """Rank [M] of each caption's item among all N items (1 = first)."""
    ranks = []
    rows = _chunk_rows(len(media), chunk_size)
    for start in range(0, len(text), rows):
        scores = text[start : start + rows] @ media.T  # [chunk, N]
        positive = scores.gather(1, text_to_media[start : start + rows, None])
        ranks.append((scores >= positive).sum(dim=1))  # the positive itself counts once: 1-based
    return torch.cat(ranks)


@torch.no_grad()
def media_to_text_ranks(media: Tensor, text: Tensor, text_to_media: Tensor, chunk_size: int | None = None) -> Tensor:
    """Rank [N] of each item's best placed caption among all M captions (1 = first)."""
    ranks = []
    rows = _chunk_rows(len(text), chunk_size)
    for start in range(0, len(media), rows):
        scores = media[start : start + rows] @ text.T  # [chunk, M]
        items = torch.arange(start, start + len(scores), device=scores.device)
        is_positive = text_to_media[None, :] == items[:, None]
        best = scores.masked_fill(~is_positive, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(1 + ((scores >= best) & ~is_positive).sum(dim=1))
    return torch.cat(ranks)


def retrieval_metrics(
    media: Tensor,
    text: Tensor,
    text_to_media: Tensor,
    modality: str = "image",
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@K, mean and median rank both ways for N items `media` [N, D] and M captions `text` [M, D]
    (normalised features); `text_to_media` [M] is each caption's item index. Every item needs a caption."""
    text_to_media = text_to_media.long().to(media.device)
    if len(text_to_media) != len(text):
        raise ValueError(f"text_to_media has {len(text_to_media)} entries for {len(text)} captions")
    if torch.bincount(text_to_media, minlength=len(media)).min() == 0:
        raise ValueError("every item needs at least one caption")
    directions = {
        f"{modality}_retrieval": text_to_media_ranks(text, media, text_to_media, chunk_size),
        "text_retrieval": media_to_text_ranks(media, text, text_to_media, chunk_size),
    }
    metrics: dict[str, float] = {}
    for prefix, ranks in directions.items():
        for k in ks:
            metrics[f"{prefix}_recall@{k}"] = float((ranks <= k).double().mean())
        metrics[f"{prefix}_mean_rank"] = float(ranks.double().mean())
        metrics[f"{prefix}_median_rank"] = float(np.median(ranks.cpu().numpy()))
    return metrics


def evaluate_retrieval(
    model: DualEncoder,
    data: EvalData,
    *,
    batch_size: int = 64,
    workers: int = 0,
    max_samples: int | None = None,
    progress: bool = False,
) -> dict[str, float | int]:
    """Retrieval metrics of `model` on captioned shards, plus num_items, num_captions and skipped."""
    if data.class_names is not None:
        raise UsageError(f"{data.name} is classification data; retrieval needs captioned shards")
    model.eval()
    loader = data.loader(MediaDecoder.for_model(model), batch_size, workers, max_samples)
    shown = (f"retrieval {data.name}", data.size(max_samples)) if progress else None
    features = extract_features(model, loader, limit=max_samples, progress=shown)
    captions = [caption for item_captions in features.targets for caption in item_captions]
    owner = torch.tensor([i for i, item_captions in enumerate(features.targets) for _ in item_captions])
    text = encode_texts(model, captions, batch_size).cpu()
    metrics = retrieval_metrics(features.media, text, owner, model.modality)
    return {**metrics, "num_items": len(features.targets), "num_captions": len(captions), "skipped": features.skipped}
