"""Zero-shot retrieval: Recall@K, mean and median rank in both directions, items with several captions.

text -> media: every caption is a query whose single positive is its own item.
media -> text: every item is a query; all its captions are positives and the rank is that of the best
placed one (a hit at K when ANY of its captions is in the top K), as in CLIP_benchmark.

Ranks are 1-based. Ties are broken at random, in expectation: a positive scored equal to m negatives
after b better ones has expected rank b + 1 + m / 2 and counts as a hit at K with probability
clamp((K - b) / (m + 1), 0, 1). So a collapsed model (every score equal) scores chance (recall@K = K / N),
and sets whose captions repeat word for word (class-template captions) are neither rewarded nor zeroed
by the tie order. Scores are computed over query
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
from mmcl.eval.protocols import LAION_CAPTIONS, check_captions, retrieval_rank_metrics
from mmcl.eval.zero_shot import encode_texts, extract_features
from mmcl.models import DualEncoder

RECALL_KS = (1, 5, 10)
MAX_CHUNK_ELEMENTS = 1 << 24  # 16M scores (64 MB float32) per chunk


def _chunk_rows(num_keys: int, chunk_size: int | None) -> int:
    return chunk_size if chunk_size is not None else max(1, MAX_CHUNK_ELEMENTS // max(num_keys, 1))


@torch.no_grad()
def text_to_media_ranks(
    text: Tensor, media: Tensor, text_to_media: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """For each caption [M]: how many items score strictly above its own item, and how many tie with it."""
    better, tied = [], []
    rows = _chunk_rows(len(media), chunk_size)
    for start in range(0, len(text), rows):
        scores = text[start : start + rows] @ media.T  # [chunk, N]
        positive = scores.gather(1, text_to_media[start : start + rows, None])
        better.append((scores > positive).sum(dim=1))
        tied.append((scores == positive).sum(dim=1) - 1)  # the positive itself is not a tie
    return torch.cat(better), torch.cat(tied)


@torch.no_grad()
def media_to_text_ranks(
    media: Tensor, text: Tensor, text_to_media: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """For each item [N]: how many other captions score strictly above its best caption, and how many tie."""
    better, tied = [], []
    rows = _chunk_rows(len(text), chunk_size)
    for start in range(0, len(media), rows):
        scores = media[start : start + rows] @ text.T  # [chunk, M]
        items = torch.arange(start, start + len(scores), device=scores.device)
        is_positive = text_to_media[None, :] == items[:, None]
        best = scores.masked_fill(~is_positive, float("-inf")).amax(dim=1, keepdim=True)
        better.append(((scores > best) & ~is_positive).sum(dim=1))
        tied.append(((scores == best) & ~is_positive).sum(dim=1))
    return torch.cat(better), torch.cat(tied)


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
    for prefix, (better, tied) in directions.items():
        better, tied = better.double(), tied.double()
        for k in ks:
            metrics[f"{prefix}_recall@{k}"] = float(((k - better) / (tied + 1)).clamp(0, 1).mean())
        expected_rank = better + 1 + tied / 2
        metrics[f"{prefix}_mean_rank"] = float(expected_rank.mean())
        metrics[f"{prefix}_median_rank"] = float(np.median(expected_rank.cpu().numpy()))
    return metrics


def evaluate_retrieval(
    model: DualEncoder,
    data: EvalData,
    *,
    batch_size: int = 64,
    workers: int = 0,
    max_samples: int | None = None,
    progress: bool = False,
    padding: str = "repeat",
    protocol: str | None = None,
) -> dict[str, float | int]:
    """Retrieval metrics of `model` on captioned shards, plus num_items, num_captions and skipped.
    `padding`: how a clip shorter than the model's window is padded; with `protocol` (mmcl.eval.protocols)
    every item needs its caption count and the metrics are the protocol's."""
    if data.class_names is not None:
        raise UsageError(f"{data.name} is classification data; retrieval needs captioned shards")
    model.eval()
    loader = data.loader(MediaDecoder.for_model(model, padding), batch_size, workers, max_samples)
    shown = (f"retrieval {data.name}", data.size(max_samples)) if progress else None
    features = extract_features(model, loader, limit=max_samples, progress=shown)
    captions = [caption for item_captions in features.targets for caption in item_captions]
    owner = torch.tensor([i for i, item_captions in enumerate(features.targets) for _ in item_captions])
    if protocol is not None:
        check_captions(protocol, [len(item_captions) for item_captions in features.targets])
    text = encode_texts(model, captions, batch_size).cpu()
    if protocol is None:
        metrics = retrieval_metrics(features.media, text, owner, model.modality)
    else:
        better, _ = text_to_media_ranks(text, features.media, owner)
        metrics = retrieval_rank_metrics(features.media, text, better, model.modality, LAION_CAPTIONS)
    return {
        **metrics,
        "num_items": len(features.targets),
        "num_captions": len(captions),
        "skipped": features.skipped,
    }
