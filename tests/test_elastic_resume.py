"""Elastic resume (mmcl.data.progress): stop on one number of processes x loader workers, continue on another,
and every sample of the epoch is consumed exactly once. The stream level runs several ranks' real loaders
(real shards, real DataLoader workers) in this process; the training level runs `mmcl train` through a real
`accelerate launch` with 2 processes over gloo, logging the trained keys with train.log_sample_keys."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from fault_training import build_train_shards, trained_keys
from processes import run_mmcl_on
from test_data import TOKENIZER, TRAIN_TRANSFORM, config, write_shards

from mmcl.data import build_loader
from mmcl.data.progress import DataProgress, SampleLedger
from mmcl.errors import UsageError

LOADER = {"modality": "image", "media_transform": TRAIN_TRANSFORM, "tokenizer": TOKENIZER}


def train_layout(
    cfg, world: int, resume: dict | None, steps: int, step0: int = 0
) -> tuple[dict, list[tuple]]:
    """`steps` steps of `world` ranks' loaders as a trainer takes them (one batch per rank per step): the
    DataProgress state a checkpoint after them holds, and the (epoch, source, pass, shard, index) of every raw
    sample the batches accounted for."""
    loaders = [build_loader(cfg, rank=r, world_size=world, resume=resume, **LOADER) for r in range(world)]
    states = [loader.dataset.initial_state() for loader in loaders]
    iterators = [iter(loader) for loader in loaders]
    consumed = []
    for _ in range(steps):
        for rank, iterator in enumerate(iterators):
            batch = next(iterator)
            states[rank].update(batch)
            consumed += [tuple(row) for row in batch["consumed"].tolist()]
    progress = loaders[0].dataset.progress
    progress.record(step0 + steps, [s.state_dict() for s in states], [s.take_consumed() for s in states])
    del iterators  # ends the DataLoader workers
    return json.loads(json.dumps(progress.state_dict())), consumed


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[list[dict], dict[int, int]]:
    root = tmp_path_factory.mktemp("elastic")
    a = write_shards(root / "a", "a", shards=12, per_shard=5, bad={"a00007": "media"})
    b = write_shards(root / "b", "b", shards=6, per_shard=3)
    sources = [{"urls": str(root / "a"), "weight": 2.0}, {"urls": str(root / "b"), "weight": 1.0}]
    return sources, {0: len(a), 1: len(b)}


@pytest.mark.parametrize(
    "layouts",
    [
        [(2, 2, 5), (1, 1, 30)],
        [(2, 2, 5), (1, 2, 30)],
        [(2, 2, 5), (2, 1, 15)],
        [(1, 1, 7), (2, 2, 4), (3, 1, 3), (1, 2, 30)],
    ],
    ids=["2x2-1x1", "2x2-1x2", "2x2-2x1", "1x1-2x2-3x1-1x2"],
)
def test_each_sample_of_the_epoch_is_consumed_once_across_layouts(two_sources, layouts) -> None:
    """(processes, workers, steps) one after the other, each resumed from the previous one's state: two
    weighted sources (the small one repeats within the epoch), shuffling, a bad sample. Over the whole chain
    every first-pass sample of epoch 0 is consumed exactly once (the bad one dropped once), and no sample of
    any pass is consumed twice."""
    sources, sizes = two_sources
    resume, consumed, step = None, [], 0
    for world, workers, steps in layouts:
        resume, rows = train_layout(config(sources, workers=workers), world, resume, steps, step)
        consumed += rows
        step += steps
    assert max(Counter(consumed).values()) == 1, "a sample was consumed twice"
    for source, size in sizes.items():
        first_pass = sorted(r[4] + 100 * r[3] for r in consumed if r[:3] == (0, source, 0))
        assert len(first_pass) == size, f"source {source}: {len(first_pass)} of {size} first-pass samples"
    assert any(r[2] > 0 for r in consumed if r[:2] == (0, 1)), "the weighted small source should repeat"
    assert any(r[0] == 1 for r in consumed), "the chain should reach epoch 1"
    assert min(r[0] for r in SampleLedger.from_state_dict(resume["consumed"]).shards) >= 1, (
        "epoch 0 is finished by every reader: it must have left the ledger"
    )


def test_an_elastic_resume_is_a_pure_function_of_the_checkpoint(two_sources) -> None:
    sources, _ = two_sources
    saved, _ = train_layout(config(sources, workers=2), 2, None, 3)
    runs = [train_layout(config(sources, workers=1), 1, saved, 6, 3) for _ in range(2)]
    assert runs[0] == runs[1]


def test_same_layout_resume_replays_and_carries_the_ledger(two_sources) -> None:
    """With the same counts, positions replay the very batches; the ledger carries on beside them."""
    sources, _ = two_sources
    cfg = config(sources, workers=2)
    saved, _ = train_layout(cfg, 2, None, 3)
    loader = build_loader(cfg, rank=1, world_size=2, resume=saved, **LOADER)
    assert loader.dataset.elastic is None
    fresh = build_loader(cfg, rank=1, world_size=2, **LOADER)
    fresh_batches = [b["keys"] for b in itertools.islice(fresh, 7)]
    resumed = [b["keys"] for b in itertools.islice(loader, 4)]
    assert resumed == fresh_batches[3:]
    assert loader.dataset.progress.ledger.samples() == 2 * 3 * 4  # 2 ranks x 3 steps x batch 4, none bad


def test_resampled_streams_resume_elastically_from_their_epoch(two_sources) -> None:
    sources, _ = two_sources
    saved, rows = train_layout(config(sources, workers=2, resampled=True), 2, None, 4)
    assert saved["consumed"] == [] and saved["resampled"] is True  # nothing to share out
    resumed, more = train_layout(config(sources, workers=1, resampled=True), 1, saved, 4, 4)
    assert {r[0] for r in more} >= {max(r[0] for r in rows)} and resumed["elastic_until"] >= 0


def test_ledger_bitmaps_merge_and_round_trip() -> None:
    ledger = SampleLedger()
    ledger.mark([(0, 0, 0, 4, i) for i in (5, 1, 2, 3, 9)] + [(1, 1, 2, 0, 0)])
    assert ledger.consumed((0, 0, 0, 4)) == 0b1000101110
    other = SampleLedger()
    other.mark([(0, 0, 0, 4, 4), (0, 0, 0, 4, 0)])
    ledger.merge(other)
    assert ledger.consumed((0, 0, 0, 4)) == 0b1000111111 and ledger.samples() == 8
    again = SampleLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert again == ledger and again.passes(1, 1) == 3 and again.epochs() == [0, 1]
    ledger.drop_before(1)
    assert ledger.epochs() == [1]
    for row in (
        [0, 0, 0, 1, 5],
        [0, 0, 0, 1, "not base64!"],
        [0, 0, -1, 1, "AQ=="],
        [0, 0, 0, 1, "A" * 10**7],
    ):
        with pytest.raises(UsageError, match="malformed row"):
            SampleLedger.from_state_dict([row])
    with pytest.raises(UsageError, match="damaged state.json"):
        DataProgress.from_state_dict({"world_size": "two", "num_workers": 1})


# ------------------------------------------------------------------ the trainer, through accelerate launch


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory) -> Path:
    """96 images in 16 shards of 6, written by the project's sharder (manifest with the counts)."""
    return build_train_shards(tmp_path_factory.mktemp("elastic_train"), 96, 6, size=(36, 36))


