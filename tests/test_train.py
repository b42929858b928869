"""Training end to end on real shards: single process, exact resume, 2 processes through accelerate."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from media_files import COLOURS, make_image, make_tone
from processes import HANG_GUARD_S, MALLOC_AS_IS, REPO, run_mmcl, run_mmcl_on, wait_until
from safetensors.torch import load_file

from mmcl.config import load_train_config
from mmcl.data.device_transform import batch_to_model_input
from shards_tools.config import build_config
from shards_tools.run import run_sharding


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_images")
    rows = []
    for i in range(192):
        colour = COLOURS[i % len(COLOURS)]
        make_image(root / "in" / f"{i:03d}.png", colour, size=(40, 40), seed=i)
        rows.append(f"{i:03d}.png,a photo of a {colour} square\n")
    (root / "in" / "m.csv").write_text("path,caption\n" + "".join(rows))
    out = root / "shards"
    config = build_config(
        {
            "input": {"modality": "image", "path": root / "in" / "m.csv"},
            "output": out,
            "shard_size": 12,
            "workers": 2,
        }
    )
    run_sharding(config, progress=False)
    return out


def write_config(path: Path, shards: Path, output: Path, **sections) -> Path:
    config = {
        "run": {"output_dir": str(output), "seed": 0},
        "model": {"modality": "image", "open_clip_name": "mmcl-micro-vit"},
        "data": {"sources": [{"urls": str(shards)}], "batch_size": 8, "workers": 2, "shuffle_buffer": 50},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 8, "log_every": 1, "checkpoint_every": 4},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_checkpoints_open_clip_can_load(image_shards: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", image_shards, tmp_path / "run")
    result = run_mmcl("train", "--config", config)
    assert "trained 8 steps" in result.stdout
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["loss"] > 0 and r["negatives"] == 7 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000004", "step-00000008"]
    weights = checkpoints[-1] / "model.safetensors"
    open_clip.add_model_config(REPO / "configs" / "models" / "mmcl-micro-vit.json")  # as a user would
    model, _, _ = open_clip.create_model_and_transforms("mmcl-micro-vit", pretrained=str(weights))
    saved = load_file(weights)
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


def test_resume_continues_the_same_trajectory(image_shards: Path, tmp_path: Path) -> None:
    full = write_config(tmp_path / "full.yaml", image_shards, tmp_path / "full")
    run_mmcl("train", "--config", full)
    split = write_config(tmp_path / "split.yaml", image_shards, tmp_path / "split")
    first = run_mmcl("train", "--config", split, "train.max_steps_per_run=3")
    assert "trained 3 steps" in first.stdout
    second = run_mmcl("train", "--config", split)
    assert "resumed from" in second.stdout and "trained 8 steps" in second.stdout
    assert [r["loss"] for r in metrics(tmp_path / "split")] == [r["loss"] for r in metrics(tmp_path / "full")]
    a = load_file(tmp_path / "full" / "checkpoints" / "step-00000008" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step-00000008" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_fresh_run_sets_the_earlier_run_aside(image_shards: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", image_shards, tmp_path / "run", train={"steps": 4})
    run_mmcl("train", "--config", config)
    earlier = metrics(tmp_path / "run")
    again = run_mmcl("train", "--config", config, "train.resume=never", "optim.lr=2e-3")
    assert (
        "resumed" not in again.stdout and "moved the earlier run's metrics.jsonl, checkpoints" in again.stdout
    )
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows != earlier
    (previous,) = (tmp_path / "run").glob("previous-*")
    assert metrics(previous) == earlier
    assert (previous / "checkpoints" / "step-00000004" / "model.safetensors").exists()


def test_sigterm_saves_and_exits_cleanly(image_shards: Path, tmp_path: Path) -> None:
    """SIGTERM once the run is training (its handlers are set before metrics.jsonl is first written). Whenever
    it lands, the run cannot have ended or checkpointed on its own by then: its only checkpoint would be its
    last step, out of reach (hours of steps)."""
    steps = 10**6
    config = write_config(
        tmp_path / "c.yaml", image_shards, tmp_path / "run", train={"steps": steps, "checkpoint_every": steps}
    )
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:  # no pipe to fill up
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmcl", "train", "--config", str(config)], cwd=REPO, stdout=out, stderr=err
        )
    try:
        wait_until((tmp_path / "run" / "metrics.jsonl").exists, "training has started", proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=HANG_GUARD_S)
    finally:
        proc.kill()  # a no-op once it has exited
        proc.wait()
    out, err = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert proc.returncode == 0, err
    assert "stop requested" in out + err
    checkpoints = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.split("-")[1])
    assert 1 <= step < steps


def test_in_process_training_gives_the_signal_handlers_back(image_shards: Path, tmp_path: Path) -> None:
    """A forked worker must not inherit the trainer's SIGTERM flag-setter: Pool.terminate would hang on it."""
    from mmcl.train.trainer import run_training

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    config = write_config(tmp_path / "c.yaml", image_shards, tmp_path / "run", train={"steps": 3})
    run_training(load_train_config(config, ["data.workers=0"]))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_feature_cache_accumulation_matches_the_full_batch_gradient(
    image_shards: Path, tmp_path: Path
) -> None:
    from mmcl.train.trainer import Trainer

    config = load_train_config(
        write_config(tmp_path / "c.yaml", image_shards, tmp_path / "run"), ["data.workers=0"]
    )
    trainer = Trainer(config)
    trainer.setup()
    loader = iter(trainer.loader)
    batches = [next(loader), next(loader)]
    trainer.model.eval()  # no dropout; compare pure gradients

    def grads():
        out = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        trainer.optimizer.zero_grad(set_to_none=True)
        return out

    loss_cached, negatives = trainer._train_step(batches)
    cached = grads()
    joined = {
        "media": torch.cat([b["media"] for b in batches]),
        "text": torch.cat([b["text"] for b in batches]),
        "keys": batches[0]["keys"] + batches[1]["keys"],
    }
    loss_full, negatives_full = trainer._train_step([joined])
    full = grads()
    assert negatives == negatives_full == 15
    assert torch.allclose(loss_cached, loss_full, atol=1e-6)
    assert cached.keys() == full.keys()
    for name in full:
        assert torch.allclose(cached[name], full[name], atol=1e-5, rtol=1e-4), name
    trainer.cleanup()


