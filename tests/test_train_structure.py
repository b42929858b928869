"""How a run is put together: the preflight checks run once per run, before the model is built; the weighting
is one object whose state is what a checkpoint keeps; every metrics row goes through one sink."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import image_shards, write_config  # noqa: F401 (image_shards is a fixture)

import mmcl.data.pipeline
import mmcl.train.preflight
import mmcl.train.trainer
from mmcl.cli import main
from mmcl.config import load_train_config
from mmcl.errors import UsageError
from mmcl.models import ModelConfig, build_model
from mmcl.noise.config import NoiseConfig
from mmcl.noise.methods import METHODS
from mmcl.noise.weighting import NoiseWeighting
from mmcl.train.metrics_sink import MetricsSink
from mmcl.train.trainer import Trainer

CHECKS = ("resolve_sources", "check_shard_counts", "check_resume_path")


def count_checks(monkeypatch) -> dict[str, int]:
    """Count the calls of the preflight's checks wherever they are looked up (the preflight, the stream)."""
    calls = dict.fromkeys(CHECKS, 0)
    for module in (mmcl.train.preflight, mmcl.data.pipeline):
        for name in CHECKS:
            real = getattr(module, name, None)
            if real is None:
                continue

            def counted(*args, _real=real, _name=name, **kwargs):
                calls[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)
    return calls


def test_a_run_checks_its_sources_and_resume_folder_once(
    image_shards: Path,  # noqa: F811 (the module fixture imported from test_train)
    tmp_path: Path,
    monkeypatch,
) -> None:
    """`mmcl train` resolves and checks the sources and train.resume once (the stream takes the resolved
    sources); `--check` runs the same checks and builds nothing."""
    config = str(write_config(tmp_path / "c.yaml", image_shards, tmp_path / "run", train={"steps": 3}))
    calls = count_checks(monkeypatch)
    assert main(["train", "--config", config, "data.workers=0", "train.checkpoint_every=2"]) == 0
    assert calls == {"resolve_sources": 1, "check_shard_counts": 1, "check_resume_path": 0}

    resume = f"train.resume={tmp_path / 'run' / 'checkpoints' / 'step-00000002'}"
    calls = count_checks(monkeypatch)
    assert main(["train", "--config", config, "data.workers=0", "train.steps=4", resume]) == 0
    assert calls == {"resolve_sources": 1, "check_shard_counts": 1, "check_resume_path": 1}
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4

    built: list[object] = []
    monkeypatch.setattr(mmcl.train.trainer, "build_model", built.append)
    calls = count_checks(monkeypatch)
    assert main(["train", "--config", config, "--check", resume]) == 0
    assert calls == {"resolve_sources": 1, "check_shard_counts": 1, "check_resume_path": 1} and built == []


def test_a_refused_run_builds_no_model(
    image_shards: Path,  # noqa: F811 (the module fixture imported from test_train)
    tmp_path: Path,
    monkeypatch,
) -> None:
    """What `mmcl train --check` refuses, the run refuses in the same words before it builds anything."""
    config = write_config(tmp_path / "c.yaml", image_shards, tmp_path / "run")
    built: list[object] = []
    monkeypatch.setattr(mmcl.train.trainer, "build_model", built.append)
    trainer = Trainer(load_train_config(config, ["data.workers=17"]))  # 16 shards
    with pytest.raises(UsageError, match="16 shards for world_size\\*workers = 17 readers"):
        trainer.setup()
    trainer = Trainer(load_train_config(config, [f"train.resume={tmp_path}"]))
    with pytest.raises(UsageError, match="has no COMPLETE marker"):
        trainer.setup()
    assert built == []


def test_the_stream_checks_its_sources_when_built_directly(
    image_shards: Path,  # noqa: F811 (the module fixture imported from test_train)
    tmp_path: Path,
) -> None:
    cfg = load_train_config(
        write_config(tmp_path / "c.yaml", image_shards, tmp_path / "run"), ["data.workers=17"]
    )
    model = build_model(cfg.model)
    with pytest.raises(UsageError, match="17 readers"):
        mmcl.data.pipeline.build_train_stream(
            cfg.data,
            modality="image",
            media_transform=model.media_transform(train=True),
            tokenizer=model.tokenizer,
        )


def test_every_method_is_registered() -> None:
    methods = NoiseConfig.model_fields["method"].annotation.__args__
    assert set(METHODS) == set(methods) - {"none"}


@pytest.mark.parametrize("method", ["none", "local_fdr", "loss_mixture", "teacher", "alignment_score"])
def test_the_weighting_is_one_object_with_the_checkpoint_state(method: str) -> None:
    """One `weigh` per step on the model's outputs (detached inside: no gradient reaches the estimate), and
    one state: state.json's {"noise": ...} and, for the teacher, its weights for extra.safetensors."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(modality="image", open_clip_name="mmcl-micro-vit"))
    cfg = NoiseConfig(method=method, warmup_steps=0, ramp_steps=0, window=256)
    batch = {
        "media": torch.randn(8, 3, 64, 64),
        "text": model.tokenizer([f"a photo of a {c} thing." for c in "abcdefgh"]),
        "noisy": torch.tensor([False, True] * 4),
        "alignment_score": torch.linspace(0, 1, 8),
    }
    outputs = model(batch["media"], batch["text"])

    def loss(media, text, scale, bias) -> dict:
        return {"per_sample_loss": -(media * text).sum(dim=1) * scale}

    weighting = NoiseWeighting(cfg, model, loss=loss)
    weights, soft = weighting.weigh(0, [batch], outputs)
    assert soft is None
    extra, tensors = weighting.state_dict()
    assert set(extra) == {"noise"} and set(extra["noise"]) >= {"estimator", "null_test", "recent_weights"}
    if method == "none":
        assert weights is None and len(weighting.recent_weights) == 0 and weighting.histograms() == {}
        return
    assert (
        weights.shape == (8,)
        and not weights.requires_grad
        and set(weighting.histograms()) == {"noise/weights"}
    )
    assert (set(tensors) == set(model.state_dict())) == (method == "teacher")
    restored = NoiseWeighting(cfg, model, loss=loss)
    restored.load_state_dict(json.loads(json.dumps(extra)), tensors)
    assert restored.state_dict()[0] == extra


def test_the_sink_writes_rows_in_order_and_tags_by_section(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo'
    )
    sink = MetricsSink(tmp_path, start_step=2, main_process=True)  # resumed at step 2: later rows are redone
    sink.log(3, {"loss": 0.5, "lr": float("nan")}, histograms={"noise/weights": torch.ones(4).numpy()})
    sink.log(3, {"eval/colours/acc1": 0.25})
    sink.close()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert rows == [
        '{"step": 1, "loss": 2.0}',
        '{"step": 3, "loss": 0.5, "lr": NaN}',
        '{"step": 3, "eval/colours/acc1": 0.25}',
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/colours/acc1", "train/loss"]
    assert events.Tags()["histograms"] == ["noise/weights"]
    quiet = MetricsSink(tmp_path / "other", start_step=0, main_process=False)
    quiet.log(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()
