"""The model to evaluate: an mmcl checkpoint (or the newest one of a run), or an open_clip model.

An mmcl checkpoint folder holds `model.json` (the ModelConfig the run trained) and `model.safetensors`;
the model is rebuilt from the config without any pretrained weights (they are in the checkpoint, and
fetching them again would need the hub) and then loaded strictly. An open_clip model is wrapped in mmcl's
ImageTextEncoder, so both kinds are evaluated by exactly the same code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from mmcl.checkpoint_folder import (
    CHECKPOINTS,
    COMPLETE,
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    PREFIX,
    list_checkpoints,
)
from mmcl.errors import UsageError
from mmcl.models import DualEncoder, ModelConfig, build_model
from mmcl.models.factory import resolve_open_clip_name
from mmcl.models.weights import TORCH_SUFFIXES, load_weights, read_state_dict


@dataclass(frozen=True)
class ModelSource:
    """What is evaluated, for reports: the architecture and where the weights came from."""

    name: str  # open_clip architecture (for audio models: the text tower's)
    pretrained: str  # checkpoint folder, weights file, open_clip tag, or "none"
    modality: str


def resolve_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint folder; for a run folder (or its checkpoints/), the newest
    complete checkpoint in it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(
            f"--checkpoint {path} does not exist; give RUN/checkpoints/step-NNNNNNNN or a run folder"
        )
    if (path / MODEL_CONFIG).is_file():
        return path
    for root in (path / CHECKPOINTS, path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise UsageError(
        f"--checkpoint {path} holds no {MODEL_CONFIG}, and no complete checkpoint below it "
        f"(RUN/{CHECKPOINTS}/{PREFIX}*/ with a {COMPLETE} marker); point it at a checkpoint folder"
    )


def checkpoint_config(checkpoint: Path) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with, set to build without fetching pretrained weights."""
    try:
        values = json.loads((checkpoint / MODEL_CONFIG).read_text("utf-8"))
        # model.json is a full dump; keep only what differs from the defaults, i.e. what the run chose, so
        # the cross-field checks (an audio section on an image model, ...) read it like the original YAML.
        defaults = ModelConfig().model_dump(mode="json")
        values = {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}
        values.update(pretrained=None, text_pretrained=None)
        if values.get("hf_text"):  # a transformers text tower's weights are in the checkpoint too
            values["hf_text_pretrained"] = False
        if isinstance(values.get("audio"), dict) and values["audio"].get("hf_model"):
            # likewise a transformers audio tower's: build it from the hf_config kept in model.json
            values["audio"] = {**values["audio"], "hf_model": None}
        config = ModelConfig.model_validate(values)
    except (OSError, ValueError) as err:  # ValidationError and JSONDecodeError are ValueErrors
        detail = err.errors()[0]["msg"] if isinstance(err, ValidationError) else err
        raise UsageError(
            f"{checkpoint / MODEL_CONFIG} is not a readable mmcl model config: {detail}"
        ) from None
    return config


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith((".safetensors", *TORCH_SUFFIXES))


def load_eval_model(
    checkpoint: Path | None = None,
    open_clip_name: str | None = None,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
) -> DualEncoder:
    """The model to evaluate, in eval mode on `device`.

    Exactly one of `checkpoint` (an mmcl checkpoint or run folder) and `open_clip_name` (with
    `pretrained`: an open_clip tag, a local weights file, or None for random weights) must be given.
    """
    _check_choice(checkpoint, open_clip_name, pretrained)
    if checkpoint is not None:
        folder = resolve_checkpoint(checkpoint)
        weights = folder / MODEL_WEIGHTS
        if not weights.is_file():
            raise UsageError(f"{folder} has no {MODEL_WEIGHTS}: the checkpoint is incomplete")
        model = build_model(checkpoint_config(folder))
        try:
            load_weights(model, read_state_dict(weights))
        except RuntimeError as err:
            raise UsageError(f"{weights} does not fit the model in {folder / MODEL_CONFIG}: {err}") from None
    else:
        if (
            pretrained is not None
            and _looks_like_path(pretrained)
            and not Path(pretrained).expanduser().is_file()
        ):
            raise UsageError(
                f"--pretrained {pretrained}: weights file not found; fix the path or give an "
                "open_clip tag (open_clip.list_pretrained_tags_by_model(NAME))"
            )
        model = build_model(
            ModelConfig(modality="image", open_clip_name=open_clip_name, pretrained=pretrained)
        )
    return model.to(device).eval()


def model_source(
    checkpoint: Path | None = None, open_clip_name: str | None = None, pretrained: str | None = None
) -> ModelSource:
    """What `load_eval_model` with the same arguments loads, described for reports."""
    _check_choice(checkpoint, open_clip_name, pretrained)
    if checkpoint is not None:
        folder = resolve_checkpoint(checkpoint)
        config = checkpoint_config(folder)
        name = config.open_clip_name if config.open_clip_config is None else resolve_open_clip_name(config)
        return ModelSource(name, str(folder), config.modality)
    return ModelSource(open_clip_name, pretrained or "none", "image")


def _check_choice(checkpoint: Path | None, open_clip_name: str | None, pretrained: str | None) -> None:
    if (checkpoint is None) == (open_clip_name is None):
        raise UsageError("give exactly one model: --checkpoint RUN/checkpoints/step-... or --open-clip NAME")
    if checkpoint is not None and pretrained is not None:
        raise UsageError("--pretrained goes with --open-clip; a --checkpoint already holds its weights")
