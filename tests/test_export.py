"""`mmcl export`: a trained image-text run becomes an open_clip folder that open_clip loads by itself."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from test_train import image_shards, write_config  # noqa: F401 (image_shards is a fixture)

from mmcl.cli import main
from mmcl.config import load_train_config
from mmcl.eval.loading import load_eval_model
from mmcl.export import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS
from mmcl.train.trainer import run_training


@pytest.fixture(scope="module")
def trained_run(image_shards: Path, tmp_path_factory) -> Path:  # noqa: F811 (the imported fixture)
    root = tmp_path_factory.mktemp("export")
    config = write_config(
        root / "c.yaml",
        image_shards,
        root / "run",
        data={"workers": 0},
        train={"steps": 3, "checkpoint_every": 3},
    )
    run_training(load_train_config(config))
    return root / "run"


def test_an_exported_image_text_model_loads_in_open_clip_with_identical_features(
    trained_run: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "exported"
    assert main(["export", "--format", "hf", str(trained_run), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS]
    config = json.loads((out / OPEN_CLIP_CONFIG).read_text())
    assert {"embed_dim", "vision_cfg", "text_cfg"} <= config["model_cfg"].keys()

    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    ours = load_eval_model(checkpoint=trained_run)
    theirs.eval()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer(["a photo of a red square", "a blue square", "green"])
    with torch.no_grad():
        assert torch.equal(theirs.encode_image(images), ours.encode_media(images, normalize=False))
        assert torch.equal(theirs.encode_text(tokens), ours.encode_text(tokens, normalize=False))
    resize = preprocess.transforms[0]
    assert config["preprocess_cfg"]["size"] in (64, [64, 64]) and resize.size in (64, (64, 64), [64, 64])


def test_export_refuses_a_non_empty_output_and_names_it(trained_run: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["export", str(trained_run), str(tmp_path / "taken")]) == 2
    assert "is not empty" in capsys.readouterr().err
