"""ShardPlanner: the plan of a long input holds its items on disk, not in memory, and still plans exactly."""

from __future__ import annotations

import tracemalloc

from shards_tools.items import SourceItem
from shards_tools.plan import ShardPlanner

CAPTION_CHARS = 2000


def many_items(count: int):
    for n in range(count):
        yield SourceItem(f"/data/{n:06d}.jpg", [f"caption {n} " + "x" * CAPTION_CHARS], label=f"class{n % 7}")


def test_planning_memory_does_not_grow_with_the_items():
    """10,000 items of ~2 KB each (20 MB as objects): the planner keeps a few numbers per item in memory."""
    tracemalloc.start()
    planner = ShardPlanner(many_items(10_000), shard_size=1000, shuffle=True, noise_rate=0.2, seed=1)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    try:
        assert held < 2_000_000, f"the plan holds {held / 1e6:.1f} MB"
        assert peak < 4_000_000, f"planning peaked at {peak / 1e6:.1f} MB"
        assert len(planner) == 10 and planner.labels == {f"class{k}" for k in range(7)}
    finally:
        planner.close()


def test_shards_read_back_in_plan_order_with_a_caption_derangement():
    planner = ShardPlanner(many_items(250), shard_size=100, shuffle=True, noise_rate=0.4, seed=7)
    try:
        shards = [planner.shard(index) for index in range(len(planner))]
        assert [planner.shard_items(i) for i in range(len(planner))] == [100, 100, 50]
        entries = [e for s in shards for e in s.items]
        assert [e.key for e in entries] == [f"{k:09d}" for k in range(250)]
        sources = [e.item.source for e in entries]
        assert sorted(sources) == [f"/data/{n:06d}.jpg" for n in range(250)] and sources != sorted(sources)
        noisy = [e for e in entries if e.noisy]
        assert len(noisy) == 100 == len(planner.noise_permutation())
        by_key = {e.key: e for e in entries}
        for key, donor in planner.noise_permutation():
            assert key != donor
            assert by_key[key].captions == (by_key[donor].original_captions or by_key[donor].captions)
            assert by_key[key].original_captions == list(by_key[key].item.captions) != by_key[key].captions
        # the same plan again, read in another order, is identical
        again = ShardPlanner(many_items(250), shard_size=100, shuffle=True, noise_rate=0.4, seed=7)
        try:
            assert [again.shard(i).items for i in reversed(range(3))] == list(
                reversed([s.items for s in shards])
            )
        finally:
            again.close()
    finally:
        planner.close()


def _noisy_pairs(items: list[SourceItem], rate: float, seed: int = 3):
    """(receiver, donor) item pairs of a noise plan, and the number of pairs asked for."""
    planner = ShardPlanner(items, shard_size=len(items), shuffle=True, noise_rate=rate, seed=seed)
    try:
        by_key = {e.key: e.item for e in planner.shard(0).items}
        return [(by_key[k], by_key[d]) for k, d in planner.noise_permutation()], planner.noise_requested
    finally:
        planner.close()


def test_noisy_pairs_always_get_a_caption_of_another_label():
    """10 balanced classes: a plain random cycle hands ~11% of the chosen pairs a same-class caption (a
    correct pair recorded as noisy); the plan gives every noisy pair another label's caption and keeps the
    count."""
    items = [
        SourceItem(f"/d/{n}.png", [f"template {n % 3} of class{n % 10}"], label=f"class{n % 10}")
        for n in range(2000)
    ]
    for rate in (0.2, 0.5, 0.8):
        pairs, requested = _noisy_pairs(items, rate)
        assert len(pairs) == requested == round(rate * 2000)
        assert all(receiver.label != donor.label for receiver, donor in pairs)
        assert len({donor.source for _, donor in pairs}) == len(pairs)  # every caption given away once


def test_unlabelled_noisy_pairs_never_receive_their_own_caption_text():
    items = [SourceItem(f"/d/{n}.jpg", [f"caption {n % 4}"]) for n in range(400)]  # 4 distinct texts
    pairs, requested = _noisy_pairs(items, 0.5)
    assert len(pairs) == requested == 200
    assert all(receiver.captions != donor.captions for receiver, donor in pairs)


def test_a_dominant_label_limits_the_noise_that_can_be_made():
    """90% of the items share a label: most chosen pairs find no donor with other content; they keep their own
    captions (not noisy) instead of receiving a same-label one."""
    items = [SourceItem(f"/d/{n}.png", ["x"], label="big" if n % 10 else f"small{n}") for n in range(500)]
    pairs, requested = _noisy_pairs(items, 0.5)
    assert requested == 250 and 0 < len(pairs) < requested
    assert all(receiver.label != donor.label for receiver, donor in pairs)
