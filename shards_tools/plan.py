"""Deterministic plan: which input item goes into which shard, under which key, with which caption.

The plan depends only on the input and the output options (seed, shuffle, noise, shard size), never on
the number of workers or the distributor, so every way of running produces the same shards.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from shards_tools.items import ItemError, SourceItem
from shards_tools.shard_format import url_scheme

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


LABEL_LIKE_COLUMNS = ("label", "class", "category", "class_name")


def content_id(item: SourceItem) -> int:
    """What a pair's caption says, as a number: its label when it has one, else its captions. Two items with
    the same content id describe the same thing, so giving one the other's caption injects no noise."""
    text = f"label\0{item.label}" if item.label is not None else "captions\0" + "\0".join(item.captions)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _source_bytes(item: SourceItem) -> int:
    """Input size used to close shards early under --max-shard-bytes (known before encoding, so the plan
    stays deterministic and parallel); URLs and tar members (``TARPATH#MEMBER``) count as zero. A local file
    whose name holds a ``#`` is a file like any other (as in fetch, the member split applies only when no
    such file exists)."""
    if url_scheme(item.source) is not None:
        return 0
    try:
        return os.stat(item.source).st_size
    except OSError:  # a tar member, or a file that is missing (skipped when it is fetched)
        return 0


class ShardPlanner:
    """The plan of a whole input, held without its items, so memory stays flat however long the input is.

    The items are pickled one after another into an anonymous temporary file as the reader streams them;
    the plan itself is a few numbers per item (file offset, output order, shard boundaries). `shard(i)`
    reads shard i's items back, so only the shards in flight are ever in memory.

    The order: the input's order, or a seeded shuffle of it (`shuffle`). Caption noise (`noise_rate`, the
    noisy-correspondence protocol): a seeded random fraction of the good items exchange captions among
    themselves so that every chosen item gets the captions of another chosen item *with other content*
    (another label, or other caption text when unlabelled): a same-class caption would be a correct pair
    recorded as noisy, which caps any detector's AUROC (~11% of swaps with 10 balanced classes).
    """

    def __init__(
        self,
        items: Iterable[SourceItem],
        *,
        shard_size: int,
        max_shard_bytes: int | None = None,
        shuffle: bool = False,
        noise_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        self._file = tempfile.TemporaryFile(prefix="mmcl-plan-")
        self._offsets = array("q")
        self.labels: set[str] = set()
        # manifest columns that look like class labels but were not given as --label-column: noise then tells
        # captions apart by their text, so a noisy pair may get another wording of its own class
        self.unused_label_columns: set[str] = set()
        good = bytearray()  # 1 for items without a known problem (candidates for caption noise)
        contents = array("q")
        sizes = array("q")
        for item in mark_duplicates(items):
            self._offsets.append(self._file.tell())
            pickle.dump(item, self._file, protocol=pickle.HIGHEST_PROTOCOL)
            good.append(item.problem is None)
            if noise_rate > 0:
                contents.append(content_id(item))
                if item.label is None:
                    self.unused_label_columns.update(k for k in item.meta if k.lower() in LABEL_LIKE_COLUMNS)
            if item.label is not None:
                self.labels.add(item.label)
            if max_shard_bytes:
                sizes.append(_source_bytes(item))
        self._order = array("q", range(len(self._offsets)))  # output position -> input position
        if shuffle:
            random.Random(f"shuffle-{seed}").shuffle(self._order)
        self.noise_requested = 0  # noisy pairs asked for; fewer are made when too few have other content
        self._donors = self._choose_noise(good, contents, noise_rate, seed) if noise_rate > 0 else {}
        self._bounds = self._shard_bounds(sizes, shard_size, max_shard_bytes)

    def _choose_noise(self, good: bytearray, contents: array, rate: float, seed: int) -> dict[int, int]:
        """Output position -> output position whose captions it receives.

        A random cycle through the chosen items, then every pair whose donor has the same content swaps
        donors with a random other pair where both swaps give other content (a swap keeps every donor used
        once). A pair that finds no such partner (one label is more than half of the chosen) keeps its own
        captions and is not noisy.
        """
        candidates = [k for k, position in enumerate(self._order) if good[position]]
        count = self.noise_requested = round(rate * len(candidates))
        if count < 2:
            return {}
        rng = random.Random(f"noise-{seed}")
        targets = rng.sample(candidates, count)
        donors = targets[1:] + targets[:1]
        content = [contents[self._order[k]] for k in targets]
        given = content[1:] + content[:1]  # content of each target's donor
        kept_own: set[int] = set()
        for i in range(count):
            if given[i] != content[i]:
                continue
            for _ in range(200):
                j = rng.randrange(count)
                if given[j] != content[i] and given[i] != content[j]:
                    donors[i], donors[j] = donors[j], donors[i]
                    given[i], given[j] = given[j], given[i]
                    break
            else:
                kept_own.add(i)
        return {target: donors[i] for i, target in enumerate(targets) if i not in kept_own}

    def _shard_bounds(
        self, sizes: array, shard_size: int, max_shard_bytes: int | None
    ) -> list[tuple[int, int]]:
        bounds, start, current_bytes = [], 0, 0
        for k, position in enumerate(self._order):
            size = sizes[position] if max_shard_bytes else 0
            full = k - start >= shard_size
            too_big = max_shard_bytes is not None and k > start and current_bytes + size > max_shard_bytes
            if full or too_big:
                bounds.append((start, k))
                start, current_bytes = k, 0
            current_bytes += size
        if len(self._order) > start:
            bounds.append((start, len(self._order)))
        return bounds

    def __len__(self) -> int:
        return len(self._bounds)

    def shard_items(self, index: int) -> int:
        """How many items shard `index` holds (bad ones included)."""
        start, end = self._bounds[index]
        return end - start

    def shard(self, index: int) -> ShardPlan:
        """Shard `index` with its items read back from the temporary file."""
        start, end = self._bounds[index]
        plan = ShardPlan(index)
        for k in range(start, end):
            item = self._read(self._order[k])
            entry = PlannedItem(make_key(k), item, list(item.captions))
            if k in self._donors:
                entry.original_captions = entry.captions
                entry.captions = list(self._read(self._order[self._donors[k]]).captions)
                entry.noisy = True
            plan.items.append(entry)
        return plan

    def noise_permutation(self) -> list[tuple[str, str]]:
        """(key, key whose captions it received) for every noisy pair, sorted; recorded in the manifest."""
        return sorted((make_key(target), make_key(donor)) for target, donor in self._donors.items())

    def _read(self, position: int) -> SourceItem:
        self._file.seek(self._offsets[position])
        return pickle.load(self._file)

    def close(self) -> None:
        self._file.close()
