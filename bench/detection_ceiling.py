"""How well a trained image-text checkpoint tells mismatched pairs from matched ones: the detection ceiling.

Scores every pair of a noisy shard folder (written by `mmcl shard --noise-rate`, whose .json carry the truth)
with a checkpoint in eval mode, in shuffled batches as in training, and prints the AUROC of several per-pair
signals against the truth:

  symmetric loss       the CLIP loss's per-pair term over the batch (what loss_mixture and the teacher use)
  p-value              its rank among the batch's off-diagonal pairs (what local_fdr uses)
  ... without dups     the same with the other pairs that carry the identical caption left out of the
                       candidates and of the null (they are not mismatches)
  caption bank         image-to-caption loss over every distinct caption of the set instead of the batch

A checkpoint trained on the clean pairs bounds what an estimator that learns from the noisy ones can
reach with this model: an estimator's `noise_auroc` near it is at the model's limit.

It then shows how local_fdr's weights are calibrated: fitted on all the scored p-values, the mean 1 - lfdr
of the pairs in each p-value bin next to the true share of matched pairs there. Where the two agree, the
weights are as good as this model's ranking allows, and what is left is the ranking itself.

With class labels in the .json (`mmcl shard --label-column`), it also checks why local_fdr's implied AUROC
(1 - E[p | matched], which assumes a mismatched pair's p-value is uniform) reads low on data of few classes:
a share q of the in-batch null (q = sum of the squared class shares, ~1/C for C balanced classes) pairs media
with a caption of its own class, so a matched pair's p-value is at best ~uniform on [0, q], and mismatched
pairs (another class's caption, by the sharder's construction) rank above that part of the null. If the
null's same-class combinations look like matched pairs, AUROC = (1 - E[p | matched] - q / 2) / (1 - q);
it prints that next to the AUROC measured.

    .venv/bin/python bench/detection_ceiling.py \\
        --checkpoint bench/out/noise/runs/image30000-micro_resnet-r0-none-s0-n2400 \\
        --shards bench/out/noise/shards/image30000-r0.5-s0 --max-shards 4
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmcl.data.pipeline import keyed_samples  # noqa: E402
from mmcl.eval.loading import load_eval_model  # noqa: E402
from mmcl.losses import contrastive_loss  # noqa: E402
from mmcl.noise.local_fdr import LocalFdr, null_pvalues  # noqa: E402
from mmcl.noise.metrics import auroc  # noqa: E402


def read_pairs(
    shards: Path, max_shards: int | None
) -> tuple[list[bytes], list[str], np.ndarray, np.ndarray | None]:
    """Image bytes, captions, ground-truth noisy flags and class labels (None unless every .json has a
    "label_index") of the samples in `shards`' tar files."""
    images, captions, noisy, labels = [], [], [], []
    urls = [str(shard) for shard in sorted(shards.glob("*.tar"))[:max_shards]]
    for sample in keyed_samples(urls, wds.reraise_exception):
        meta = json.loads(sample["json"])
        if "noisy" not in meta:
            raise SystemExit(f"{sample['__url__']}: no 'noisy' flag in the .json; shard with --noise-rate")
        images.append(next(sample[ext] for ext in ("jpg", "png", "webp") if ext in sample))
        captions.append(sample["txt"].decode("utf-8"))
        noisy.append(bool(meta["noisy"]))
        labels.append(meta.get("label_index"))
    return images, captions, np.asarray(noisy), None if None in labels else np.asarray(labels)