def elastic_config(path: Path, shards: Path, output: Path, workers: int, **train) -> Path:
    config = {
        "run": {"output_dir": str(output), "seed": 0},
        "model": {"modality": "image", "open_clip_name": "mmcl-micro-vit"},
        "data": {
            "sources": [{"urls": str(shards)}],
            "batch_size": 4,
            "workers": workers,
            "shuffle_buffer": 10,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 40, "log_every": 5, "checkpoint_every": 3, "log_sample_keys": True, **train},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def train_on(processes: int, config: Path, *overrides: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return run_mmcl_on(processes, "train", "--config", config, *overrides, env=env).stdout


@pytest.fixture(scope="module")
def stopped_2x2(train_shards, tmp_path_factory) -> Path:
    """2 processes x 2 loader workers, stopped (max_steps_per_run) at step 7 of a 12-step epoch."""
    root = tmp_path_factory.mktemp("stopped")
    config = elastic_config(root / "c.yaml", train_shards, root / "run", workers=2)
    out = train_on(2, config, "train.max_steps_per_run=7")
    assert "trained 7 steps" in out
    return root / "run"


def resume_elsewhere(
    stopped: Path, tmp_path: Path, shards: Path, processes: int, workers: int, *extra
) -> str:
    shutil.copytree(stopped, tmp_path / "run")
    config = elastic_config(tmp_path / "c.yaml", shards, tmp_path / "run", workers=workers)
    out = train_on(processes, config, "train.steps=30", *extra)
    assert "elastic resume" in out and "trained 30 steps" in out
    return out


@pytest.mark.parametrize(
    "processes, workers, batch",
    [(1, 1, "global"), (1, 2, "per_process"), (2, 1, "per_process")],
    ids=["1x1-global-batch", "1x2", "2x1"],
)
def test_training_resumed_on_other_counts_sees_each_sample_once(
    stopped_2x2, train_shards, tmp_path, processes, workers, batch
) -> None:
    out = resume_elsewhere(
        stopped_2x2, tmp_path, train_shards, processes, workers, f"train.elastic_batch={batch}"
    )
    if batch == "global":  # 2 processes x 4 before: 8 on the one process now
        assert "data.batch_size 8 per process keeps the global batch at 8" in out
    run = tmp_path / "run"
    epoch0 = Counter(key for epoch, key in trained_keys(run) if epoch == 0)
    assert len(epoch0) == 96, f"{96 - len(epoch0)} samples of epoch 0 were never trained on"
    assert set(epoch0.values()) == {1}, "a sample of epoch 0 was trained twice"
    assert any(epoch == 1 for epoch, _ in trained_keys(run))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 31, 5))


def test_training_grown_from_one_process_to_two(train_shards, tmp_path) -> None:
    """1 process x 2 workers -> 2 x 1, with noise weighting on: its window carries over."""
    config = elastic_config(tmp_path / "c.yaml", train_shards, tmp_path / "run", workers=2)
    config.write_text(config.read_text() + "noise: {method: loss_mixture, warmup_steps: 2}\n")
    train_on(1, config, "train.max_steps_per_run=5", "data.batch_size=8")
    out = train_on(2, config, "train.steps=20", "data.workers=1", "data.batch_size=8")
    assert "elastic resume from 1 x 2 to 2 x 1" in out
    epoch0 = Counter(key for epoch, key in trained_keys(tmp_path / "run") if epoch == 0)
    assert len(epoch0) == 96 and set(epoch0.values()) == {1}
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000020" / "state.json").read_text())
    data = state["train_state"]["data"]
    assert data["global_batch"] == 16 and data["world_size"] == 2
    # the weighting's window carried over: 5 steps x 8 pairs before, 15 x 2 x 8 after
    assert state["extra"]["noise"]["estimator"]["count"] == 5 * 8 + 15 * 16
