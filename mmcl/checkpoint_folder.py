"""The checkpoint folder's on-disk contract, defined once for the trainer that writes it and the evaluator
(and any user) that reads it.

    RUN/checkpoints/step-00000200/
        model.safetensors   the weights (image-text: exactly open_clip's state dict)
        optimizer.pt        optimizer state (loaded with torch.load(weights_only=True))
        rng.pt              per-rank torch RNG states (weights_only)
        state.json          TrainState + per-rank python/numpy RNG states + extra states (noise weighting)
        model.json          the model config, so `mmcl eval --checkpoint DIR` can rebuild the model
        extra.safetensors   tensors of other stateful parts (the momentum teacher), when there are any
        hf/                 a whole transformers model's config, processor and tokenizer (model.hf_clap),
                            so the checkpoint rebuilds it without the original folder
        COMPLETE            written last; a folder without it is a partial write and is never loaded
"""

from __future__ import annotations

from pathlib import Path

from mmcl.errors import UsageError

CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoints, in run.output_dir
PREFIX = "step-"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model.json"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "state.json"
EXTRA_TENSORS = "extra.safetensors"
MODEL_FILES = "hf"
COMPLETE = "COMPLETE"


def checkpoint_dir(root: Path, step: int) -> Path:
    """The folder of the checkpoint of `step` under a checkpoints folder `root`."""
    return Path(root) / f"{PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    """Whether a checkpoint folder was written to the end (its COMPLETE marker exists)."""
    return (Path(path) / COMPLETE).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under a checkpoints folder, oldest first."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted((p for p in root.glob(f"{PREFIX}*") if p.is_dir() and is_complete(p)), key=lambda p: p.name)


def resolve_checkpoint(path: Path, argument: str = "--checkpoint") -> Path:
    """`path` itself if it is a checkpoint folder; for a run folder (or its checkpoints/), the newest
    complete checkpoint in it. `argument` names it in the UsageError for a path that is neither."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(
            f"{argument} {path} does not exist; give RUN/checkpoints/step-NNNNNNNN or a run folder"
        )
    if (path / MODEL_CONFIG).is_file():
        return path
    for root in (path / CHECKPOINTS, path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise UsageError(
        f"{argument} {path} holds no {MODEL_CONFIG}, and no complete checkpoint below it "
        f"(RUN/{CHECKPOINTS}/{PREFIX}*/ with a {COMPLETE} marker); point it at a checkpoint folder"
    )
