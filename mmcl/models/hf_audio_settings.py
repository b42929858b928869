"""What a Hugging Face audio encoder needs from mmcl's config, read from its files without torch or
transformers: its family, and the sample rate and longest clip its feature extractor prepares.

`model.audio.tower: hf` is resolved here while the config is validated, so a bad folder or a clash
with model.audio.sample_rate / clip_seconds is reported before anything is built. The encoder's
config.json and preprocessor_config.json are copied into the config (`hf_config`, `hf_features`):
they travel in every checkpoint's model.json, so a checkpoint rebuilds the tower without the
original weights folder (its own weights are in model.safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

KEY = "model.audio"
CONFIG_FILE = "config.json"
FEATURES_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"  # a processor's save_pretrained: the extractor's settings inside
# feature_extractor_type -> the family whose features mmcl computes in torch (mmcl.models.hf_audio)
FAMILIES = {
    "ClapFeatureExtractor": "clap",
    "ASTFeatureExtractor": "ast",
    "WhisperFeatureExtractor": "whisper",
    "Wav2Vec2FeatureExtractor": "wav2vec2",
}
# pooling modes each family's encoder output allows (auto is always allowed)
POOLINGS = {
    "clap": ("pooler", "mean"),
    "ast": ("pooler", "mean", "cls"),
    "whisper": ("mean",),
    "wav2vec2": ("mean",),
}
# the classification labels of a fine-tuned encoder: unused by the tower and long (AST has 527)
DROPPED_CONFIG_KEYS = ("id2label", "label2id")
# kaldi fbank framing that ASTFeatureExtractor uses (torchaudio.compliance.kaldi.fbank defaults)
KALDI_FRAME_MS, KALDI_SHIFT_MS = 25.0, 10.0


def read_hf_json(name: str, filename: str, key: str = f"{KEY}.hf_model") -> dict[str, Any]:
    """`filename` of a saved model folder, or of a hub repository (from the local cache when offline);
    ValueError naming `key` (the setting that gave `name`) when it cannot be read."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / filename
        if not path.is_file():
            raise ValueError(
                f"{key}={name!r}: the folder has no {filename}; save the model and its "
                "feature extractor there with save_pretrained"
            )
    elif name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        raise ValueError(f"{key}={name!r} is not a folder (nor a hub name); fix the path")
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(name, filename))
        except Exception as err:  # offline, unknown repository, no such file, ...
            raise ValueError(
                f"{key}={name!r} is not a folder, and its {filename} could not be read from the "
                f"Hugging Face hub or its cache ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "give a local folder written by save_pretrained"
            ) from None
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{key}={name!r}: {path} is not readable JSON ({err})") from None


def read_features(name: str, key: str = f"{KEY}.hf_model") -> dict[str, Any]:
    """The feature extractor's settings: preprocessor_config.json, or the "feature_extractor" entry of the
    processor_config.json that a processor's save_pretrained writes (transformers 5)."""
    try:
        return read_hf_json(name, FEATURES_FILE, key)
    except ValueError as err:
        try:
            features = read_hf_json(name, PROCESSOR_FILE, key).get("feature_extractor")
        except ValueError:
            raise err from None
        if not isinstance(features, dict):
            raise err from None
        return features


def family_of(features: dict[str, Any]) -> str:
    """The family ("clap", "ast", "whisper", "wav2vec2") of a feature-extractor config."""
    kind = features.get("feature_extractor_type")
    if kind not in FAMILIES:
        raise ValueError(
            f"{KEY}.hf_model: feature extractor {kind!r} is not supported; mmcl computes the features of "
            f"{sorted(FAMILIES)} (CLAP, AST, Whisper, wav2vec2/HuBERT-style encoders)"
        )
    return FAMILIES[kind]


def clip_limits(features: dict[str, Any]) -> tuple[int, int | None]:
    """(sample rate, longest clip in samples, or None for encoders that take any length), with the
    extractor classes' own defaults for keys an older file lacks."""
    family = family_of(features)
    rate = int(features.get("sampling_rate", 48000 if family == "clap" else 16000))
    if family == "clap":
        return rate, int(features.get("nb_max_samples") or features.get("max_length_s", 10) * rate)
    if family == "whisper":
        return rate, int(features.get("n_samples") or features.get("chunk_length", 30) * rate)
    if family == "ast":  # max_length fbank frames of 25 ms every 10 ms (snip_edges: whole frames only)
        frame = int(rate * KALDI_FRAME_MS / 1000)
        shift = int(rate * KALDI_SHIFT_MS / 1000)
        return rate, frame + (int(features.get("max_length", 1024)) - 1) * shift
    return rate, None


def resolve_hf_audio(data: dict[str, Any]) -> dict[str, Any]:
    """Fill in the encoder's config, feature settings, sample rate and clip length of a raw
    `model.audio` section with tower: hf; raise ValueError (naming the key) on a conflict."""
    data = dict(data)
    name = data.get("hf_model")
    if isinstance(name, str) and Path(name).expanduser().is_dir():  # recorded absolute, as hf_text is
        name = data["hf_model"] = str(Path(name).expanduser().resolve())
    for key, filename in (("hf_config", CONFIG_FILE), ("hf_features", FEATURES_FILE)):
        if data.get(key) is None:
            if name is None:
                raise ValueError(
                    f"{KEY}.tower is hf but {KEY}.hf_model is not set; give the encoder's folder "
                    "(save_pretrained) or hub name, e.g. laion/clap-htsat-unfused"
                )
            values = read_features(name) if filename == FEATURES_FILE else read_hf_json(name, filename)
            data[key] = {k: v for k, v in values.items() if k not in DROPPED_CONFIG_KEYS}
        if not isinstance(data[key], dict):
            raise ValueError(f"{KEY}.{key} must be a mapping: the content of the encoder's {filename}")
    features = data["hf_features"]
    family = family_of(features)
    if "model_type" not in data["hf_config"]:
        raise ValueError(f"{KEY}.hf_config has no model_type; it must be the encoder's config.json")
    pooling = data.get("hf_pooling", "auto")
    if pooling != "auto" and pooling not in POOLINGS[family]:
        raise ValueError(
            f"{KEY}.hf_pooling={pooling!r} does not apply to {family} encoders; use auto or one of "
            f"{list(POOLINGS[family])}"
        )
    rate, longest = clip_limits(features)
    given_rate = data.get("sample_rate", rate)
    if given_rate != rate:
        raise ValueError(
            f"{KEY}.sample_rate={given_rate} differs from the {rate} Hz of the encoder's feature "
            f"extractor; remove {KEY}.sample_rate (it follows the encoder)"
        )
    data["sample_rate"] = rate
    if longest is not None:
        seconds = data.get("clip_seconds", longest / rate)
        if isinstance(seconds, (int, float)) and round(seconds * rate) > longest:
            raise ValueError(
                f"{KEY}.clip_seconds={seconds} is longer than the {longest / rate:g} s the encoder's "
                f"feature extractor takes; lower it or remove it (it defaults to that)"
            )
        data["clip_seconds"] = seconds
    return data
