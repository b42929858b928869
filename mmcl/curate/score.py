"""`mmcl shard score`: a score for every pair of a shard set, written beside it (shards_tools.scores).

With a model (`--checkpoint`, `--open-clip`, `--hf-clap`), every sample's media and first caption are
embedded as the evaluator embeds them (the model's eval transform, the centre window of audio), and each
pair gets its alignment score (the cosine similarity of its two embeddings) and, with `--p-values`,
local_fdr's signal: the share of the mismatched media-text combinations of its batch (consecutive samples
of one shard) whose contrastive loss is at or below the pair's own. With `--embeddings`, the embeddings are
kept (float16) for `mmcl shard dedup` and retrieval.

With `--from-run RUN` no model runs: a training run's own estimate is exported instead. A run trained with
train.log_sample_keys logs, per step, the keys it trained on and, with noise weighting on, each pair's
weight; every pair the run saw gets the weight and step of the last time it was seen.

A shard's sidecar is written when the shard is done, atomically, so a killed run re-run skips the shards it
finished; `--part K/N` scores every N-th shard from the K-th, for job arrays, and several processes under
`accelerate launch` split a part's shards between them. Every process rewrites scores.json from all the
sidecars present when it ends.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from mmcl.data.common import BadSample, log_and_continue, logger
from mmcl.data.pipeline import keyed_samples
from mmcl.data.sources import expand_urls
from mmcl.data.text import captions_of, read_meta
from mmcl.errors import UsageError
from mmcl.eval.datasets import MediaDecoder, media_member
from mmcl.models.dual_encoder import DualEncoder
from mmcl.noise.local_fdr import null_pvalues
from shards_tools.scores import shard_name, sidecar_path, summarize, write_sidecar
from shards_tools.shard_format import MEDIA_EXTENSIONS, META_EXTENSIONS, sample_label
from shards_tools.tar_stream import ReadOptions


def run_score(args, part: tuple[int, int]) -> int:
    """Score (or export) the shards of part (K, N) taken by this process; the flags that need no torch were
    checked by mmcl.curate.cli.check_score_flags."""
    from mmcl.eval.cli import check_run_flags
    from shards_tools.shard_format import check_shard_url

    device = check_run_flags(args)
    check_shard_url(args.shards, allow_pipe=args.allow_pipe, where="SHARDS", allow_hint="pass --allow-pipe")
    urls = expand_urls([args.shards], "SHARDS")
    options = ReadOptions(max_member_bytes=args.max_bytes, allow_pipe=args.allow_pipe)
    if args.from_run is not None:
        weights = run_weights(args.from_run, args.until_step)
        written = export_run_weights(urls, weights, args.output, options, part, progress=not args.quiet)
        header = {"from_run": str(args.from_run), "until_step": args.until_step}
    else:
        from accelerate import PartialState

        from mmcl.eval.loading import load_eval_model, model_source

        state = PartialState(cpu=device == "cpu")
        if state.num_processes > 1:  # under accelerate launch: each process on its own device
            device = state.device
        model = load_eval_model(
            args.checkpoint, args.open_clip, args.pretrained, device, hf_clap=args.hf_clap
        )
        source = model_source(args.checkpoint, args.open_clip, args.pretrained, args.hf_clap)
        mine = part_shards(urls, *part)[state.process_index :: state.num_processes]
        written = score_shards(
            model, mine, args.output, options, batch_size=args.batch_size, workers=args.workers,
            p_values=args.p_values, embeddings=args.embeddings,
            progress=not args.quiet and state.is_main_process,
        )  # fmt: skip
        header = {"model": source.name, "pretrained": source.pretrained, "modality": source.modality}
    summary = summarize(args.output, {**header, "shards_from": str(args.shards)})
    print(
        f"scored {written['samples']} pairs in {written['shards']} shard(s) ({written['done_before']} done "
        f"before, {written['skipped']} skipped); {summary['samples']} in {args.output}"
    )
    return 0


def part_shards(urls: list[str], part: int, parts: int) -> list[str]:
    return urls[part::parts]


class ShardBatches(IterableDataset):
    """Decoded batches of consecutive samples of whole shards: {"shard", "keys", "media", "captions",
    "noisy", "label_index"}, and after each shard {"shard", "end": True, "skipped": n}. DataLoader workers
    take whole shards, so a batch never mixes shards and its p-values do not depend on the workers."""

    def __init__(self, urls: list[str], decoder: MediaDecoder, batch_size: int, options: ReadOptions) -> None:
        self.urls, self.decoder, self.batch_size, self.options = urls, decoder, batch_size, options
        self.extensions = MEDIA_EXTENSIONS[decoder.modality]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        urls = self.urls if info is None else self.urls[info.id :: info.num_workers]
        for url in urls:
            batch: list[dict] = []
            skipped = 0
            samples = keyed_samples(
                [url], log_and_continue, options=self.options, extensions=(*self.extensions, *META_EXTENSIONS)
            )
            for sample in samples:
                try:
                    batch.append(self._prepare(sample))
                except Exception as err:  # whatever a sample's bytes make a decoder raise: skipped, counted
                    logger.warning("skipped: %s: %s", sample["__key__"], str(err)[:300])
                    skipped += 1
                    continue
                if len(batch) == self.batch_size:
                    yield self._collate(url, batch)
                    batch = []
            if batch:
                yield self._collate(url, batch)
            yield {"shard": url, "end": True, "skipped": skipped}

    def _prepare(self, sample: dict) -> dict:
        key = sample["__key__"]
        ext = media_member(sample, self.extensions, self.decoder.modality)
        meta = read_meta(sample)
        captions = captions_of(sample, meta)
        if not captions:
            raise BadSample(key, "no caption")
        return {
            "key": key,
            "media": self.decoder(sample[ext], key),
            "caption": captions[0],
            "noisy": meta.get("noisy") if isinstance(meta.get("noisy"), bool) else None,
            "label_index": sample_label(meta, sample.get("cls")),
        }

    @staticmethod
    def _collate(url: str, items: list[dict]) -> dict[str, Any]:
        return {
            "shard": url,
            "keys": [item["key"] for item in items],
            "media": torch.stack([item["media"] for item in items]),
            "captions": [item["caption"] for item in items],
            "noisy": [item["noisy"] for item in items],
            "label_index": [item["label_index"] for item in items],
        }


@torch.no_grad()
def score_batch(model: DualEncoder, media: torch.Tensor, captions: list[str], p_values: bool) -> dict:
    """Embeddings, cosine similarities and (with `p_values`, for 2+ pairs) local_fdr's p-values of a batch."""
    device = next(model.parameters()).device
    media_features = model.encode_media(media.to(device), normalize=True).float()
    text_features = model.encode_text(model.tokenizer(captions).to(device), normalize=True).float()
    out = {
        "media": media_features.cpu(),
        "text": text_features.cpu(),
        "score": (media_features * text_features).sum(-1).cpu(),
    }
    if p_values and len(captions) >= 2:
        scale, _ = model.logit_params()
        out["p_value"] = null_pvalues(media_features, text_features, scale.float().exp(), gather=False).cpu()
    return out


