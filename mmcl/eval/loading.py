"""The model to evaluate: an mmcl checkpoint (or the newest one of a run), an open_clip model, or a
transformers CLAP model.

An mmcl checkpoint folder holds `model.json` (the ModelConfig the run trained) and `model.safetensors`;
the model is rebuilt from the config without any pretrained weights (they are in the checkpoint, and
fetching them again would need the hub) and then loaded strictly; a run of a whole transformers model
(model.hf_clap) is rebuilt from the config and processor files in the checkpoint's hf/ folder. An open_clip
model is wrapped in mmcl's ImageTextEncoder and a ClapModel (`--hf-clap`) in mmcl.models.hf_clap's
ClapEncoder, so every kind is evaluated by exactly the same code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from mmcl.checkpoint_folder import MODEL_CONFIG, MODEL_FILES, MODEL_WEIGHTS, resolve_checkpoint
from mmcl.errors import UsageError
from mmcl.eval.config import check_model_choice
from mmcl.models import AudioTowerConfig, DualEncoder, ModelConfig, build_model
from mmcl.models.factory import resolve_open_clip_name
from mmcl.models.weights import TORCH_SUFFIXES, load_weights, read_state_dict


@dataclass(frozen=True)
class ModelSource:
    """What is evaluated, for reports: the architecture and where the weights came from."""

    name: str  # open_clip architecture (for audio models: the text tower's)
    pretrained: str  # checkpoint folder, weights file, open_clip tag, or "none"
    modality: str


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
        if values.get("hf_clap"):  # a whole CLAP model: from the config and processor files kept here
            values.update(hf_clap=str(checkpoint / MODEL_FILES), hf_clap_pretrained=False)
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
    hf_clap: str | None = None,
    audio: dict | None = None,
) -> DualEncoder:
    """The model to evaluate, in eval mode on `device`.

    Exactly one of `checkpoint` (an mmcl checkpoint or run folder), `open_clip_name` (with `pretrained`:
    an open_clip tag, a local weights file, or None for random weights) and `hf_clap` (a ClapModel's hub
    name or save_pretrained folder) must be given. `audio` overrides settings of an audio model's
    model.audio section (long_clips, max_seconds) for this evaluation.
    """
    check_model_choice(checkpoint, open_clip_name, pretrained, hf_clap)
    if checkpoint is not None:
        folder = resolve_checkpoint(checkpoint)
        weights = folder / MODEL_WEIGHTS
        if not weights.is_file():
            raise UsageError(f"{folder} has no {MODEL_WEIGHTS}: the checkpoint is incomplete")
        model = build_model(_with_audio(checkpoint_config(folder), audio))
        try:
            load_weights(model, read_state_dict(weights))
        except RuntimeError as err:
            raise UsageError(f"{weights} does not fit the model in {folder / MODEL_CONFIG}: {err}") from None
    elif hf_clap is not None:
        model = build_model(_with_audio(_config(hf_clap=hf_clap), audio))
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


def _config(**values) -> ModelConfig:
    """A ModelConfig from command-line values; a validation error is a UsageError."""
    try:
        return ModelConfig.model_validate(values)
    except ValidationError as err:
        raise UsageError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None


def _with_audio(config: ModelConfig, audio: dict | None) -> ModelConfig:
    """`config` with its audio section's `audio` settings replaced (validated again)."""
    if not audio:
        return config
    if config.modality != "audio":
        raise UsageError(f"{', '.join(audio)}: settings of audio models; this one is an image-text model")
    values = config.model_dump(mode="json", exclude_defaults=True)
    values["audio"] = {**values.get("audio", {}), **audio}
    return _config(**values)


def model_source(
    checkpoint: Path | None = None,
    open_clip_name: str | None = None,
    pretrained: str | None = None,
    hf_clap: str | None = None,
) -> ModelSource:
    """What `load_eval_model` with the same arguments loads, described for reports."""
    check_model_choice(checkpoint, open_clip_name, pretrained, hf_clap)
    if checkpoint is not None:
        folder = resolve_checkpoint(checkpoint)
        config = checkpoint_config(folder)
        if config.hf_clap is not None:
            return ModelSource(_trained_clap_name(folder), str(folder), "audio")
        name = config.open_clip_name if config.open_clip_config is None else resolve_open_clip_name(config)
        return ModelSource(name, str(folder), config.modality)
    if hf_clap is not None:
        _config(hf_clap=hf_clap)  # reads its config files: a wrong name fails here, before the data
        return ModelSource(hf_clap, hf_clap, "audio")
    return ModelSource(open_clip_name, pretrained or "none", "image")


def audio_config(checkpoint: Path | None = None, hf_clap: str | None = None) -> AudioTowerConfig | None:
    """The audio settings of the model a checkpoint or --hf-clap gives (None: an image-text model)."""
    if hf_clap is not None:
        return _config(hf_clap=hf_clap).audio
    if checkpoint is not None:
        config = checkpoint_config(resolve_checkpoint(checkpoint))
        return config.audio if config.modality == "audio" else None
    return None


def _trained_clap_name(folder: Path) -> str:
    """The CLAP model a run fine-tuned, as its config named it."""
    return str(json.loads((folder / MODEL_CONFIG).read_text("utf-8")).get("hf_clap"))
