"""`mmcl shard stats`: what is in a shard set: counts, sizes, caption lengths, image sizes or durations,
labels, injected noise and skipped items by reason; optionally drawn as histograms."""

from __future__ import annotations

import json
import tarfile
from array import array
from collections import Counter
from pathlib import Path

import numpy as np

from shards_tools.manifest import load_manifest
from shards_tools.verify import split_member


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


def collect_stats(output: Path) -> dict:
    """Read only the .txt/.json members of every shard (media bytes are skipped) and summarise them."""
    output = Path(output)
    manifest = load_manifest(output)
    caption_words, widths, heights, durations = array("d"), array("d"), array("d"), array("d")
    labels: Counter[str] = Counter()
    noisy = 0
    for shard in manifest["shards"]:
        with tarfile.open(output / shard["name"]) as tar:
            for member in tar:
                _, ext = split_member(member.name)
                if ext != "json":
                    continue
                meta = json.loads(tar.extractfile(member).read())
                for caption in meta.get("text", []):
                    caption_words.append(len(caption.split()))
                if "width" in meta:
                    widths.append(meta["width"])
                    heights.append(meta["height"])
                if "duration" in meta:
                    durations.append(meta["duration"])
                if "label" in meta:
                    labels[meta["label"]] += 1
                noisy += bool(meta.get("noisy"))
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
    }
    if manifest["modality"] == "image":
        stats["width"], stats["height"] = _summary(widths), _summary(heights)
    else:
        stats["duration_seconds"] = _summary(durations)
    stats["_values"] = {"caption_words": caption_words, "width": widths, "height": heights, "duration": durations}
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
            lines.append(f"{name:<13} min {s['min']:g}  mean {s['mean']:g}  median {s['median']:g}  max {s['max']:g}")
    if stats["noisy_samples"]:
        lines.append(f"noisy pairs   {stats['noisy_samples']} (injected with --noise-rate)")
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
