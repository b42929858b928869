"""Every shipped recipe parses, validates, builds its model and trains one step on tiny real shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from media_files import make_image, make_tone
from processes import REPO

from mmcl.config import load_train_config
from mmcl.train.trainer import Trainer
from shards_tools.config import build_config
from shards_tools.run import run_sharding

RECIPES = sorted((REPO / "configs").glob("*_text/*.yaml"))


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    for i in range(8):
        make_image(root / "img" / f"{i}.png", "red" if i % 2 else "blue", size=(48, 40), seed=i)
        (root / "img" / f"{i}.txt").write_text("a red square" if i % 2 else "a blue square")
        make_tone(root / "wav" / f"{i}.wav", 200 + 50 * i, seconds=0.5)
        (root / "wav" / f"{i}.txt").write_text(f"a tone number {i}")
    shards = {}
    for modality, folder in (("image", "img"), ("audio", "wav")):
        shards[modality] = root / f"{modality}-shards"
        run_sharding(
            build_config(
                {
                    "input": {"modality": modality, "path": root / folder},
                    "output": shards[modality],
                    "shard_size": 4,
                    "workers": 1,
                }
            ),
            progress=False,
        )
    return shards


def test_every_recipe_starts_with_the_command_that_runs_it() -> None:
    assert len(RECIPES) >= 4
    for recipe in RECIPES:
        header = []
        for line in recipe.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
        assert any("-m mmcl train --config" in line or "mmcl train --config" in line for line in header), (
            recipe
        )


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_trains_one_step(recipe: Path, tiny_shards: dict[str, Path], tmp_path: Path) -> None:
    modality = yaml.safe_load(recipe.read_text())["model"]["modality"]
    overrides = [
        f"run.output_dir={tmp_path / 'run'}",
        f"data.sources=[{{urls: '{tiny_shards[modality]}'}}]",
        "data.batch_size=2",
        "data.workers=0",
        "data.shuffle_buffer=4",
        "train.steps=1",
        "train.mixed_precision=no",
        "train.log_every=1",
        "optim.warmup_steps=0",
    ]
    config = load_train_config(recipe, overrides)  # the recipe itself validates; only the data is swapped
    trainer = Trainer(config)
    trainer.setup()  # the recipe's full-size model, optimizer and data stream
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    loss, negatives = trainer._train_step([next(iter(trainer.loader))])
    trainer.optimizer.step()
    trainer.cleanup()
    assert torch.isfinite(loss) and loss > 0 and negatives == 1
    after = [p for p in trainer.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
