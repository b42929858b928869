"""Training options end to end on real shards and a micro model: optimizer parameter groups, the learning-rate
schedule, gradient clipping, bf16 on CPU, keep_last, max_bad_steps, resuming from a given checkpoint,
alignment-score weighting and evaluation inside a training run."""

from __future__ import annotations

import json
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from media_files import COLOURS, make_image
from processes import run_mmcl
from safetensors.torch import load_file
from test_train import image_shards, metrics, write_config  # noqa: F401 (image_shards is a fixture)
from torch import nn

from mmcl.config import load_train_config
from mmcl.models import build_model
from mmcl.models.config import ModelConfig
from mmcl.train.optim import lr_at, param_groups
from mmcl.train.state import TrainState
from mmcl.train.trainer import Trainer, run_training
from shards_tools.config import build_config
from shards_tools.run import run_sharding

RUN_STEPS = 6
SCHEDULE = {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": 0.1}


def train(config: Path, *overrides: str) -> TrainState:
    """A whole training run in this process (what `mmcl train` runs), with the loader in this process."""
    return run_training(load_train_config(config, ["data.workers=0", *overrides]))


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def exp_avg_norm(optimizer_state: dict) -> float:
    """The global norm of AdamW's first moments: after one step, (1 - beta1) x the applied gradient's norm."""
    return math.sqrt(
        sum(float(s["exp_avg"].double().pow(2).sum()) for s in optimizer_state["state"].values())
    )


@pytest.fixture(scope="module")
def checkpointed_run(
    image_shards: Path,  # noqa: F811 (the module fixture imported from test_train)
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """6 steps with a checkpoint after every step and keep_last 3, on a cosine schedule with a floor."""
    tmp = tmp_path_factory.mktemp("checkpointed_run")
    config = write_config(
        tmp / "c.yaml",
        image_shards,
        tmp / "run",
        optim=SCHEDULE,
        train={"steps": RUN_STEPS, "checkpoint_every": 1, "keep_last": 3},
    )
    train(config)
    return tmp / "run"


# ------------------------------------------------------------------------------------------ optimizer


def test_weight_decay_only_on_matrices_never_on_norms_biases_or_the_temperature() -> None:
    """param_groups decays exactly the trainable tensors of ndim >= 2, except logit_scale / logit_bias by
    name, and leaves frozen parameters out of both groups."""
    model = build_model(
        ModelConfig(modality="image", open_clip_name="mmcl-micro-vit", siglip=True, freeze_text=True)
    )
    decay_group, no_decay_group = param_groups(model, weight_decay=0.2)
    assert (decay_group["weight_decay"], no_decay_group["weight_decay"]) == (0.2, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in decay_group["params"]}
    no_decay = {names[id(p)] for p in no_decay_group["params"]}
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable != set(params)  # the frozen text tower exists and is left out
    assert decay | no_decay == trainable and not decay & no_decay
    assert decay == {n for n in trainable if params[n].ndim >= 2}
    assert {n for n in trainable if params[n].ndim < 2} == no_decay
    assert any(n.endswith("logit_scale") for n in no_decay) and any(
        n.endswith("logit_bias") for n in no_decay
    )
    assert any("ln" in n and n.endswith(".weight") for n in no_decay)  # layer norms
    assert any(n.endswith(".bias") for n in no_decay)

    class Temperature(nn.Module):
        """A temperature stored as a matrix is still never decayed: the rule is by name too."""

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.logit_scale = nn.Parameter(torch.ones(1, 1))
            self.logit_bias = nn.Parameter(torch.zeros(1, 1))

    module = Temperature()
    decay_group, no_decay_group = param_groups(module, weight_decay=0.1)
    assert [p is module.proj.weight for p in decay_group["params"]] == [True]
    assert {id(p) for p in no_decay_group["params"]} == {
        id(module.proj.bias),
        id(module.logit_scale),
        id(module.logit_bias),
    }


def test_a_real_run_uses_those_groups(checkpointed_run: Path) -> None:
    """The optimizer a run saves holds param_groups' split of the model: the same tensors (by shape, in
    order) in a group decayed at optim.weight_decay (README default 0.1) and a group at 0."""
    config = load_train_config(checkpointed_run.parent / "c.yaml")
    assert config.optim.weight_decay == 0.1
    expected = param_groups(build_model(config.model), config.optim.weight_decay)
    saved = torch.load(checkpoint(checkpointed_run, RUN_STEPS) / "optimizer.pt", weights_only=True)
    assert [g["weight_decay"] for g in saved["param_groups"]] == [0.1, 0.0]
    for group, wanted in zip(saved["param_groups"], expected, strict=True):
        shapes = [tuple(saved["state"][index]["exp_avg"].shape) for index in group["params"]]
        assert shapes == [tuple(p.shape) for p in wanted["params"]]


def test_lr_warmup_cosine_floor_and_constant_schedule() -> None:
    """Linear warmup from lr/warmup to lr, cosine down to min_lr_ratio x lr at `total`, flat after; constant
    stays at lr once warm."""
    lr, warmup, total, ratio = 0.5, 4, 20, 0.1

    def at(step: int, schedule: str = "cosine", warmup_steps: int = warmup) -> float:
        return lr_at(
            step,
            base_lr=lr,
            warmup_steps=warmup_steps,
            total_steps=total,
            schedule=schedule,
            min_lr_ratio=ratio,
        )

    assert [at(s) for s in range(warmup)] == pytest.approx([lr * (s + 1) / warmup for s in range(warmup)])
    assert at(warmup) == pytest.approx(lr)  # the cosine starts at the peak
    middle = warmup + (total - warmup) // 2
    assert at(middle) == pytest.approx((lr + ratio * lr) / 2)  # half way down the cosine
    assert at(total) == pytest.approx(ratio * lr) and at(total + 50) == pytest.approx(ratio * lr)
    after = [at(s) for s in range(warmup, total + 1)]
    assert all(a > b for a, b in zip(after, after[1:], strict=False))
    assert all(ratio * lr <= v <= lr for v in after)
    assert at(0, warmup_steps=0) == pytest.approx(lr)  # no warmup: the full rate at once
    assert at(1, "constant") == pytest.approx(lr / 2)  # the warmup applies to both schedules
    assert [at(s, "constant") for s in range(warmup, total + 5)] == [lr] * (total + 5 - warmup)


def test_a_run_logs_the_learning_rate_of_the_schedule(checkpointed_run: Path) -> None:
    """The lr in metrics.jsonl for step s is lr_at(s - 1) of the run's optim settings (that step's rate)."""
    rows = metrics(checkpointed_run)
    assert [r["step"] for r in rows] == list(range(1, RUN_STEPS + 1))
    kw = {"base_lr": SCHEDULE["lr"], "warmup_steps": SCHEDULE["warmup_steps"], "total_steps": RUN_STEPS}
    expected = [lr_at(r["step"] - 1, **kw, schedule="cosine", min_lr_ratio=0.1) for r in rows]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)
    assert rows[0]["lr"] < rows[1]["lr"] and rows[-1]["lr"] < rows[2]["lr"]


def test_grad_clip_bounds_the_gradient_the_optimizer_applies(
    image_shards: Path,  # noqa: F811 (the module fixture imported from test_train)
    tmp_path: Path,
) -> None:
    """After one real step AdamW's first moment is (1 - beta1) x the applied gradient: with
    optim.grad_clip=0.01 its norm is exactly 0.01 and it points where the unclipped gradient (norm > 0.01)
    points; a clip above the gradient's norm changes nothing."""
    beta1 = 0.9
    moments = {}
    for clip in ("null", "0.01", "1e6"):
        output = tmp_path / f"clip-{clip}"
        config = write_config(tmp_path / f"{clip}.yaml", image_shards, output, optim={"warmup_steps": 0})
        train(config, "train.steps=1", f"optim.grad_clip={clip}", f"optim.betas=[{beta1}, 0.98]")
        moments[clip] = torch.load(checkpoint(output, 1) / "optimizer.pt", weights_only=True)
    raw_norm = exp_avg_norm(moments["null"]) / (1 - beta1)
    assert raw_norm > 0.05  # the clip below really has something to cut
    assert exp_avg_norm(moments["0.01"]) / (1 - beta1) == pytest.approx(0.01, rel=1e-4)
    scale = 0.01 / raw_norm
    for index, state in moments["null"]["state"].items():
        clipped = moments["0.01"]["state"][index]["exp_avg"]
        assert torch.allclose(clipped, state["exp_avg"] * scale, rtol=1e-4, atol=1e-12)
        assert torch.equal(moments["1e6"]["state"][index]["exp_avg"], state["exp_avg"])


# ------------------------------------------------------------------------------------------ precision


def test_bf16_mixed_precision_trains_on_cpu(
    image_shards: Path,  # noqa: F811 (the module fixture imported from test_train)
    checkpointed_run: Path,
    tmp_path: Path,
) -> None:
    """train.mixed_precision=bf16 on a CPU: the run completes with finite losses, float32 weights are saved,
    and the first loss (same weights and batch as the float32 run) differs from float32's by bf16 rounding."""
    config = write_config(
        tmp_path / "c.yaml", image_shards, tmp_path / "run", data={"workers": 0}, optim=SCHEDULE
    )
    # a fresh process: accelerate fixes the precision of the first Accelerator a process creates
    result = run_mmcl("train", "--config", config, "train.steps=3", "train.mixed_precision=bf16")
    assert "trained 3 steps" in result.stdout
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in rows)
    weights = load_file(checkpoint(tmp_path / "run", 3) / "model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    float32_first = metrics(checkpointed_run)[0]["loss"]
    assert 1e-4 < abs(rows[0]["loss"] - float32_first) / float32_first < 0.05


# ------------------------------------------------------------------------------------------ checkpoints


def test_keep_last_leaves_only_the_newest_complete_checkpoints(checkpointed_run: Path) -> None:
    """6 checkpoints written with train.keep_last=3: steps 4, 5 and 6 remain, each complete; nothing else."""
    entries = sorted(p.name for p in (checkpointed_run / "checkpoints").iterdir())
    assert entries == ["step-00000004", "step-00000005", "step-00000006"]
    for name in entries:
        files = {p.name for p in (checkpointed_run / "checkpoints" / name).iterdir()}
        assert {
            "COMPLETE",
            "model.safetensors",
            "optimizer.pt",
            "rng.pt",
            "state.json",
            "model.json",
        } <= files


def test_resume_from_a_given_checkpoint_continues_from_its_step(
    checkpointed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """train.resume=RUN/checkpoints/step-00000004 (not the newest, step 6) into a new output_dir: the run
    starts at step 5 and reproduces the original steps 5 and 6 and its final weights exactly."""
    config = load_train_config(
        checkpointed_run.parent / "c.yaml",
        [
            "data.workers=0",
            f"run.output_dir={tmp_path / 'forked'}",
            f"train.resume={checkpoint(checkpointed_run, 4)}",
        ],
    )
    state = run_training(config)
    assert f"resumed from {checkpoint(checkpointed_run, 4)} at step 4" in capsys.readouterr().out
    assert state.step == RUN_STEPS
    forked, original = metrics(tmp_path / "forked"), metrics(checkpointed_run)
    assert [r["step"] for r in forked] == [5, 6]
    assert [r["loss"] for r in forked] == [r["loss"] for r in original[4:]]
    assert [p.name for p in sorted((tmp_path / "forked" / "checkpoints").iterdir())] == [
        "step-00000005",
        "step-00000006",
    ]
    a = load_file(checkpoint(tmp_path / "forked", 6) / "model.safetensors")
    b = load_file(checkpoint(checkpointed_run, 6) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ non-finite losses


def test_max_bad_steps_stops_a_diverged_run_and_counts_skipped_steps(
    image_shards: Path,  # noqa: F811 (the module fixture imported from test_train)
    tmp_path: Path,
) -> None:
    """optim.weight_decay=1e30 blows the weights up after the first update, so every later loss is NaN: with
    train.max_bad_steps=2 the third non-finite step stops the run with a message saying what to do, and the
    logged rows count the skipped steps."""
    config = write_config(
        tmp_path / "c.yaml", image_shards, tmp_path / "run", train={"steps": 20, "max_bad_steps": 2}
    )
    with pytest.raises(
        RuntimeError, match=r"^3 non-finite losses in a row: lower optim.lr or check the data$"
    ):
        train(config, "optim.weight_decay=1e30")
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert math.isfinite(rows[0]["loss"]) and all(math.isnan(r["loss"]) for r in rows[1:])
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2]


def test_a_huge_learning_rate_reaches_the_max_bad_steps_stop(
    image_shards: Path,  # noqa: F811 (the module fixture imported from test_train)
    tmp_path: Path,
) -> None:
    """optim.lr=1e30 makes every loss after the first update NaN and sends the temperature's logit scale to
    about -5e29 (exp underflows to 0); the run must end with the max_bad_steps message, not a crash in
    logging the temperature."""
    config = write_config(
        tmp_path / "c.yaml", image_shards, tmp_path / "run", train={"steps": 20, "max_bad_steps": 2}
    )
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        train(config, "optim.lr=1e30")
    assert [r["skipped_steps"] for r in metrics(tmp_path / "run")] == [0, 1, 2]


# ------------------------------------------------------------------------------------------ alignment scores


def shard_scored_images(root: Path, scores: list[float], manifest_format: str = "jsonl") -> Path:
    """Real images sharded by the project's sharder from a manifest with an alignment_score column."""
    rows = []
    for i, score in enumerate(scores):
        colour = COLOURS[i % len(COLOURS)]
        make_image(root / "in" / f"{i:03d}.png", colour, size=(40, 40), seed=i)
        rows.append(
            {"path": f"{i:03d}.png", "caption": f"a photo of a {colour} square", "alignment_score": score}
        )
    manifest = root / "in" / f"pairs.{manifest_format}"
    if manifest_format == "jsonl":
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = [f"{r['path']},{r['caption']},{r['alignment_score']}\n" for r in rows]
        manifest.write_text("path,caption,alignment_score\n" + "".join(lines))
    config = {
        "input": {"modality": "image", "path": manifest},
        "output": root / "shards",
        "shard_size": 8,
        "workers": 1,
    }
    run_sharding(build_config(config), progress=False)
    return root / "shards"


def scores_in_shards(shards: Path) -> dict[str, object]:
    """Each sample's alignment_score as stored in its .json, by key."""
    found = {}
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    found[meta["key"]] = meta["alignment_score"]
    return found


def test_alignment_score_weights_follow_the_score_range(tmp_path: Path) -> None:
    """noise.method=alignment_score with score_range [0.2, 0.8]: each pair's weight is its shard score mapped
    linearly to 0..1 (clipped), and metrics.jsonl logs the mean weight of the pairs seen so far."""
    scores = [round((i * 37 % 32) / 31, 4) for i in range(32)]  # 0..1, below, inside and above the range
    shards = shard_scored_images(tmp_path, scores)
    by_key = scores_in_shards(shards)
    assert sorted(by_key.values()) == sorted(scores)
    noise = {
        "method": "alignment_score",
        "score_range": [0.2, 0.8],
        "warmup_steps": 0,
        "ramp_steps": 0,
        "window": 64,
    }
    config = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", noise=noise, train={"steps": 3})
    trainer = Trainer(load_train_config(config, ["data.workers=0"]))
    trainer.setup()
    seen: list[list[str]] = []
    real = iter(trainer.loader)

    def recording() -> Iterator[dict]:
        while True:
            batch = next(real)
            seen.append(batch["keys"])
            yield batch

    trainer.loader = recording()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    expected = [min(1.0, max(0.0, (by_key[k] - 0.2) / 0.6)) for keys in seen for k in keys]
    assert len(seen) == 3 and min(expected) == 0.0 and max(expected) == 1.0 and 0 < sum(expected) / 24 < 1
    assert trainer.weighter.recent_weights.tolist() == pytest.approx(expected, abs=1e-6)
    rows = metrics(tmp_path / "run")
    for row in rows:
        so_far = expected[: 8 * row["step"]]
        assert row["noise_mean_weight"] == pytest.approx(sum(so_far) / len(so_far), abs=1e-6)
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_alignment_score_without_scores_in_the_shards_is_a_clear_error(
    image_shards: Path,  # noqa: F811 (the module fixture imported from test_train)
    tmp_path: Path,
) -> None:
    """Shards whose .json carry no alignment_score: the first step stops with a message naming the field and
    the ways out, and no checkpoint is written."""
    config = write_config(
        tmp_path / "c.yaml", image_shards, tmp_path / "run", noise={"method": "alignment_score"}
    )
    with pytest.raises(
        RuntimeError,
        match=r"needs an alignment_score for every sample: a scores sidecar .* or an 'alignment_score'",
    ):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_alignment_score_from_a_csv_manifest_column_trains(tmp_path: Path) -> None:
    """The error above says to add the score as a manifest column when sharding: from a CSV, where the
    sharder stores the column as a string ("0.5"), it must train."""
    shards = shard_scored_images(tmp_path, [i / 15 for i in range(16)], manifest_format="csv")
    assert len(scores_in_shards(shards)) == 16  # every .json carries the column
    noise = {"method": "alignment_score", "score_range": [0.0, 1.0], "warmup_steps": 0, "ramp_steps": 0}
    config = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", noise=noise, train={"steps": 3})
    state = train(config)
    assert state.step == 3 and "noise_mean_weight" in metrics(tmp_path / "run")[-1]


# ------------------------------------------------------------------------------------- periodic evaluation


def test_periodic_eval_inside_a_training_run_logs_its_metrics_at_the_right_steps(
    image_shards: Path,  # noqa: F811 (the module fixture imported from test_train)
    tmp_path: Path,
) -> None:
    """eval.every_steps=2 in a 5-step run: zero-shot and retrieval rows (eval/NAME/acc1, ...) follow the
    training rows of steps 2, 4 and 5 (the last step always evaluates), with values in [0, 1]."""
    for colour in COLOURS:
        for i in range(2):
            make_image(tmp_path / "heldout" / colour / f"{i}.png", colour, size=(40, 40), seed=1000 + i)
    evaluation = {
        "every_steps": 2,
        "zero_shot": [{"name": "colours", "data": str(tmp_path / "heldout")}],
        "retrieval": [{"name": "captions", "data": str(image_shards)}],
        "max_samples": 16,
        "batch_size": 16,
    }
    config = write_config(
        tmp_path / "c.yaml", image_shards, tmp_path / "run", eval=evaluation, train={"steps": 5}
    )
    train(config)
    rows = metrics(tmp_path / "run")
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    for row in evals:
        assert rows[rows.index(row) - 1]["step"] == row["step"]  # right after that step's training row
        keys = set(row) - {"step"}
        assert {"eval/colours/acc1", "eval/colours/acc5", "eval/colours/mean_per_class_recall"} <= keys
        assert {"eval/captions/image_retrieval_recall@1", "eval/captions/text_retrieval_recall@5"} <= keys
        assert all(0.0 <= row[k] <= 1.0 for k in keys if "acc" in k or "recall" in k)
        assert "loss" not in row
    assert (tmp_path / "run" / "tensorboard").is_dir()
