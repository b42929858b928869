"""`mmcl shard stats`: what is in a shard set: counts, sizes, caption lengths, image sizes or durations,
labels, injected noise and skipped items by reason; optionally drawn as histograms. With a scores folder
(`mmcl shard score`), also how the pairs scored and, against the sharder's noise flags, how well the scores
find the noisy pairs."""

from __future__ import annotations

import math
from array import array
from collections import Counter
from pathlib import Path

import numpy as np

from shards_tools.errors import UsageError
from shards_tools.manifest import load_manifest
from shards_tools.scores import (
    FIELDS,
    all_rows,
    auroc,
    histogram,
    lower_is_better,
    shard_name,
    sidecar_path,
)
from shards_tools.shard_format import parse_json_object, split_key
from shards_tools.tar_stream import DEFAULT_MAX_MEMBER_BYTES, ShardReadError, iter_members, open_shard


def _add_record(
    meta: dict, caption_words: array, widths: array, heights: array, durations: array, labels: Counter
) -> int:
    """Add one sample's .json to the tallies; returns 1 if it is marked noisy. ValueError for a value of the
    wrong type (then nothing is added)."""
    captions = meta.get("text", [])
    captions = [captions] if isinstance(captions, str) else captions
    width, height, duration, label = (meta.get(k) for k in ("width", "height", "duration", "label"))
    numbers_ok = all(v is None or _is_number(v) for v in (width, height, duration))
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions) or not numbers_ok:
        raise ValueError("a .json value of the wrong type")
    if (width is None) != (height is None) or not (label is None or isinstance(label, str)):
        raise ValueError("a .json value of the wrong type")
    caption_words.extend(len(caption.split()) for caption in captions)
    if width is not None:
        widths.append(width)
        heights.append(height)
    if duration is not None:
        durations.append(duration)
    if label is not None:
        labels[label] += 1
    return int(meta.get("noisy") is True)


