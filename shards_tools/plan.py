"""Deterministic plan: which input item goes into which shard, under which key, with which caption.

The plan depends only on the input and the output options (seed, shuffle, noise, shard size), never on
the number of workers or the distributor, so every way of running produces the same shards.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from shards_tools.items import ItemError, SourceItem

KEY_DIGITS = 9


@dataclass
class PlannedItem:
    """One item at its final place: key (its position in the output order) and the captions to write."""

    key: str
    item: SourceItem
    captions: list[str]
    noisy: bool = False
    original_captions: list[str] | None = None


@dataclass
class ShardPlan:
    index: int
    items: list[PlannedItem] = field(default_factory=list)


def make_key(position: int) -> str:
    """Keys are zero-padded positions: unique, sortable, and free of dots (webdataset splits on dots)."""
    return f"{position:0{KEY_DIGITS}d}"


def mark_duplicates(items: Iterable[SourceItem]) -> Iterator[SourceItem]:
    """Give every repeat of an already-seen uid a duplicate_id problem; the first occurrence is kept."""
    seen: set[str] = set()
    for item in items:
        if item.uid is not None and item.problem is None:
            if item.uid in seen:
                item.problem = ItemError("duplicate_id", f"id {item.uid!r} appeared earlier in the input")
            else:
                seen.add(item.uid)
        yield item


def inject_caption_noise(planned: list[PlannedItem], rate: float, seed: int) -> list[tuple[str, str]]:
    """Permute the captions of a random fraction `rate` of the pairs among themselves.

    The noisy-correspondence protocol: the chosen pairs form one random cycle, so every chosen item gets
    another chosen item's captions (a derangement) and no chosen pair keeps its own. Items that are already
    known bad are not chosen. Returns the permutation as (key, key whose captions it received).
    """
    candidates = [p for p in planned if p.item.problem is None]
    count = round(rate * len(candidates))
    if count < 2:
        return []
    rng = random.Random(f"noise-{seed}")
    chosen = rng.sample(candidates, count)
    originals = [p.captions for p in chosen]
    permutation = []
    for i, target in enumerate(chosen):
        donor = (i + 1) % count
        target.original_captions = target.captions
        target.captions = originals[donor]
        target.noisy = True
        permutation.append((target.key, chosen[donor].key))
    permutation.sort()
    return permutation


def _source_bytes(item: SourceItem) -> int:
    """Input size used to close shards early under --max-shard-bytes (known before encoding, so the plan
    stays deterministic and parallel); URLs and tar members count as zero."""
    if "://" in item.source or "#" in item.source:
        return 0
    try:
        return os.stat(item.source).st_size
    except OSError:
        return 0


def plan_shards(
    items: Iterable[SourceItem],
    *,
    shard_size: int,
    max_shard_bytes: int | None = None,
    shuffle: bool = False,
    noise_rate: float = 0.0,
    seed: int = 0,
) -> tuple[list[ShardPlan], list[tuple[str, str]]]:
    """Assign every item (bad ones included, so their errors are recorded per shard) to a shard.

    Returns the shard plans in order and the caption-noise permutation (empty without noise).
    """
    ordered = list(mark_duplicates(items))
    if shuffle:
        random.Random(f"shuffle-{seed}").shuffle(ordered)
    planned = [PlannedItem(make_key(i), item, list(item.captions)) for i, item in enumerate(ordered)]
    permutation = inject_caption_noise(planned, noise_rate, seed) if noise_rate > 0 else []

    shards: list[ShardPlan] = []
    current = ShardPlan(0)
    current_bytes = 0
    for entry in planned:
        size = _source_bytes(entry.item) if max_shard_bytes else 0
        full = len(current.items) >= shard_size
        too_big = max_shard_bytes is not None and current.items and current_bytes + size > max_shard_bytes
        if full or too_big:
            shards.append(current)
            current = ShardPlan(len(shards))
            current_bytes = 0
        current.items.append(entry)
        current_bytes += size
    if current.items:
        shards.append(current)
    return shards, permutation