def test_two_processes_through_accelerate_use_global_negatives(image_shards: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml", image_shards, tmp_path / "run", data={"workers": 1}, train={"steps": 4}
    )
    run_mmcl_on(2, "train", "--config", config, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = metrics(tmp_path / "run")
    assert [r["negatives"] for r in rows] == [15] * 4  # 2 processes x 8 samples, all gathered
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["train_state"]["samples_seen"] == 4 * 8 * 2
    assert set(state["train_state"]["data"]["ranks"]) == {"0", "1"}


def test_audio_model_trains_on_audio_shards(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    for i in range(48):
        freq = [220, 440, 880][i % 3]
        make_tone(root / f"t{i:02d}.wav", freq + i, seconds=0.6, rate=16000)
        (root / f"t{i:02d}.txt").write_text(f"a tone at {freq} hertz")
    run_sharding(
        build_config(
            {
                "input": {"modality": "audio", "path": root},
                "output": tmp_path / "shards",
                "shard_size": 8,
                "workers": 1,
            }
        ),
        progress=False,
    )
    audio = {
        "tower": "cnn",
        "sample_rate": 16000,
        "clip_seconds": 0.5,
        "n_mels": 32,
        "cnn_channels": [8, 16],
        "spec_augment": {"time_masks": 1, "time_mask_width": 5},
    }
    config = write_config(
        tmp_path / "c.yaml",
        tmp_path / "shards",
        tmp_path / "run",
        model={"modality": "audio", "audio": audio},
        train={"steps": 4},
    )
    run_mmcl("train", "--config", config)
    rows = metrics(tmp_path / "run")
    assert len(rows) == 4 and all(r["negatives"] == 7 for r in rows)


def test_config_errors_name_the_key_and_exit_2(image_shards: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", image_shards, tmp_path / "run")
    typo = run_mmcl("train", "--config", config, "optim.learning_rate=1", check=False)
    assert (
        typo.returncode == 2
        and "unknown key optim.learning_rate" in typo.stderr
        and "Traceback" not in typo.stderr
    )
    wrong_type = run_mmcl("train", "--config", config, "train.steps=many", check=False)
    assert wrong_type.returncode == 2 and "train.steps" in wrong_type.stderr
    bad_yaml = run_mmcl("train", "--config", config, "data.sources=[{urls: x", check=False)
    assert bad_yaml.returncode == 2 and "quote it" in bad_yaml.stderr and "Traceback" not in bad_yaml.stderr
    missing = run_mmcl(
        "train",
        "--config",
        config,
        f"data.sources=[{{urls: '{tmp_path}/nope-{{000..003}}.tar'}}]",
        check=False,
    )
    assert missing.returncode == 2 and "nope-000.tar" in missing.stderr
    siglip = run_mmcl("train", "--config", config, "loss.kind=siglip", check=False)
    assert siglip.returncode == 2 and "model.siglip" in siglip.stderr


def test_non_finite_loss_skips_the_update(image_shards: Path, tmp_path: Path) -> None:
    """A batch that yields NaN (here: a corrupted image tensor) is reported and its update skipped."""
    from mmcl.train.trainer import Trainer

    config = load_train_config(
        write_config(tmp_path / "c.yaml", image_shards, tmp_path / "run"),
        ["data.workers=0", "train.steps=4", "train.checkpoint_every=100"],
    )
    trainer = Trainer(config)
    trainer.setup()
    real = iter(trainer.loader)

    def faulty():
        for step in range(4):
            batch = next(real)
            if step == 2:  # as the model's input: the loader hands images over as uint8
                batch = batch_to_model_input(batch, torch.device("cpu"), trainer.device_images)
                batch["media"] = torch.full_like(batch["media"], float("nan"))
            yield batch

    trainer.loader = faulty()
    state = trainer.train()
    trainer.cleanup()
    assert state.step == 4 and state.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert [r["skipped_steps"] for r in metrics(tmp_path / "run")] == [0, 0, 1, 1]


def test_cpu_thread_count_leaves_room_for_the_loader_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmcl.train.threads import available_cores, cpu_threads, set_cpu_threads

    assert cpu_threads(cores=2, processes_on_node=1, loader_workers=2) == 1
    assert cpu_threads(cores=16, processes_on_node=2, loader_workers=3) == 5
    assert cpu_threads(cores=2, processes_on_node=4, loader_workers=0) == 1
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_cpu_threads(loader_workers=0, processes_on_node=1) is None  # the user's choice wins
        assert torch.get_num_threads() == before
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_cpu_threads(loader_workers=1, processes_on_node=1) == max(1, available_cores() - 1)
        assert torch.get_num_threads() == max(1, available_cores() - 1)
    finally:
        torch.set_num_threads(before)


REALLOCATE = """
import argparse, io, resource, sys, tempfile, torch
from pathlib import Path
from mmcl.eval.cli import check_run_flags
from mmcl.host_memory import keep_freed_memory

def step():  # a training step's pattern: large blocks (some over glibc's 32 MiB mmap cap), freed at the end
    blocks = [torch.ones(n) for n in [40 << 20, 6 << 20, 6 << 20, 3 << 20] * 4]
    del blocks

def faults_over_steps() -> int:
    for _ in range(3):  # the heap settles in the first steps
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

if sys.argv[1] == "loader-worker":  # the pattern in a worker of build_loader, the main process set nothing
    from PIL import Image
    from mmcl.data import DataConfig, build_loader
    from shards_tools.writer import sample_bytes, tar_end
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    body = sample_bytes({"__key__": "000000", "png": png.getvalue(), "txt": b"a square"})
    folder = Path(tempfile.mkdtemp())
    (folder / "shard-000000.tar").write_bytes(body + tar_end(len(body)))
    loader = build_loader(
        DataConfig(sources=[{"urls": str(folder)}], batch_size=1, workers=1), modality="image",
        media_transform=lambda image: torch.tensor([float(faults_over_steps())]),
        tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
    )
    print("worker", int(next(iter(loader))["media"].item()))
    sys.exit()
if sys.argv[1] == "eval-flags":  # what `mmcl eval` and `mmcl shard score` do before loading a model
    print(check_run_flags(argparse.Namespace(batch_size=64, workers=0, max_samples=None, device="auto")))
else:
    print(keep_freed_memory() if sys.argv[1] == "keep" else False)
print(faults_over_steps())
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_cpu_step_reuses_the_memory_the_previous_step_freed(tmp_path: Path) -> None:
    """After keep_freed_memory, once the heap has settled, a step's allocations take the pages the previous
    step freed, where glibc's defaults give every large block back and fault all of it in again (~880 MB a
    step here, up to 220,000 pages). Seen over 5 steps: 0.46 to 1.1 million faults by default, 0 to 41,000
    kept (the heap may still grow by a block where the address layout fragments it). Eval and scoring on a
    CPU keep it the same way, and so do training's loader workers on any device. A setting the user made
    for the allocator wins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}

    def faults(mode: str, **extra: str) -> tuple[str, int]:
        done = subprocess.run(
            [sys.executable, "-c", REALLOCATE, mode], env={**env, **extra}, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        kept, count = done.stdout.split()
        return kept, int(count)

    kept, default_faults = faults("default")
    assert kept == "False" and default_faults > 300_000
    kept, kept_faults = faults("keep")
    assert kept == "True" and kept_faults < default_faults / 5
    device, eval_faults = faults("eval-flags", CUDA_VISIBLE_DEVICES="")
    assert device == "cpu" and eval_faults < default_faults / 5
    _, worker_faults = faults("loader-worker")
    assert worker_faults < default_faults / 5
    _, worker_faults = faults("loader-worker", **MALLOC_AS_IS)
    assert worker_faults > 300_000
    kept, _ = faults("keep", MALLOC_TRIM_THRESHOLD_="1000000")
    assert kept == "False"