@torch.no_grad()
def score(
    model, images: list[bytes], captions: list[str], batch_size: int, seed: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-pair mismatch signals (higher = more likely mismatched) and the pair indices they belong to, in
    shuffled-batch order. The plain loss and p-value are the trainer's own functions; the variants without
    same-caption candidates recompute them with those entries masked."""
    transform = model.media_transform(train=False)
    distinct = sorted(set(captions))
    bank = model.encode_text(model.tokenizer(distinct))
    bank_index = {caption: i for i, caption in enumerate(distinct)}
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    signals: dict[str, list[float]] = {"symmetric loss": [], "p-value": [], "symmetric loss without dups": [],
                                       "p-value without dups": [], "caption bank": []}  # fmt: skip
    kept = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = order[start : start + batch_size]
        media = torch.stack([transform(Image.open(io.BytesIO(images[i])).convert("RGB")) for i in rows])
        texts = [captions[i] for i in rows]
        out = model(media, model.tokenizer(texts))
        media_features, text_features, scale = out["media_features"], out["text_features"], out["logit_scale"]
        signals["symmetric loss"] += contrastive_loss(media_features, text_features, scale)[
            "per_sample_loss"
        ].tolist()
        signals["p-value"] += null_pvalues(media_features, text_features, scale).tolist()
        logits = scale * media_features @ text_features.T
        eye = torch.eye(len(rows), dtype=torch.bool)
        same_caption = torch.tensor([[a == b for b in texts] for a in texts]) & ~eye
        media_lse = torch.logsumexp(logits.masked_fill(same_caption, -torch.inf), dim=1)
        text_lse = torch.logsumexp(logits.T.masked_fill(same_caption, -torch.inf), dim=1)
        combined = (media_lse[:, None] + text_lse[None, :]) / 2 - logits  # loss of (media i, text j)
        null = combined[~eye & ~same_caption].sort().values
        pvalues = torch.searchsorted(null, combined.diagonal().contiguous(), right=True) / null.numel()
        signals["symmetric loss without dups"] += combined.diagonal().tolist()
        signals["p-value without dups"] += pvalues.tolist()
        bank_logits = scale * media_features @ bank.T
        own = torch.tensor([bank_index[t] for t in texts])
        signals["caption bank"] += (
            torch.logsumexp(bank_logits, 1) - bank_logits[torch.arange(len(rows)), own]
        ).tolist()
        kept += rows
    return {name: np.asarray(values) for name, values in signals.items()}, np.asarray(kept)


CALIBRATION_EDGES = [0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]


def calibration(pvalues: np.ndarray, noisy: np.ndarray) -> list[str]:
    """Lines of a table: per p-value bin, the pairs in it, their true share of matched pairs and their mean
    local_fdr weight (1 - lfdr, fitted on all of `pvalues` at once; shown whether or not the fit's gate would
    let it weight), then the mean weight of each group."""
    fdr = LocalFdr(len(pvalues))
    fdr.add(pvalues)
    params = fdr.fit()
    weights = fdr.fitted_clean_probability(pvalues)
    lines = [
        f"  local_fdr on all {len(pvalues)} p-values: noise rate estimate {params['pi0']:.3f}, implied AUROC "
        f"{params['implied_auroc']:.3f} (bound {params['implied_auroc_low']:.3f}), gate "
        f"{'open' if params['gate_open'] else 'shut'}; mean weight of matched pairs "
        f"{weights[~noisy].mean():.3f}, of mismatched ones {weights[noisy].mean():.3f}",
        "  p-value bin      pairs  matched share  mean weight",
    ]
    for low, high in itertools.pairwise(CALIBRATION_EDGES):
        inside = (pvalues >= low) & ((pvalues < high) if high < 1.0 else (pvalues <= high))
        if inside.any():
            lines.append(f"  [{low:.3f}, {high:.3f}) {inside.sum():6d}  {1 - noisy[inside].mean():13.3f}  "
                         f"{weights[inside].mean():11.3f}")  # fmt: skip
    return lines


def null_class_matches(pvalues: np.ndarray, noisy: np.ndarray, labels: np.ndarray) -> list[str]:
    """Lines: q (the share of media-caption combinations of one class among distinct pairs), the matched
    pairs' 1 - E[p], and the AUROC that both predict, (1 - E[p | matched] - q / 2) / (1 - q)."""
    counts = np.bincount(labels)
    q = float((counts * (counts - 1)).sum() / (len(labels) * (len(labels) - 1)))
    ranking = 1.0 - float(pvalues[~noisy].mean())
    return [
        f"  null's same-class share q {q:.3f}; matched pairs' 1 - E[p] {ranking:.4f} (what the implied AUROC "
        f"estimates); predicted AUROC (1 - E[p] - q/2) / (1 - q) = {(ranking - q / 2) / (1 - q):.4f}, "
        f"measured {auroc(pvalues, noisy):.4f}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="an mmcl run folder or checkpoint folder"
    )
    parser.add_argument("--shards", type=Path, required=True, help="image shards written with --noise-rate")
    parser.add_argument("--max-shards", type=int, help="score only the first N shards")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = load_eval_model(checkpoint=args.checkpoint)
    images, captions, noisy, labels = read_pairs(args.shards, args.max_shards)
    signals, order = score(model, images, captions, args.batch_size, args.seed)
    truth = noisy[order]
    print(f"{len(truth)} pairs ({truth.mean():.1%} noisy, {len(set(captions))} distinct captions), "
          f"checkpoint {args.checkpoint}")  # fmt: skip
    for name, values in signals.items():
        print(f"  {name:28s} AUROC {auroc(values, truth):.4f}")
    print("\n".join(calibration(signals["p-value"], truth)))
    if labels is not None:
        print("\n".join(null_class_matches(signals["p-value"], truth, labels[order])))


if __name__ == "__main__":
    main()