def score_shards(
    model: DualEncoder,
    urls: list[str],
    output: Path,
    options: ReadOptions,
    *,
    batch_size: int = 64,
    workers: int = 2,
    p_values: bool = False,
    embeddings: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Score every pair of the shards that have no sidecar in `output` yet; returns counts."""
    todo = [url for url in urls if not sidecar_path(output, url).is_file()]
    counts = {"shards": 0, "samples": 0, "skipped": 0, "done_before": len(urls) - len(todo)}
    if not todo:
        return counts
    names = [shard_name(url) for url in todo]
    if len(set(names)) < len(names):
        raise UsageError("two shards share a file name: their sidecars would collide; score them apart")
    data = ShardBatches(todo, MediaDecoder.for_model(model), batch_size, options)
    loader = DataLoader(data, batch_size=None, num_workers=min(workers, len(todo)))
    pending: dict[str, dict[str, list]] = {}
    bar = tqdm(total=len(todo), desc="score", unit="shard", disable=not progress, dynamic_ncols=True)
    for batch in loader:
        shard = batch["shard"]
        acc = pending.setdefault(shard, {"rows": [], "embeddings": []})
        if batch.get("end"):
            rows = acc["rows"]
            stacked = np.concatenate(acc["embeddings"]) if embeddings and rows else None
            if embeddings and not rows:
                stacked = np.zeros((0, 2, model.embed_dim), dtype=np.float16)
            write_sidecar(output, shard, rows, stacked)
            counts["shards"] += 1
            counts["samples"] += len(rows)
            counts["skipped"] += batch["skipped"]
            del pending[shard]
            bar.update(1)
            continue
        scored = score_batch(model, batch["media"], batch["captions"], p_values)
        for i, key in enumerate(batch["keys"]):
            row: dict[str, Any] = {"key": key, "score": round(float(scored["score"][i]), 6)}
            if "p_value" in scored:
                row["p_value"] = round(float(scored["p_value"][i]), 6)
            if batch["noisy"][i] is not None:
                row["noisy"] = batch["noisy"][i]
            if batch["label_index"][i] is not None:
                row["label_index"] = batch["label_index"][i]
            acc["rows"].append(row)
        if embeddings:
            acc["embeddings"].append(torch.stack([scored["media"], scored["text"]], dim=1).half().numpy())
    bar.close()
    return counts


def run_weights(run: Path, until_step: int | None = None) -> dict[str, tuple[float, int]]:
    """key -> (weight, step) of the last time a run trained on the pair (up to `until_step`), from its sample
    key logs."""
    folder = Path(run) / "sample_keys"
    files = sorted(folder.glob("rank-*.jsonl"))
    if not files:
        raise UsageError(
            f"--from-run {run}: no {folder}/rank-*.jsonl; train with train.log_sample_keys: true "
            "(and a noise.method) to record the pairs' weights"
        )
    last: dict[str, tuple[float, int]] = {}
    for path in files:
        for number, line in enumerate(path.read_text("utf-8", errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
                step, samples, weights = row["step"], row["samples"], row.get("weights")
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line of a killed run
            if until_step is not None and step > until_step:
                continue
            if weights is None:
                raise UsageError(
                    f"{path}, line {number}: no pair weights; the run had no noise.method (nothing to export)"
                )
            for (_, key), weight in zip(samples, weights, strict=False):
                if isinstance(key, str) and isinstance(weight, (int, float)) and math.isfinite(weight):
                    if key not in last or last[key][1] <= step:
                        last[key] = (float(weight), int(step))
    return last


def export_run_weights(
    urls: list[str],
    weights: dict[str, tuple[float, int]],
    output: Path,
    options: ReadOptions,
    part: tuple[int, int],
    progress: bool,
) -> dict[str, int]:
    """Sidecars of a run's pair weights (`run_weights`), for the pairs of each shard the run saw."""
    counts = {"shards": 0, "samples": 0, "skipped": 0, "done_before": 0}
    for url in tqdm(part_shards(urls, *part), desc="export", unit="shard", disable=not progress):
        rows = []
        for sample in keyed_samples([url], log_and_continue, options=options, extensions=META_EXTENSIONS):
            key = sample["__key__"]
            if key not in weights:
                continue
            weight, step = weights[key]
            row: dict[str, Any] = {"key": key, "weight": round(weight, 6), "step": step}
            try:
                meta = read_meta(sample)
            except BadSample:
                meta = {}
            if isinstance(meta.get("noisy"), bool):
                row["noisy"] = meta["noisy"]
            label = sample_label(meta, sample.get("cls"))
            if label is not None:
                row["label_index"] = label
            rows.append(row)
        write_sidecar(output, url, rows)
        counts["shards"] += 1
        counts["samples"] += len(rows)
    return counts
