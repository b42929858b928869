"""The scores folder's on-disk contract: per-pair scores beside a shard set, never inside it.

`mmcl shard score` writes, for every shard NAME of a shard set, into a scores folder:

- `NAME.scores.jsonl`: one JSON object per scored sample, in the shard's order:
  {"key": str, "score": float} and, where known, "p_value" (the share of the pair's in-batch mismatched
  pairs that score at least as high: local_fdr's signal), "weight" and "step" (a training run's last pair
  weight and the step it was seen at: `--from-run`), "noisy" (the sharder's ground truth, for reports) and
  "label_index" (for per-class filtering). Samples that could not be scored have no row.
- `NAME.emb.npy` (optional): float16 [rows, 2, dim], row i the media and text embeddings of line i.
- `scores.json`: a summary (model, counts, histogram), rewritten from every sidecar at the end of a run.

A sidecar is written under a temporary name and renamed, its embeddings first, so a sidecar that exists
is complete: a killed run re-run skips the shards it finished. Shards are never rewritten; training reads
the sidecars directly (`data.sources[i].scores`), and `mmcl shard filter` / `dedup` write new shard sets.
Sidecars may come from elsewhere: every row is checked, and a file over its size cap is refused.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from shards_tools.errors import UsageError
from shards_tools.shard_format import parse_json_object
from shards_tools.writer import open_new, write_atomic

SCORES_SUFFIX = ".scores.jsonl"
EMBEDDINGS_SUFFIX = ".emb.npy"
SUMMARY = "scores.json"
FIELDS = ("score", "p_value", "weight")  # the numbers a row may hold; filter and training pick one


def lower_is_better(field: str) -> bool:
    """Whether a low value of `field` marks a well-matched pair: a p-value does, a score or weight the
    opposite (and a noisy pair is flagged from the other end)."""
    return field == "p_value"


MAX_ROW_BYTES = 4096  # a row is a key and a few numbers
MAX_SIDECAR_BYTES = 1 << 30
HISTOGRAM_BINS = 50
MAX_VALUE = 1e6  # scores, weights and p-values are small; a huge one would break the histograms


def shard_name(url: str) -> str:
    """The name a shard's sidecars are filed under: its file name (the last part of a path or URL)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def sidecar_path(scores: Path, shard: str) -> Path:
    return Path(scores) / f"{shard_name(shard)}{SCORES_SUFFIX}"


def embeddings_path(scores: Path, shard: str) -> Path:
    return Path(scores) / f"{shard_name(shard)}{EMBEDDINGS_SUFFIX}"


def scored_shards(scores: Path) -> list[str]:
    """The shard names the folder holds complete sidecars for, sorted."""
    return sorted(p.name[: -len(SCORES_SUFFIX)] for p in Path(scores).glob(f"*{SCORES_SUFFIX}"))


def write_sidecar(scores: Path, shard: str, rows: list[dict], embeddings: np.ndarray | None = None) -> None:
    """Write one shard's sidecar (and embeddings) atomically; the .jsonl, renamed last, marks it complete."""
    scores = Path(scores)
    scores.mkdir(parents=True, exist_ok=True)
    if embeddings is not None:
        target = embeddings_path(scores, shard)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with open_new(tmp) as handle:
            np.save(handle, np.asarray(embeddings, dtype=np.float16), allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    text = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
    write_atomic(sidecar_path(scores, shard), text.encode("utf-8"))


def row_problem(row: dict) -> str | None:
    """What makes a sidecar row unusable, or None."""
    if not isinstance(row.get("key"), str) or not row["key"] or len(row["key"]) > 512:
        return "no key"
    for name in FIELDS:
        value = row.get(name)
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= MAX_VALUE
        ):
            return f"{name} {str(value)[:40]!r} is not a number within +-{MAX_VALUE:g}"
    for name in ("step", "label_index"):
        value = row.get(name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return f"{name} {str(value)[:40]!r} is not a non-negative integer"
    if row.get("noisy") is not None and not isinstance(row["noisy"], bool):
        return "noisy is not true or false"
    return None


def read_sidecar(path: Path) -> Iterator[dict]:
    """The rows of one sidecar file, checked; UsageError naming the file and line for a bad one."""
    path = Path(path)
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise UsageError(f"{path}: larger than {MAX_SIDECAR_BYTES} bytes: not a scores sidecar")
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            problem = "a row longer than 4 KiB" if len(line) > MAX_ROW_BYTES else None
            row: dict = {}
            if problem is None:
                try:
                    row = parse_json_object(line)
                except ValueError as err:
                    problem = str(err)
                else:
                    problem = row_problem(row)
            if problem is not None:
                raise UsageError(f"{path}, line {number}: {problem}; re-run `mmcl shard score`")
            yield row


def shard_scores(scores: Path, shard: str, field: str = "score") -> dict[str, float]:
    """key -> `field` for one shard's scored samples ({} when the shard has no sidecar)."""
    path = sidecar_path(scores, shard)
    if not path.is_file():
        return {}
    return {row["key"]: float(row[field]) for row in read_sidecar(path) if row.get(field) is not None}


def all_rows(scores: Path, shards: Iterable[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(shard name, row) for every row of every sidecar (or of `shards`), shard by shard."""
    for shard in shards if shards is not None else scored_shards(scores):
        path = sidecar_path(scores, shard)
        if path.is_file():
            for row in read_sidecar(path):
                yield shard_name(shard), row


def histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict:
    if len(values) == 0:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for detecting `positives` (Mann-Whitney U, ties averaged);
    nan when only one class is present."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks of ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summarize(scores: Path, header: Mapping | None = None) -> dict:
    """Rewrite scores.json from every sidecar in the folder: counts per shard, and per field its
    histogram and mean; over the rows with ground truth, the AUROC of a low score for a noisy pair (a batch
    of one pair has no p-value, so fields may count fewer rows)."""
    counts: dict[str, int] = {}
    values: dict[str, list[float]] = {name: [] for name in FIELDS}
    truth: dict[str, list[bool | None]] = {name: [] for name in FIELDS}  # the noisy flag of each value's row
    for shard, row in all_rows(scores):
        counts[shard] = counts.get(shard, 0) + 1
        for name in FIELDS:
            if row.get(name) is not None:
                values[name].append(float(row[name]))
                truth[name].append(row.get("noisy"))
    summary = {**(header or {}), "samples": sum(counts.values()), "shards": counts, "fields": {}}
    for name, found in values.items():
        if not found:
            continue
        array = np.asarray(found)
        entry = {"values": len(found), "mean": round(float(array.mean()), 6), "histogram": histogram(array)}
        known = np.array([flag is not None for flag in truth[name]])
        if known.any():
            # a low score (or weight) should mean a noisy pair; a high p-value should
            flagged = array[known] if lower_is_better(name) else -array[known]
            noisy = np.array([bool(flag) for flag in truth[name]])[known]
            area = auroc(flagged, noisy)
            entry["noisy_auroc"] = round(area, 6) if math.isfinite(area) else None  # one class only: none
        summary["fields"][name] = entry
    write_atomic(Path(scores) / SUMMARY, json.dumps(summary, indent=1).encode("utf-8"))
    return summary
