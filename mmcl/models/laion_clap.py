"""LAION-CLAP's original checkpoints (the laion_clap package's .pt files) as transformers ClapModel folders:
`mmcl convert laion-clap CHECKPOINT.pt OUT --like NAME_OR_DIR`.

A .pt file holds {"epoch", "state_dict", ...} (or the bare state dict), its keys prefixed "module." when
saved from DDP. Its keys are renamed to the ClapModel's exactly as transformers' own conversion script
does it (src/transformers/models/clap/convert_clap_original_pytorch_to_hf.py, `rename_state_dict`): the
substring replacements of KEYS_TO_MODIFY_MAPPING in order, nn.Sequential indices of the projections
(0 -> linear1, 2 -> linear2) and of the unused MLP heads (sequential.N -> layers.N//3.linear), and each
HTSAT `qkv` matrix split into query, key and value. The architecture, tokenizer and feature extractor come
from a transformers CLAP of the same shape (`--like`): laion/clap-htsat-unfused for the 630k(-audioset)
HTSAT-tiny checkpoints, laion/clap-htsat-fused for their -fusion ones, laion/larger_clap_general (HTSAT-base)
for the music/speech ones. The file is read with torch.load(weights_only=True): it cannot run code.

What the ClapModel has no place for is dropped, as the script's load_state_dict(strict=False) drops it,
but only these LAION-only parts: HTSAT's own spectrogram front end and classification head, the MLP heads
of its mlp_loss (text_transform, audio_transform) and the precomputed attention masks. Any other extra or
missing weight, or a shape that differs, means `--like` names another architecture: refused, naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from mmcl.errors import UsageError
from mmcl.models.hf_clap import load_clap
from mmcl.models.weights import read_state_dict

# transformers' KEYS_TO_MODIFY_MAPPING, applied in this order to every key
KEYS_TO_MODIFY_MAPPING = {
    "text_branch": "text_model",
    "audio_branch": "audio_model.audio_encoder",
    "attn": "attention.self",
    "self.proj": "output.dense",
    "attention.self_mask": "attn_mask",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "bn0": "batch_norm",
}
SEQUENTIAL = re.compile(r".*sequential.(\d+).*")
PROJECTION = re.compile(r".*_projection.(\d+).*")
# LAION-only parts (after renaming) that a ClapModel has no place for
DROPPED = (
    "audio_model.audio_encoder.spectrogram_extractor.",
    "audio_model.audio_encoder.logmel_extractor.",
    "audio_model.audio_encoder.tscam_conv.",
    "audio_model.audio_encoder.head.",
    "text_transform.",
    "audio_transform.",
)


def rename_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """LAION-CLAP's keys -> the ClapModel's, as transformers' conversion script renames them."""
    renamed = {}
    for key, value in state.items():
        for old, new in KEYS_TO_MODIFY_MAPPING.items():
            if old in key:
                key = key.replace(old, new)
        if match := SEQUENTIAL.match(key):
            index = match.group(1)
            key = key.replace(f"sequential.{index}.", f"layers.{int(index) // 3}.linear.")
        elif match := PROJECTION.match(key):
            index = int(match.group(1))
            key = key.replace(f"_projection.{index}.", f"_projection.linear{1 if index == 0 else 2}.")
        if "qkv" in key:  # the script's `"audio" and "qkv" in key` is this test
            query, key_part, value_part = value.chunk(3, dim=0)
            for name, part in (("query", query), ("key", key_part), ("value", value_part)):
                renamed[key.replace("qkv", name)] = part
        else:
            renamed[key] = value
    return renamed


def _dropped(key: str) -> bool:
    return key.startswith(DROPPED) or key.endswith(".attn_mask")


def convert_laion_checkpoint(checkpoint: Path, output: Path, like: str) -> Path:
    """Write LAION-CLAP checkpoint `checkpoint` as a ClapModel folder (model and processor) `output`, with
    the architecture, tokenizer and feature extractor of the transformers CLAP `like`."""
    checkpoint, output = Path(checkpoint), Path(output)
    if not checkpoint.is_file():
        raise UsageError(f"{checkpoint} is not a file; give a LAION-CLAP checkpoint (.pt)")
    if output.exists() and any(output.iterdir()):
        raise UsageError(f"{output} exists and is not empty; choose a new output folder")
    state = rename_state_dict(read_state_dict(checkpoint))
    clap, processor = load_clap(like, pretrained=False)
    target = clap.state_dict()
    buffers = {name for name, _ in clap.named_buffers()}
    unexpected = sorted(k for k in state if k not in target and not _dropped(k))
    missing = sorted(k for k in target if k not in state and k not in buffers)
    wrong = sorted(k for k in target if k in state and state[k].shape != target[k].shape)
    for problem, keys in (("has weights a ClapModel lacks", unexpected), ("lacks weights", missing)):
        if keys:
            raise UsageError(
                f"{checkpoint} {problem} ({len(keys)}, e.g. {keys[0]}) for the ClapModel of --like {like}: "
                "it is another architecture (HTSAT-tiny/base, fusion or not); pick the matching --like"
            )
    if wrong:
        raise UsageError(
            f"{checkpoint}: {wrong[0]} is {list(state[wrong[0]].shape)} but {list(target[wrong[0]].shape)} "
            f"in the ClapModel of --like {like} ({len(wrong)} such); pick the matching --like"
        )
    clap.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    output.mkdir(parents=True, exist_ok=True)
    clap.to(torch.float32).save_pretrained(output)
    processor.save_pretrained(output)
    processor.feature_extractor.save_pretrained(output)
    return output