def _is_number(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53


def _summary(values: array) -> dict:
    if not values:
        return {}
    data = np.frombuffer(values, dtype=np.float64) if values.typecode == "d" else np.asarray(values)
    return {
        "min": float(data.min()),
        "mean": round(float(data.mean()), 4),
        "median": float(np.median(data)),
        "max": float(data.max()),
    }


def collect_stats(output: Path, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> dict:
    """Read only the .json members of every shard (media bytes are never read) and summarise them. A shard
    or .json that cannot be read, and a value of the wrong type, is counted under "unreadable", not fatal."""
    output = Path(output)
    manifest = load_manifest(output)
    caption_words, widths, heights, durations = array("d"), array("d"), array("d"), array("d")
    labels: Counter[str] = Counter()
    noisy = unreadable = 0
    for shard in manifest["shards"]:
        try:
            with open_shard(str(output / shard["name"])) as (fileobj, stream):
                members = iter_members(
                    fileobj,
                    max_member_bytes=max_member_bytes,
                    stream=stream,
                    wanted=lambda name: split_key(name)[1] == "json",
                )
                for member in members:
                    if split_key(member.name)[1] != "json":
                        continue
                    try:
                        if member.problem is not None:
                            raise ValueError(member.problem)
                        meta = parse_json_object(member.data)
                        noisy += _add_record(meta, caption_words, widths, heights, durations, labels)
                    except ValueError:
                        unreadable += 1
        except (ShardReadError, OSError):
            unreadable += 1
    shard_bytes = array("d", (s["bytes"] for s in manifest["shards"]))
    stats = {
        "modality": manifest["modality"],
        "shards": manifest["totals"]["shards"],
        "samples": manifest["totals"]["samples"],
        "bytes": manifest["totals"]["bytes"],
        "skipped": manifest["totals"]["skipped"],
        "errors_by_reason": manifest["errors_by_reason"],
        "shard_bytes": _summary(shard_bytes),
        "caption_words": _summary(caption_words),
        "noisy_samples": noisy,
        "labels": dict(sorted(labels.items())),
        "unreadable": unreadable,
    }
    if manifest["modality"] == "image":
        stats["width"], stats["height"] = _summary(widths), _summary(heights)
    else:
        stats["duration_seconds"] = _summary(durations)
    stats["_values"] = {
        "caption_words": caption_words,
        "width": widths,
        "height": heights,
        "duration": durations,
    }
    return stats


def format_stats(stats: dict) -> str:
    """A plain console table."""
    lines = [
        f"modality      {stats['modality']}",
        f"shards        {stats['shards']}",
        f"samples       {stats['samples']}",
        f"bytes         {stats['bytes']:,}",
        f"skipped       {stats['skipped']}  {stats['errors_by_reason'] or ''}",
    ]
    for name in ("shard_bytes", "caption_words", "width", "height", "duration_seconds"):
        if stats.get(name):
            s = stats[name]
            lines.append(
                f"{name:<13} min {s['min']:g}  mean {s['mean']:g}  median {s['median']:g}  max {s['max']:g}"
            )
    if stats["noisy_samples"]:
        lines.append(f"noisy pairs   {stats['noisy_samples']} (injected with --noise-rate)")
    if stats["unreadable"]:
        lines.append(f"unreadable    {stats['unreadable']} shards or .json records (see `mmcl shard verify`)")
    if stats["labels"]:
        lines.append(f"labels        {len(stats['labels'])} classes")
    return "\n".join(lines)


def plot_stats(stats: dict, path: Path) -> None:
    """Histograms of caption length and image size or duration, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = stats["_values"]
    panels = [("caption length (words)", values["caption_words"])]
    if stats["modality"] == "image":
        panels += [("width (px)", values["width"]), ("height (px)", values["height"])]
    else:
        panels.append(("duration (s)", values["duration"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
    for ax, (title, data) in zip(np.atleast_1d(axes), panels, strict=False):
        ax.hist(np.asarray(data), bins=30, color="#4477aa")
        ax.set_title(title)
        ax.set_ylabel("samples")
    fig.suptitle(f"{stats['samples']} samples in {stats['shards']} shards ({stats['skipped']} skipped)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ scores

QUANTILES = {"min": 0.0, "p5": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}


def scores_plot_path(plot: Path) -> Path:
    """Where `--plot NAME.png --scores ...` draws the scores: NAME.scores.png, beside the shard plot."""
    plot = Path(plot)
    return plot.with_name(f"{plot.stem}.scores{plot.suffix or '.png'}")


def flag_noisy(values: np.ndarray, threshold: float, field: str) -> np.ndarray:
    """The pairs the filter "noisy below the threshold" flags: a low score or weight, or a high p-value."""
    return values > threshold if lower_is_better(field) else values < threshold


def _cut(values: np.ndarray, noisy: np.ndarray | None, threshold: float, field: str) -> dict:
    """How a threshold splits the pairs; with ground truth, the precision and recall of the noisy flags."""
    flagged = flag_noisy(values, threshold, field)
    n_flagged = int(flagged.sum())
    cut = {
        "threshold": round(float(threshold), 6),
        "flagged": n_flagged,
        "kept_fraction": round(1.0 - n_flagged / len(values), 6),
    }
    if noisy is not None:
        hits = int((flagged & noisy).sum())
        n_noisy = int(noisy.sum())
        cut["true_positives"] = hits
        cut["precision"] = round(hits / n_flagged, 6) if n_flagged else None
        cut["recall"] = round(hits / n_noisy, 6) if n_noisy else None
    return cut


def keep_fraction_threshold(values: np.ndarray, keep_fraction: float, field: str) -> float:
    """The value at which keeping the best `keep_fraction` of the pairs cuts (the highest scores or
    weights, the lowest p-values): the k-th best value, so flag_noisy keeps it and everything better."""
    k = min(max(round(keep_fraction * len(values)), 1), len(values))
    ordered = np.sort(values)
    return float(ordered[k - 1] if lower_is_better(field) else ordered[len(values) - k])


def collect_score_stats(
    output: Path, scores: Path, field: str = "score", threshold: float | None = None
) -> dict:
    """Summarise the scores sidecars of the shard set in `output` (by its manifest's shard names): counts,
    `field`'s quantiles and histogram and, where the rows carry the sharder's `noisy` flag, how well a low
    score (a high p-value) detects noisy pairs. UsageError for a missing folder or field, or a bad row."""
    if field not in FIELDS:
        raise UsageError(f"--field must be one of {', '.join(FIELDS)}, got {field!r}")
    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"--threshold must be a finite number, got {threshold}")
    scores = Path(scores)
    if not scores.is_dir():
        raise UsageError(
            f"--scores {scores}: not a folder (`mmcl shard score {output} --output ...` writes one)"
        )
    manifest = load_manifest(output)
    counts = {shard_name(s["name"]): s["count"] for s in manifest["shards"]}
    with_sidecar = [name for name in counts if sidecar_path(scores, name).is_file()]
    if not with_sidecar:
        raise UsageError(
            f"--scores {scores} has no sidecar for any shard of {output} (such as "
            f"{sidecar_path(scores, next(iter(counts), 'NAME')).name}): score this shard set with "
            "`mmcl shard score` first"
        )
    rows: dict[str, dict[str, dict]] = {name: {} for name in with_sidecar}
    duplicates = 0
    try:
        for shard, row in all_rows(scores, with_sidecar):
            duplicates += row["key"] in rows[shard]
            rows[shard][row["key"]] = row  # the last row of a key wins, as in shard_scores
    except OSError as err:
        raise UsageError(f"--scores {scores}: cannot read a sidecar ({err})") from None
    found = [row for shard_rows in rows.values() for row in shard_rows.values()]
    valued = [row for row in found if row.get(field) is not None]
    if not valued:
        present = sorted({name for row in found for name in FIELDS if row.get(name) is not None})
        raise UsageError(
            f"no sidecar row in {scores} has a {field!r} (the rows hold: "
            f"{', '.join(present) or 'no numbers'}); pick another --field"
        )
    scored = {
        shard: sum(r.get(field) is not None for r in shard_rows.values())
        for shard, shard_rows in rows.items()
    }
    values = np.asarray([float(row[field]) for row in valued], dtype=np.float64)
    histogram_all = histogram(values)
    truth = [row.get("noisy") for row in valued]
    noisy = np.asarray(truth, dtype=bool) if all(t is not None for t in truth) else None
    report: dict = {
        "folder": str(scores),
        "field": field,
        "pairs": manifest["totals"]["samples"],
        "scored": len(values),
        "without_score": sum(max(count - scored.get(name, 0), 0) for name, count in counts.items()),
        "shards_without_sidecar": len(counts) - len(with_sidecar),
        "duplicate_rows": duplicates,
        "mean": round(float(values.mean()), 6),
        "quantiles": {name: round(float(np.quantile(values, q)), 6) for name, q in QUANTILES.items()},
        "histogram": histogram_all,
        "rows_with_truth": sum(t is not None for t in truth),
        "truth": None,
        "at_threshold": None if threshold is None else _cut(values, noisy, threshold, field),
    }
    if noisy is not None:
        edges = np.histogram_bin_edges(values, bins=len(report["histogram"]["counts"]))
        area = auroc(values if lower_is_better(field) else -values, noisy)
        report["truth"] = {
            "noisy": int(noisy.sum()),
            "clean": int((~noisy).sum()),
            "noisy_if": "high" if lower_is_better(field) else "low",
            "auroc": None if math.isnan(area) else round(area, 6),
            "histogram_clean": histogram(values[~noisy], bins=edges),
            "histogram_noisy": histogram(values[noisy], bins=edges),
            "at_clean_fraction": None,
        }
        clean_fraction = float((~noisy).mean())
        if threshold is None and 0.0 < clean_fraction < 1.0:
            cut = _cut(values, noisy, keep_fraction_threshold(values, clean_fraction, field), field)
            report["truth"]["at_clean_fraction"] = {"keep_fraction": round(clean_fraction, 6), **cut}
    report["_values"], report["_noisy"] = values, noisy
    return report


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def _describe_cut(cut: dict) -> str:
    text = f"{cut['flagged']} flagged, {_percent(cut['kept_fraction'])} kept"
    if "precision" in cut:
        precision, recall = ("n/a" if cut[k] is None else f"{cut[k]:.4f}" for k in ("precision", "recall"))
        text += f"; precision {precision}, recall {recall} of the noisy pairs"
    return text


def format_score_stats(report: dict) -> str:
    """The scores section of the console table."""
    field, q = report["field"], report["quantiles"]
    direction = "above" if lower_is_better(field) else "below"
    lines = [
        f"scores        {report['folder']} ({field})",
        f"scored        {report['scored']} of {report['pairs']} pairs "
        f"({report['without_score']} without a score)",
        f"{field:<13} min {q['min']:.4g}  5% {q['p5']:.4g}  25% {q['p25']:.4g}  median {q['median']:.4g}  "
        f"75% {q['p75']:.4g}  95% {q['p95']:.4g}  max {q['max']:.4g}  mean {report['mean']:.4g}",
    ]
    if report["shards_without_sidecar"]:
        lines.append(f"no sidecar    {report['shards_without_sidecar']} shards (not scored yet?)")
    if report["duplicate_rows"]:
        lines.append(f"duplicates    {report['duplicate_rows']} rows repeat a key (the last one counts)")
    truth = report["truth"]
    if truth is not None:
        area = "n/a (one class only)" if truth["auroc"] is None else f"{truth['auroc']:.4f}"
        lines += [
            f"ground truth  {truth['noisy']} noisy, {truth['clean']} clean scored pairs",
            f"AUROC         {area} (a {truth['noisy_if']} {field} = noisy)",
        ]
    elif report["rows_with_truth"]:
        lines.append(
            f"ground truth  on {report['rows_with_truth']} of {report['scored']} rows only: not used"
        )
    cut = report["at_threshold"]
    if cut is not None:
        lines.append(f"threshold     flag {direction} {cut['threshold']:g}: {_describe_cut(cut)}")
    elif truth is not None and truth["at_clean_fraction"] is not None:
        cut = truth["at_clean_fraction"]
        lines.append(
            f"clean share   keeping the best {_percent(cut['keep_fraction'])} = flag {direction} "
            f"{cut['threshold']:g}: {_describe_cut(cut)}"
        )
    return "\n".join(lines)


def plot_score_stats(report: dict, path: Path) -> None:
    """The score histogram as a PNG: clean and noisy pairs overlaid where the truth is known, the threshold
    (or the clean-share cut) as a vertical line, AUROC and precision/recall in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values, noisy, field = report["_values"], report["_noisy"], report["field"]
    bins = np.histogram_bin_edges(values, bins=len(report["histogram"]["counts"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    title = f"{report['scored']} of {report['pairs']} pairs scored"
    if noisy is None:
        ax.hist(values, bins=bins, color="#4477aa")
    else:
        ax.hist(values[~noisy], bins=bins, color="#4477aa", alpha=0.6, label=f"clean ({int((~noisy).sum())})")
        ax.hist(values[noisy], bins=bins, color="#cc3311", alpha=0.6, label=f"noisy ({int(noisy.sum())})")
        ax.legend()
        area = report["truth"]["auroc"]
        title += f", AUROC {'n/a' if area is None else f'{area:.3f}'}"
    cut = report["at_threshold"] or (report["truth"] or {}).get("at_clean_fraction")
    if cut is not None:
        ax.axvline(cut["threshold"], color="black", linestyle="--", label="threshold")
        direction = "above" if lower_is_better(field) else "below"
        title += f"\nflag {direction} {cut['threshold']:g}: keeps {_percent(cut['kept_fraction'])}"
        if "precision" in cut:
            precision, recall = (
                "n/a" if cut[k] is None else f"{cut[k]:.3f}" for k in ("precision", "recall")
            )
            title += f", precision {precision}, recall {recall}"
    ax.set_title(title)
    ax.set_xlabel(field)
    ax.set_ylabel("pairs")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
