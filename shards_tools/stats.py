"""`mmcl shard stats`: what is in a shard set: counts, sizes, caption lengths, image sizes or durations,
labels, injected noise and skipped items by reason; optionally drawn as histograms."""

from __future__ import annotations

import math
from array import array
from collections import Counter
from pathlib import Path

import numpy as np

from shards_tools.manifest import load_manifest
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
