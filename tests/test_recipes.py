"""Every shipped recipe parses, validates, builds its model and trains one step on tiny real shards. A recipe
that names a Hugging Face hub model (unreadable offline) gets a tiny local stand-in of the same kind in its
place, by override; everything else of the recipe is kept."""

from __future__ import annotations

from pathlib import Path

import hf_models
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
# settings that may name a hub model, and the stand-in kind of each hub name the recipes use
HUB_KEYS = ("model.hf_clap", "model.hf_text", "model.audio.hf_model")
STAND_INS = {"laion/clap-htsat-unfused": "clap", "roberta-base": "roberta"}


def hub_settings(recipe: Path) -> dict[str, str]:
    """The recipe's settings (dotted key -> hub name) that name a Hugging Face hub model."""
    found = {}
    for key in HUB_KEYS:
        value = yaml.safe_load(recipe.read_text())
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and not Path(value).expanduser().exists():
            found[key] = value
    return found


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models saved as the hub's are: a ClapModel with transformers' default (HTSAT's) feature
    extractor, 48 kHz and 10 s windows, and a RoBERTa encoder taking open_clip's 77 tokens."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("stand-ins")
    sentences = ["a dog barks", "rain on a window", "a low tone", "people talking"]
    hf_models.tiny_clap(root / "clap", sentences)
    hf_models.tiny_roberta(root / "roberta", sentences, context=77)
    return {"clap": root / "clap", "roberta": root / "roberta"}


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
def test_recipe_trains_one_step(recipe: Path, tiny_shards: dict[str, Path], tmp_path: Path, request) -> None:
    hub = hub_settings(recipe)
    unknown = sorted(name for name in hub.values() if name not in STAND_INS)
    assert not unknown, f"{recipe.name} names {unknown}: add a tiny stand-in of that kind to STAND_INS"
    folders = request.getfixturevalue("stand_ins") if hub else {}
    stand_ins = [f"{key}={folders[STAND_INS[name]]}" for key, name in hub.items()]
    modality = load_train_config(recipe, stand_ins).model.modality
    overrides = [
        *stand_ins,
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
    # the recipe itself validates; only the data and hub models are swapped
    config = load_train_config(recipe, overrides)
    trainer = Trainer(config)
    trainer.setup()  # the recipe's full-size model, optimizer and data stream
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    loss, negatives = trainer._train_step([next(iter(trainer.loader))])
    trainer.optimizer.step()
    trainer.cleanup()
    assert torch.isfinite(loss) and loss > 0 and negatives == 1
    after = [p for p in trainer.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
