"""Reading and writing model weights: safetensors or plain torch state dicts, never arbitrary pickles.

Files mmcl reads: open_clip checkpoints (bare state dicts, or open_clip trainer's {"state_dict": ...}
with a DDP "module." prefix), what `save_open_clip_weights` writes, and a DualEncoder's own
`state_dict()` (e.g. accelerate's model.safetensors, where image weights sit under "clip.").
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from open_clip import CustomTextCLIP
from open_clip.model import convert_to_custom_text_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmcl.errors import UsageError, describe_load_error
from mmcl.models.dual_encoder import AudioTextEncoder, DualEncoder, ImageTextEncoder

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Wrappers that prefix every key: DDP/DataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def save_open_clip_weights(model: DualEncoder, path: str | Path) -> Path:
    """Write `model.export_state_dict()` to `path` (.safetensors, or .pt/.pth/.bin via torch.save).

    For an image model the file is an open_clip checkpoint:
    `open_clip.create_model_and_transforms(open_clip_name, pretrained=path)` loads it. For an audio
    model it holds mmcl's layout, whose `text.*` keys match open_clip's CustomTextCLIP (so
    `text_pretrained` can read it). The file appears atomically (written under a temporary name).
    """
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix not in TORCH_SUFFIXES:
        raise UsageError(
            f"cannot save weights to {path}: use a .safetensors or {'/'.join(TORCH_SUFFIXES)} name"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.export_state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        save_file(state, str(tmp), metadata={"format": "pt"})
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from safetensors or a weights_only torch file, unwrapping {"state_dict": ...}
    and wrapper prefixes. Raises UsageError for files that are not plain tensor dicts."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors have no common base class
        raise UsageError(f"cannot read weights from {path}: {describe_load_error(e)}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not obj or not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UsageError(f"{path} holds no state dict (a mapping of names to tensors)")
    return _strip_common_prefix(obj, WRAPPER_PREFIXES)


def _strip_common_prefix(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Drop any of `prefixes` that every key starts with."""
    for prefix in prefixes:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights(model: DualEncoder, state: dict[str, Tensor]) -> None:
    """Load a whole-model state dict strictly. Image models accept open_clip's layout (CLIP or
    CustomTextCLIP) and the DualEncoder's own ("clip."-prefixed); audio models accept mmcl's.
    A checkpoint without a logit bias may initialise a SigLIP model (which keeps its initial bias)."""
    target = model.clip if isinstance(model, ImageTextEncoder) else model
    if isinstance(model, ImageTextEncoder):
        state = _strip_common_prefix(state, ("clip.",))
        if isinstance(model.clip, CustomTextCLIP):
            state = convert_to_custom_text_state_dict(state)
    if target.logit_bias is not None:
        # Starting a SigLIP model from softmax-trained weights: keep the SigLIP bias init.
        state.setdefault("logit_bias", target.logit_bias.detach().clone())
    target.load_state_dict(state, strict=True)


def load_text_tower(model: AudioTextEncoder, state: dict[str, Tensor]) -> None:
    """Copy the text tower out of an open_clip checkpoint or an mmcl (image or audio) checkpoint."""
    state = convert_to_custom_text_state_dict(_strip_common_prefix(state, ("clip.",)))
    text = {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    if not text:
        raise UsageError(
            "no text tower found (expected open_clip keys like 'token_embedding.weight' "
            "or 'text.token_embedding.weight')"
        )
    model.text.load_state_dict(text, strict=True)
