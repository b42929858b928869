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
            assert [again.shard(i).items for i in reversed(range(3))] == list(reversed([s.items for s in shards]))
        finally:
            again.close()
    finally:
        planner.close()
