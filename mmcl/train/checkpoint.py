"""Atomic checkpoints: a folder per step, written under a temporary name and renamed when complete; the
folder's layout is mmcl.checkpoint_folder's. Only safetensors and `torch.load(weights_only=True)` are used
to read: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmcl.checkpoint_folder import (
    COMPLETE,
    EXTRA_TENSORS,
    MODEL_CONFIG,
    MODEL_FILES,
    MODEL_WEIGHTS,
    OPTIMIZER,
    PREFIX,
    RNG,
    STATE,
    checkpoint_dir,
    is_complete,
    list_checkpoints,
)
from mmcl.errors import UsageError, describe_load_error
from mmcl.train.state import TrainState


@dataclass
class Checkpoint:
    """A loaded checkpoint, ready to be applied to a run."""

    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    train_state: TrainState
    rng: list[dict]
    extra: dict
    extra_tensors: dict[str, torch.Tensor]


def rng_state() -> dict:
    """This process's RNG states (torch CPU/CUDA tensors; python and numpy as JSON-able lists)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    train_state: TrainState,
    rng: list[dict],
    model_config: dict,
    extra: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    keep_last: int = 3,
    model_files: Callable[[Path], object] | None = None,
) -> Path:
    """Write a complete checkpoint for `train_state.step` atomically; prune to the newest `keep_last`.
    `model_files(folder)` writes the files a model needs besides its weights (DualEncoder.save_model_files)
    into the checkpoint's MODEL_FILES folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, train_state.step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    for stale in root.glob(f".{PREFIX}*.tmp-*"):  # partial writes of runs killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(tensors, tmp / MODEL_WEIGHTS)
    torch.save(optimizer_state, tmp / OPTIMIZER)
    torch.save([{"torch": r["torch"], "cuda": r["cuda"]} for r in rng], tmp / RNG)
    state = {
        "train_state": train_state.to_dict(),
        "rng": [{"python": r["python"], "numpy": r["numpy"]} for r in rng],
        "extra": extra or {},
    }
    (tmp / STATE).write_text(json.dumps(state))
    (tmp / MODEL_CONFIG).write_text(json.dumps(model_config, indent=1))
    if extra_tensors:
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in extra_tensors.items()}, tmp / EXTRA_TENSORS
        )
    if model_files is not None and not model_files(tmp / MODEL_FILES):
        shutil.rmtree(tmp / MODEL_FILES, ignore_errors=True)
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    (tmp / COMPLETE).write_text("ok\n")
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_resume_path(resume: str) -> None:
    """UsageError unless `resume` (train.resume, a folder) is a complete checkpoint."""
    if not is_complete(Path(resume)):
        state = f"has no {COMPLETE} marker (a partial write)" if Path(resume).exists() else "does not exist"
        raise UsageError(
            f"train.resume={resume} {state}: give a complete RUN/checkpoints/{PREFIX}NNNNNNNN folder, "
            "or auto (the newest complete one in run.output_dir)"
        )


def load_checkpoint(path: Path) -> Checkpoint:
    """Read one checkpoint folder (safetensors + weights_only loads only)."""
    path = Path(path)
    state = json.loads((path / STATE).read_text())
    tensor_rng = torch.load(path / RNG, weights_only=True)
    rng = [{**a, **b} for a, b in zip(tensor_rng, state["rng"], strict=False)]
    return Checkpoint(
        path=path,
        model_state=load_file(path / MODEL_WEIGHTS),
        optimizer_state=torch.load(path / OPTIMIZER, weights_only=True),
        train_state=TrainState.from_dict(state["train_state"]),
        rng=rng,
        extra=state["extra"],
        extra_tensors=load_file(path / EXTRA_TENSORS) if (path / EXTRA_TENSORS).exists() else {},
    )


def latest_checkpoint(root: Path, warn=print) -> Checkpoint | None:
    """The newest checkpoint that loads; a damaged newer one is reported and the previous one is used."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path)
        except Exception as err:  # any unreadable file means: fall back to the previous checkpoint
            warn(f"checkpoint {path} is damaged ({describe_load_error(err)}); trying the previous one")
    partial = [p for p in Path(root).glob(f"{PREFIX}*") if not is_complete(p)] if Path(root).exists() else []
    for path in partial:
        warn(f"ignoring partial checkpoint {path} (no {COMPLETE} marker)")
    return None
