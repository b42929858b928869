"""Published evaluation protocols (`mmcl eval ... --protocol NAME`): the settings and metrics a paper's
numbers were measured with, so that its published weights reproduce them. One so far: `laion-clap`.

laion-clap follows LAION-CLAP's own evaluation code (github.com/LAION-AI/CLAP: README "Zeroshot
Classification with ESC50 official split", src/laion_clap/hook.py, evaluate/eval_zeroshot_classification.py,
training/train.py `evaluate_clotho_audiocaps`, training/data.py `get_audio_features`):

* audio: the model's own sample rate and window (48 kHz and 10 s for the published models); a shorter clip
  is "repeatpad"-ed (repeated as often as it fits whole, then zeros), a longer one cut to one window
  ("rand_trunc"; LAION-CLAP draws it at random, mmcl takes the centre, so results do not vary run to
  run), or for a fusion model (enable_fusion) given whole to CLAP's fusion (long_clips: fusion);
* zero-shot (ESC-50, UrbanSound8K): one prompt per class, "This is a sound of " + the class name in
  lower case with spaces (LAION-CLAP's class_labels/ESC50_class_labels_indices_space.json; UrbanSound8K
  as LAION's audio-dataset preprocess_UrbanSound8K.py spells it), no prompt ensemble, no debiasing;
  ESC-50 on fold 1 (the test set of the "first ESC50 official split", whose numbers LAION-CLAP's README
  quotes), UrbanSound8K on all 10 folds (LAION-CLAP publishes no split of it); metrics: top-1 (acc1),
  R@5 (acc5), R@10 (acc10), mean and median rank of the true class and mAP@10 (map@10);
* retrieval (AudioCaps and Clotho test sets): every clip with exactly 5 captions; text->audio: every
  caption a query; audio->text: the best-placed of a clip's 5 captions for R@k; R@1/5/10 both ways,
  text->audio mean and median rank, mAP@10 both ways (see `retrieval_rank_metrics`).

Median ranks are LAION-CLAP's: floor(median of 0-based ranks) + 1. Ties (equal scores) are broken
optimistically here; LAION-CLAP's argsort breaks them arbitrarily; with float scores they do not occur.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mmcl.errors import UsageError

LAION_TEMPLATE = "This is a sound of {}"  # LAION-CLAP: "This is a sound of " + class name (no period)
LAION_FOLDS = {"esc50": [1], "urbansound8k": None}  # None: every fold
LAION_PADDING = "repeatpad"  # LAION-CLAP's data_filling for a clip shorter than the window
LAION_CAPTIONS = 5  # captions per clip in LAION-CLAP's AudioCaps / Clotho retrieval evaluation
KS = (1, 5, 10)
MAP_DEPTH = 10


def zero_shot_settings(
    protocol: str, data_format: str, *, templates: str, folds: list[int] | None, debias: bool,
    classes: object, max_samples: int | None,
) -> dict:  # fmt: skip
    """The settings `protocol` fixes for zero-shot classification of `data_format`: {"templates",
    "folds", "padding"}; UsageError naming an option that conflicts with it."""
    if data_format not in LAION_FOLDS:
        raise UsageError(
            f"--protocol {protocol} covers ESC-50 and UrbanSound8K ({', '.join(LAION_FOLDS)} layouts); "
            f"--data is {data_format}"
        )
    wanted = LAION_FOLDS[data_format]
    conflicts = {
        "--templates": templates != "auto",
        "--debias": debias,
        "--classes": classes is not None,
        "--max-samples": max_samples is not None,
        "--folds": folds is not None and (wanted is None or sorted(folds) != wanted),
    }
    for flag, conflicting in conflicts.items():
        if conflicting:
            raise UsageError(
                f"{flag} conflicts with --protocol {protocol}, which fixes it (folds of {data_format}: "
                f"{wanted or 'all'}; the prompt {LAION_TEMPLATE!r}; every item); remove {flag}"
            )
    return {"templates": [LAION_TEMPLATE], "folds": wanted, "padding": LAION_PADDING}


def check_retrieval_options(protocol: str, max_samples: int | None) -> None:
    if max_samples is not None:
        raise UsageError(f"--max-samples conflicts with --protocol {protocol}, which scores every item")


def check_captions(protocol: str, captions_per_item: list[int]) -> None:
    """UsageError unless every item has exactly LAION_CAPTIONS captions."""
    odd = [i for i, n in enumerate(captions_per_item) if n != LAION_CAPTIONS]
    if odd:
        raise UsageError(
            f"--protocol {protocol}: item {odd[0]} has {captions_per_item[odd[0]]} captions ({len(odd)} "
            f"items do not have {LAION_CAPTIONS}); LAION-CLAP's retrieval evaluation pairs every clip with "
            f"exactly {LAION_CAPTIONS} (the AudioCaps and Clotho test sets)"
        )


def rank_metrics(ranks: Tensor, prefix: str = "") -> dict[str, float]:
    """LAION-CLAP's metrics of 0-based ranks (one positive per query): mean and median rank (1-based),
    R@1/5/10 and mAP@10 (1 / rank within the top 10, else 0)."""
    ranks = ranks.double().cpu().numpy()
    metrics = {
        f"{prefix}mean_rank": float(ranks.mean() + 1),
        f"{prefix}median_rank": float(np.floor(np.median(ranks)) + 1),
    }
    metrics.update({f"{prefix}recall@{k}": float(np.mean(ranks < k)) for k in KS})
    metrics[f"{prefix}map@{MAP_DEPTH}"] = float(np.mean(np.where(ranks < MAP_DEPTH, 1 / (ranks + 1), 0.0)))
    return metrics


def zero_shot_rank_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """acc10, mean_rank, median_rank and map@10 of the true class among the classes (acc1 and acc5, the
    R@1 and R@5 of LAION-CLAP, are the classification metrics' own)."""
    true = logits.gather(1, labels.long()[:, None])
    metrics = rank_metrics((logits > true).sum(dim=1))
    return {
        "acc10": metrics["recall@10"],
        **{k: v for k, v in metrics.items() if "rank" in k or k.startswith("map")},
    }


@torch.no_grad()
def caption_ranks(media: Tensor, text: Tensor, per_item: int, max_elements: int = 1 << 24) -> Tensor:
    """For N items [N, D] and their captions [N * per_item, D] (item i's are rows i*per_item ...), the
    0-based rank of each of item i's captions among all captions for item i's query: [N, per_item]."""
    rows = max(1, max_elements // max(per_item * len(text), 1))
    ranks = []
    for start in range(0, len(media), rows):
        scores = media[start : start + rows] @ text.T  # [chunk, M]
        own = torch.arange(start, start + len(scores), device=scores.device)[:, None] * per_item
        own_scores = scores.gather(1, own + torch.arange(per_item, device=scores.device))  # [chunk, K]
        ranks.append((scores[:, None, :] > own_scores[:, :, None]).sum(dim=-1))
    return torch.cat(ranks)


def retrieval_rank_metrics(
    media: Tensor, text: Tensor, text_ranks: Tensor, modality: str, per_item: int
) -> dict[str, float]:
    """LAION-CLAP's retrieval metrics (training/train.py evaluate_clotho_audiocaps), keyed as mmcl's, for N
    items `media` [N, D] and their captions `text` [N * per_item, D] in item order; `text_ranks` [M]: each
    caption's 0-based rank of its own item among the items.

    {modality}_retrieval_* (text -> media): every caption a query with one positive; recall@1/5/10, mean
    and median rank, map@10.
    text_retrieval_* (media -> text): recall@k of the best-placed of the item's captions; map@10 the
    average precision within the top 10 over the item's `per_item` captions taken in rank order (the
    definition LAION-CLAP's docstring gives, after XinhaoMei/audio-text_retrieval); map@10_laion_code as
    LAION-CLAP's code computes it, whose precision terms take the captions in their own order instead
    (it can differ, and exceed 1 for an item).
    """
    metrics = rank_metrics(text_ranks, f"{modality}_retrieval_")
    ranks = caption_ranks(media, text, per_item).double()  # [N, K]
    best = ranks.min(dim=1).values
    metrics.update({f"text_retrieval_recall@{k}": float((best < k).double().mean()) for k in KS})
    ordered = ranks.sort(dim=1).values
    position = torch.arange(1, per_item + 1, dtype=ordered.dtype)
    in_rank_order = torch.where(ordered < MAP_DEPTH, position / (ordered + 1), 0.0)
    metrics[f"text_retrieval_map@{MAP_DEPTH}"] = float((in_rank_order.sum(dim=1) / per_item).mean())
    hits = ranks < MAP_DEPTH
    in_caption_order = torch.where(hits, torch.cumsum(hits.double(), dim=1) / (ranks + 1), 0.0)
    laion = in_caption_order.sum(dim=1) / per_item
    metrics[f"text_retrieval_map@{MAP_DEPTH}_laion_code"] = float(laion.mean())
    return metrics
