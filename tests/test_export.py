"""`mmcl export`: a trained image-text run becomes an open_clip folder that open_clip loads by itself."""

from __future__ import annotations

import json
import subprocess
import sys
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

REPO = Path(__file__).resolve().parents[1]


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


def test_a_checkpoint_that_is_not_there_fails_before_the_model_libraries_load(tmp_path: Path) -> None:
    """`mmcl export` checks its arguments first: a checkpoint that does not exist, or a folder that holds
    none, is one message naming it and exit code 2, before torch, open_clip or transformers are imported
    (a mistyped path fails at once, not after the seconds those imports take)."""
    script = (
        "import sys; from mmcl.cli import main; code = main(['export', sys.argv[1], sys.argv[2]]); "
        "print(code, sorted({'torch', 'open_clip', 'transformers'} & set(sys.modules)))"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    for checkpoint, problem in [
        (tmp_path / "missing", "does not exist; give RUN/checkpoints/step-NNNNNNNN or a run folder"),
        (empty, "holds no model.json, and no complete checkpoint below it"),
    ]:
        result = subprocess.run(
            [sys.executable, "-c", script, str(checkpoint), str(tmp_path / "out")],
            capture_output=True, text=True, cwd=REPO, check=True,
        )  # fmt: skip
        assert result.stdout.strip() == "2 []"
        assert result.stderr.startswith(f"mmcl export: error: checkpoint {checkpoint} {problem}")
        assert len(result.stderr.splitlines()) == 1
