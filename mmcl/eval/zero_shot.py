"""Zero-shot classification: class prompts -> text classifier; media features x classifier -> metrics.

The classifier is open_clip's prompt ensemble: each class's prompts are embedded and L2-normalised, their
mean is re-normalised, and the class vectors form the columns of a [D, C] matrix. Logits are
exp(logit_scale) * media_features @ classifier, as in training, so softmax probabilities (used by
debiasing) have the model's own temperature.

Debiasing (`debias=True`, label-free): zero-shot classifiers often favour some classes for reasons that
have nothing to do with the images (a frequent word in the prompt, a class name that matches many
captions), so on a balanced test set they predict some classes far more often than others. We estimate
that prior from the predictions on the evaluation set itself and re-weight the logits to a uniform
prior: find per-class offsets b such that the mean softmax(logits - b) over the set is uniform, by the
fixed-point iteration b <- b + log(C * mean_n softmax(logits_n - b)). This is Sinkhorn's matrix
balancing with the rows normalised by the softmax and the column sums driven to N/C; its first step is
the one-shot correction "subtract the log of the mean softmax". It uses no labels, but it assumes the
evaluation set is roughly class-balanced: on a skewed set it hurts, so it is off by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from mmcl.errors import UsageError
from mmcl.eval.datasets import EvalData, MediaDecoder
from mmcl.eval.protocols import zero_shot_rank_metrics
from mmcl.models import DualEncoder
from mmcl.models.dual_encoder import MAX_LOGIT_SCALE

DEBIAS_MAX_ITERS = 100
DEBIAS_TOLERANCE = 1e-4  # stop when every class's mean probability is within ~0.01% of 1/C


def model_device(model: DualEncoder) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_texts(model: DualEncoder, texts: Sequence[str], batch_size: int) -> Tensor:
    """Normalised text features [len(texts), D] (float32, on the model's device), `batch_size` at a time."""
    device = model_device(model)
    chunks = [
        model.encode_text(model.tokenizer(list(texts[i : i + batch_size])).to(device), normalize=True).float()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def build_classifier(
    model: DualEncoder, class_names: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> Tensor:
    """The zero-shot classifier [D, C]: per class, the re-normalised mean of its normalised prompt
    embeddings (`template.format(name)` for every template). Agrees with open_clip's
    `build_zero_shot_classifier`; prompts are batched across classes, `batch_size` texts per forward."""
    if not class_names or not templates:
        raise ValueError("build_classifier needs at least one class name and one template")
    prompts = [template.format(name) for name in class_names for template in templates]
    features = encode_texts(model, prompts, batch_size)
    per_class = features.view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T


@dataclass
class Features:
    """Media features of an evaluation set, with each item's target (class index or captions)."""

    media: Tensor  # [N, D] float32 on the CPU, L2-normalised
    targets: list = field(default_factory=list)
    skipped: int = 0  # items that could not be decoded


@torch.no_grad()
def extract_features(
    model: DualEncoder,
    loader: Iterable[dict],
    *,
    limit: int | None = None,
    progress: tuple[str, int | None] | None = None,
) -> Features:
    """Encode every batch of `loader` (see datasets.collate_items) and keep only the features: memory is
    N x D floats whatever the media. Stops after `limit` items. `progress` = (label, expected items)
    shows a bar on stderr."""
    device = model_device(model)
    chunks: list[Tensor] = []
    targets: list = []
    skipped = 0
    label, expected = progress or ("", None)
    bar = tqdm(total=expected, desc=label, unit="item", disable=progress is None, dynamic_ncols=True)
    with bar:
        for batch in loader:
            skipped += batch["skipped"]
            if batch["media"] is None:
                continue
            media, batch_targets = batch["media"], batch["targets"]
            if limit is not None:
                media, batch_targets = media[: limit - len(targets)], batch_targets[: limit - len(targets)]
            chunks.append(model.encode_media(media.to(device), normalize=True).float().cpu())
            targets.extend(batch_targets)
            bar.update(len(batch_targets))
            if limit is not None and len(targets) >= limit:
                break
    if not chunks:
        raise UsageError("no usable items in the evaluation data (see the warnings above)")
    return Features(torch.cat(chunks), targets, skipped)


def debias_logits(
    logits: Tensor, max_iters: int = DEBIAS_MAX_ITERS, tolerance: float = DEBIAS_TOLERANCE
) -> Tensor:
    """`logits` [N, C] minus per-class offsets that make the mean softmax over the N rows uniform
    (label-free prior correction; the method and its assumption are in the module docstring)."""
    logits = logits.double()
    offsets = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
    for _ in range(max_iters):
        marginal = torch.softmax(logits - offsets, dim=1).mean(dim=0)
        step = torch.log(marginal.clamp_min(1e-30) * logits.shape[1])
        offsets += step
        if step.abs().max() < tolerance:
            break
    return (logits - offsets).float()


def classification_metrics(logits: Tensor, labels: Tensor, class_names: Sequence[str]) -> dict:
    """CLIP_benchmark's keys plus the details behind them:

    acc1, acc5 (only with >= 5 classes): top-k accuracy; mean_per_class_recall: the mean recall over the
    classes present in `labels` (balanced accuracy); per_class_recall: {name: recall, or None for a class
    with no items}; confusion_matrix: counts, rows = true class, columns = predicted class.
    """
    num_classes = len(class_names)
    if logits.ndim != 2 or logits.shape != (len(labels), num_classes):
        raise ValueError(
            f"logits {list(logits.shape)} do not match {len(labels)} labels x {num_classes} classes"
        )
    labels = labels.long().cpu()
    logits = logits.cpu()
    predicted = logits.argmax(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(dim=1)
    recall = confusion.diag().double() / support.clamp_min(1)
    present = support > 0
    metrics = {"acc1": float((predicted == labels).double().mean())}
    if num_classes >= 5:
        top5 = logits.topk(5, dim=1).indices
        metrics["acc5"] = float((top5 == labels[:, None]).any(dim=1).double().mean())
    metrics["mean_per_class_recall"] = float(recall[present].mean())
    metrics["per_class_recall"] = {
        name: float(recall[i]) if present[i] else None for i, name in enumerate(class_names)
    }
    metrics["confusion_matrix"] = confusion.tolist()
    return metrics


def logit_scale_of(model: DualEncoder) -> float:
    """exp(logit_scale), capped like in training."""
    scale, _ = model.logit_params()
    return float(scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))


def evaluate_zero_shot(
    model: DualEncoder,
    data: EvalData,
    templates: Sequence[str],
    *,
    batch_size: int = 64,
    workers: int = 0,
    debias: bool = False,
    max_samples: int | None = None,
    progress: bool = False,
    padding: str = "repeat",
    protocol: str | None = None,
) -> dict:
    """Zero-shot classification of `data` by `model`: the metrics of `classification_metrics` plus
    num_samples and skipped; with `debias`, the metrics are those of the debiased logits and
    acc1_without_debias keeps the plain top-1 accuracy. `padding`: how a clip shorter than the model's
    window is padded (mmcl.data.audio.fit_length); `protocol` (mmcl.eval.protocols) adds its rank metrics."""
    if data.class_names is None:
        raise UsageError(f"{data.name} has no class names: it is retrieval data")
    model.eval()
    classifier = build_classifier(model, data.class_names, templates, batch_size)
    loader = data.loader(MediaDecoder.for_model(model, padding), batch_size, workers, max_samples)
    shown = (f"zero-shot {data.name}", data.size(max_samples)) if progress else None
    features = extract_features(model, loader, limit=max_samples, progress=shown)
    labels = torch.tensor(features.targets, dtype=torch.long)
    if labels.min() < 0 or labels.max() >= len(data.class_names):
        raise UsageError(
            f"{data.name}: class index {int(labels.max())} found, but only "
            f"{len(data.class_names)} class names are known; check --classes"
        )
    logits = logit_scale_of(model) * features.media @ classifier.float().cpu()
    metrics = classification_metrics(debias_logits(logits) if debias else logits, labels, data.class_names)
    if debias:
        metrics["acc1_without_debias"] = float((logits.argmax(dim=1) == labels).double().mean())
    if protocol is not None:
        metrics.update(zero_shot_rank_metrics(logits, labels))
    return {**metrics, "num_samples": len(labels), "skipped": features.skipped}
