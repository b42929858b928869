"""Pretrained Hugging Face transformers text towers (RoBERTa, BERT, T5's encoder, ...) through open_clip.

`model.hf_text` names a transformers encoder (a hub id or a local `save_pretrained` folder) that becomes the
text tower, with its own tokenizer. mmcl writes it into the open_clip model config's `text_cfg` the way
open_clip's own `hf_model_name` configs are written (`hf_model_name`, `hf_tokenizer_name`,
`hf_pooler_type`, `hf_proj_type`), so open_clip builds the tower (`HFTextEncoder`: encoder, pooler,
projection to embed_dim) and the tokenizer (`HFTokenizer`), and an image-text checkpoint stays exactly
open_clip's state dict. Audio models take the same `HFTextEncoder` as their text tower.

transformers is an optional extra (`pip install 'mmcl[hf]'`): nothing here imports it before a model with
`model.hf_text` is built, so mmcl works without it.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from mmcl.errors import UsageError

KEY = "model.hf_text"
HF_EXTRA = "pip install 'mmcl[hf]'"
OPEN_CLIP_CONTEXT_LENGTH = 77  # open_clip's text_cfg default, used when the config sets none
# Local weights files transformers' from_pretrained reads (single file or sharded index).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# open_clip's arch_dict lists mt5 but not T5 (nor UMT5), whose encoders have the same attribute names.
MT5_LIKE = ("t5", "umt5")
ROBERTA_LIKE = ("roberta", "xlm-roberta")
# A tokenizer without a declared maximum length reports this sentinel (transformers' VERY_LARGE_INTEGER).
UNBOUNDED = int(1e20)


def looks_like_folder(value: str) -> bool:
    """Whether `value` means a local folder rather than a hub id ('roberta-base', 'org/name')."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value


def check_hf_text(source: str, need_weights: bool) -> None:
    """Raise UsageError (naming model.hf_text) unless transformers is installed and `source` is a hub id
    or a folder holding a transformers config (and weights, when `need_weights`)."""
    if importlib.util.find_spec("transformers") is None:
        raise UsageError(f"{KEY}={source!r} needs Hugging Face transformers: {HF_EXTRA}")
    folder = Path(source).expanduser()
    if not folder.exists():
        if looks_like_folder(source):
            raise UsageError(
                f"{KEY}={source!r}: no such folder; point it at a folder written by the model's and "
                f"tokenizer's save_pretrained, or give a Hugging Face hub id"
            )
        return  # a hub id: transformers resolves it (from its cache when HF_HUB_OFFLINE=1)
    if not (folder / "config.json").is_file():
        raise UsageError(
            f"{KEY}={source!r} holds no config.json; save the encoder there with save_pretrained"
        )
    if need_weights and not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UsageError(
            f"{KEY}={source!r} holds a config but no weights ({', '.join(WEIGHT_FILES)}); save the "
            f"model there with save_pretrained, or set model.hf_text_pretrained: false for random weights"
        )


@functools.lru_cache(maxsize=16)
def _inspect(source: str) -> tuple[str, int | None]:
    """The encoder's model_type and the most tokens it takes (None: no limit), from its config and
    tokenizer; UsageError when they cannot be read or the tokenizer pads with another id than the
    encoder masks."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:  # missing files, offline without a cached copy, unknown type
        raise UsageError(f"{KEY}={source!r} cannot be loaded: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id != getattr(config, "pad_token_id", None):
        raise UsageError(
            f"{KEY}={source!r}: the tokenizer pads with id {tokenizer.pad_token_id} but the encoder's "
            f"config has pad_token_id={getattr(config, 'pad_token_id', None)}; the text tower masks "
            f"padding by that id, so set the same pad token in both"
        )
    limits = [tokenizer.model_max_length] if tokenizer.model_max_length < UNBOUNDED else []
    if isinstance(getattr(config, "max_position_embeddings", None), int):
        # RoBERTa-style position ids start after the padding id.
        offset = config.pad_token_id + 1 if config.model_type in ROBERTA_LIKE else 0
        limits.append(config.max_position_embeddings - offset)
    return config.model_type, min(limits, default=None)


def _register_arch(model_type: str) -> None:
    """Make open_clip's HFTextEncoder know `model_type` (T5-family encoders are added as mt5's)."""
    from open_clip.hf_configs import arch_dict

    if model_type in MT5_LIKE:
        arch_dict.setdefault(model_type, arch_dict["mt5"])
    if model_type not in arch_dict:
        raise UsageError(
            f"{KEY}: open_clip's text tower supports transformers model types {sorted(arch_dict)} "
            f"(and {list(MT5_LIKE)}); this encoder is {model_type!r}"
        )


def open_clip_text_cfg(
    source: str, pooler: str, proj: str, base: dict[str, Any], need_weights: bool
) -> dict[str, Any]:
    """The open_clip text_cfg of a transformers text tower, replacing `base` (the open_clip config's own
    text_cfg, of which only context_length is kept; without one, open_clip's 77 capped by what the encoder
    takes)."""
    check_hf_text(source, need_weights)
    model_type, limit = _inspect(source)
    _register_arch(model_type)
    context = base.get("context_length")
    if context is None:
        context = min(OPEN_CLIP_CONTEXT_LENGTH, limit or OPEN_CLIP_CONTEXT_LENGTH)
    elif limit is not None and context > limit:
        raise UsageError(
            f"{KEY}={source!r} takes at most {limit} tokens, but the open_clip config's "
            f"text_cfg.context_length is {context}; lower it (an inline model.open_clip_config)"
        )
    return {
        "context_length": context,
        "hf_model_name": source,
        "hf_tokenizer_name": source,
        "hf_pooler_type": pooler,
        "hf_proj_type": proj,
    }


def lockable_text_part(text: Any) -> Any:
    """What freeze_text locks in a text tower: a transformers tower's encoder (its projection, new on top
    of pretrained weights, keeps training, as open_clip's HFTextEncoder.lock does), else the whole tower."""
    from open_clip.hf_model import HFTextEncoder

    return text.transformer if isinstance(text, HFTextEncoder) else text
