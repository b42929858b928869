"""What a whole transformers CLAP model (`model.hf_clap`) sets in mmcl's config, read from its JSON files
without torch or transformers, while the config is validated.

`model.hf_clap` names a ClapModel (a hub name, or a folder written by the model's and its processor's
save_pretrained). It is the whole dual encoder: CLAP's audio encoder and projection, its text encoder and
projection, its tokenizer, its temperature. So it fixes the modality (audio) and the audio front end:
`model.audio` is filled from it as for `tower: hf` (hf_config = the ClapModel's config.json, hf_features =
its feature extractor's settings; sample_rate and clip_seconds follow them), and takes only sample_rate,
clip_seconds, long_clips and max_seconds. Settings that choose another tower are refused, naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmcl.models.hf_audio_settings import (
    CONFIG_FILE,
    DROPPED_CONFIG_KEYS,
    family_of,
    read_features,
    read_hf_json,
)

KEY = "model.hf_clap"
# What model.audio may set beside hf_clap, and what is filled from the CLAP folder.
AUDIO_KEYS = ("sample_rate", "clip_seconds", "long_clips", "max_seconds")
FILLED_AUDIO_KEYS = ("tower", "hf_model", "hf_config", "hf_features")
# Model settings that choose another tower, tokenizer or head than the CLAP model's own.
CONFLICTING_KEYS = (
    "open_clip_name",
    "open_clip_config",
    "open_clip_config_dirs",
    "text_pretrained",
    "siglip",
    "hf_text",
    "hf_text_pooler",
    "hf_text_proj",
    "hf_text_pretrained",
)


def resolve_hf_clap(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A raw model section with `hf_clap` set, its audio section filled from the CLAP model's files;
    ValueError naming the key on a conflict or an unreadable model. `defaults`: the model section's
    defaults (a key at its default is not set: an assignment to a built config passes them all)."""
    data = dict(data)
    name = data["hf_clap"]
    if not isinstance(name, str):
        return data  # the field's own type check reports it
    if Path(name).expanduser().is_dir():  # recorded absolute, so a run's model.json finds it from anywhere
        name = data["hf_clap"] = str(Path(name).expanduser().resolve())
    if data.setdefault("modality", "audio") != "audio":
        raise ValueError(
            f"{KEY} is an audio-text model but model.modality is {data['modality']!r}; remove it"
        )
    for key in CONFLICTING_KEYS:
        if data.get(key, defaults[key]) != defaults[key]:
            raise ValueError(
                f"model.{key} and {KEY} are both set; {KEY} brings its own towers, tokenizer and "
                f"temperature: remove model.{key}"
            )
    config = read_hf_json(name, CONFIG_FILE, KEY)
    if config.get("model_type") != "clap":
        raise ValueError(
            f"{KEY}={name!r} holds a {config.get('model_type')!r} model, not a whole ClapModel (for CLAP's "
            "audio encoder alone, with a new projection, use model.audio.tower: hf)"
        )
    features = read_features(name, KEY)
    if family_of(features) != "clap":
        raise ValueError(f"{KEY}={name!r}: its feature extractor is not a ClapFeatureExtractor")
    if not isinstance(data.get("audio") or {}, dict):
        return data  # an assignment to a built config: its audio section was filled then
    audio = dict(data.get("audio") or {})
    extra = sorted(k for k in audio if k not in AUDIO_KEYS + FILLED_AUDIO_KEYS)
    if extra or audio.get("tower", "hf") != "hf" or audio.get("hf_model"):
        bad = extra[0] if extra else "tower" if audio.get("tower", "hf") != "hf" else "hf_model"
        raise ValueError(
            f"model.audio.{bad} does not apply with {KEY}, whose feature extractor and audio encoder fix the "
            f"front end; remove it (model.audio takes {', '.join(AUDIO_KEYS)})"
        )
    config = {k: v for k, v in config.items() if k not in DROPPED_CONFIG_KEYS}
    data["audio"] = {**audio, "tower": "hf", "hf_model": None, "hf_config": config, "hf_features": features}
    return data
