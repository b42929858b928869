"""Build a DualEncoder from a ModelConfig: register configs, create towers, load weights, freeze.

The order in `build_model` matters: weights are loaded before towers are frozen, so a locked tower
(LiT) is the pretrained one.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import open_clip
from open_clip.model import _build_text_tower
from torch import Tensor

from mmcl.errors import UsageError
from mmcl.models.audio_tower import build_audio_tower
from mmcl.models.config import ModelConfig, check_open_clip_config
from mmcl.models.dual_encoder import (
    CLIP_INIT_LOGIT_SCALE,
    SIGLIP_INIT_LOGIT_BIAS,
    SIGLIP_INIT_LOGIT_SCALE,
    AudioTextEncoder,
    DualEncoder,
    ImageTextEncoder,
)
from mmcl.models.hf_text import open_clip_text_cfg
from mmcl.models.weights import load_text_tower, load_weights, read_state_dict

# The micro/tiny open_clip configs shipped with mmcl (the repo is installed editable).
BUNDLED_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")  # open_clip names that bring their own config and weights
_registered_dirs: set[Path] = set()


def register_model_configs(dirs: Iterable[str | Path] = ()) -> None:
    """Make open_clip know mmcl's bundled configs and every JSON config in `dirs` (name = file stem).

    Each file is checked first, since open_clip silently skips configs lacking required keys.
    Registering a folder again is a no-op.
    """
    for raw in [BUNDLED_CONFIG_DIR, *dirs]:
        folder = Path(raw).expanduser().resolve()
        if folder in _registered_dirs:
            continue
        if not folder.is_dir():
            if folder == BUNDLED_CONFIG_DIR:
                continue  # installed without the repo: only built-in and user configs exist
            raise UsageError(f"model.open_clip_config_dirs: {folder} is not a folder; fix the path")
        for file in sorted(folder.glob("*.json")):
            try:
                check_open_clip_config(json.loads(file.read_text()), str(file))
            except (ValueError, json.JSONDecodeError) as e:
                raise UsageError(f"bad open_clip model config: {e}") from e
        open_clip.add_model_config(folder)
        _registered_dirs.add(folder)


def _register_inline_config(config: dict) -> str:
    """Register an inline open_clip config under a name derived from its content and return it."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    name = f"mmcl-inline-{digest}"
    if open_clip.get_model_config(name) is None:
        # open_clip registers files only; it keeps the parsed config after the file is gone.
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / f"{name}.json"
            file.write_text(json.dumps(config))
            open_clip.add_model_config(file)
    return name


def resolve_open_clip_name(cfg: ModelConfig) -> str:
    """The open_clip architecture name for `cfg`, registering configs as needed."""
    register_model_configs(cfg.open_clip_config_dirs)
    if cfg.open_clip_config is not None:
        name = _register_inline_config(cfg.open_clip_config)
    else:
        name = cfg.open_clip_name
        if not name.startswith(SCHEMA_PREFIXES) and open_clip.get_model_config(name) is None:
            mmcl_names = sorted(p.stem for p in BUNDLED_CONFIG_DIR.glob("*.json"))
            raise UsageError(
                f"model.open_clip_name={name!r} is not a known open_clip architecture. Use one of "
                f"mmcl's {mmcl_names}, a built-in (open_clip.list_models()), a JSON config in a folder "
                f"listed in model.open_clip_config_dirs, or an inline model.open_clip_config"
            )
    return name if cfg.hf_text is None else _with_hf_text(cfg, name)


def _with_hf_text(cfg: ModelConfig, name: str) -> str:
    """Register open_clip architecture `name` with its text_cfg replaced by model.hf_text's transformers
    tower (as open_clip's own hf_model_name configs are written) and return the new name."""
    config = open_clip.get_model_config(name)
    if config.get("text_cfg", {}).get("hf_model_name"):
        raise UsageError(
            f"model.hf_text and model.open_clip_name={name!r} (whose text_cfg.hf_model_name is "
            f"{config['text_cfg']['hf_model_name']!r}) both choose a transformers text tower; keep one"
        )
    need_weights = cfg.hf_text_pretrained and cfg.pretrained is None
    text_cfg = open_clip_text_cfg(
        cfg.hf_text, cfg.hf_text_pooler, cfg.hf_text_proj, config.get("text_cfg", {}), need_weights
    )
    return _register_inline_config({**config, "text_cfg": text_cfg})


def get_tokenizer(cfg: ModelConfig) -> Callable[..., Tensor]:
    """open_clip's tokenizer for the model's text tower: list[str] -> LongTensor [N, context_length]."""
    return open_clip.get_tokenizer(resolve_open_clip_name(cfg))


def build_model(cfg: ModelConfig) -> DualEncoder:
    """Create the DualEncoder that `cfg` describes, with weights loaded and towers frozen as asked."""
    if cfg.hf_clap is not None:
        model = _build_clap_model(cfg)
    else:
        name = resolve_open_clip_name(cfg)
        model = _build_image_model(cfg, name) if cfg.modality == "image" else _build_audio_model(cfg, name)
    if cfg.freeze_media:
        model.freeze("media")
    if cfg.freeze_text:
        model.freeze("text")
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _local_file(value: str | None) -> Path | None:
    """`value` as an existing file path, or None (then it may be an open_clip tag)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_file() else None


def _check_tag(key: str, name: str, tag: str) -> None:
    """Raise unless `tag` names open_clip weights for architecture `name`."""
    if name.startswith(SCHEMA_PREFIXES):
        raise UsageError(
            f"{key}={tag!r} is not a file, and {name!r} brings its own weights; "
            f"remove {key} or point it at a weights file"
        )
    if not open_clip.get_pretrained_cfg(name, tag):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UsageError(
            f"{key}={tag!r} is neither a weights file nor an open_clip pretrained tag of "
            f"{name!r} (tags: {tags or 'none'}); fix the path or pick a tag"
        )


def _load(key: str, path: Path, loader: Callable[[dict], None]) -> None:
    """Run `loader` on the state dict in `path`, turning a mismatch into a message naming `key`."""
    try:
        loader(read_state_dict(path))
    except RuntimeError as e:  # load_state_dict's missing/unexpected/size-mismatch report
        raise UsageError(
            f"{key}={str(path)!r} does not fit this model (check model.open_clip_name, "
            f"model.siglip and, for audio, model.audio): {e}"
        ) from e
    except UsageError as e:
        raise UsageError(f"{key}={str(path)!r}: {e}") from e


def _build_image_model(cfg: ModelConfig, name: str) -> ImageTextEncoder:
    """open_clip builds the model (and loads a pretrained tag); local weight files are loaded here so
    mmcl's own checkpoint layout is accepted too."""
    weights = _local_file(cfg.pretrained)
    tag = None if weights or cfg.pretrained is None else cfg.pretrained
    if tag is not None and cfg.hf_text is not None:
        raise UsageError(
            f"model.pretrained={tag!r} is an open_clip tag, whose weights hold open_clip's own text "
            f"tower, not model.hf_text's; start from a weights file of this model, or drop one of them"
        )
    if tag is not None:
        _check_tag("model.pretrained", name, tag)
    init = {"init_logit_scale": SIGLIP_INIT_LOGIT_SCALE, "init_logit_bias": SIGLIP_INIT_LOGIT_BIAS}
    # A transformers text tower starts from its pretrained weights unless a weights file replaces them.
    hf_weights = cfg.hf_text_pretrained and weights is None
    clip = open_clip.create_model(
        name, pretrained=tag, pretrained_text=hf_weights, **(init if cfg.siglip else {})
    )
    embed_dim = open_clip.get_model_config(name)["embed_dim"]
    model = ImageTextEncoder(clip, open_clip.get_tokenizer(name), embed_dim)
    if weights is not None:
        _load("model.pretrained", weights, lambda state: load_weights(model, state))
    return model


def _build_clap_model(cfg: ModelConfig) -> AudioTextEncoder:
    """A whole transformers ClapModel (model.hf_clap), or with model.pretrained an mmcl checkpoint of one."""
    from mmcl.models.hf_clap import build_clap_model  # imports transformers

    model = build_clap_model(cfg)
    if cfg.pretrained is not None:
        weights = _local_file(cfg.pretrained)
        if weights is None:
            raise UsageError(
                f"model.pretrained={cfg.pretrained!r}: a model.hf_clap model starts from an mmcl checkpoint "
                "file of the same CLAP model, which does not exist; fix the path or remove it"
            )
        _load("model.pretrained", weights, lambda state: load_weights(model, state))
    return model


def _build_audio_model(cfg: ModelConfig, name: str) -> AudioTextEncoder:
    """An mmcl audio tower plus the text tower of open_clip architecture `name` (built the way open_clip
    builds it, without the unused image tower)."""
    oc = open_clip.get_model_config(name)
    embed_dim = oc["embed_dim"]
    text_cfg = oc["text_cfg"]
    if cfg.hf_text is not None:  # pretrained encoder weights, unless a whole checkpoint replaces them
        text_cfg = {**text_cfg, "hf_model_pretrained": cfg.hf_text_pretrained and cfg.pretrained is None}
    text = _build_text_tower(embed_dim, text_cfg, quick_gelu=oc.get("quick_gelu", False))
    if cfg.siglip:
        scale, bias = SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS
    else:
        scale, bias = oc.get("init_logit_scale", CLIP_INIT_LOGIT_SCALE), oc.get("init_logit_bias")
    # a transformers audio encoder starts from its pretrained weights unless a whole checkpoint replaces them
    audio = build_audio_tower(cfg.audio, embed_dim, pretrained=cfg.pretrained is None)
    long_clips = {
        "long_clips": cfg.audio.long_clips,
        "max_samples": round(cfg.audio.max_seconds * cfg.audio.sample_rate),
    }
    model = AudioTextEncoder(audio, text, open_clip.get_tokenizer(name), embed_dim, scale, bias, **long_clips)
    if cfg.pretrained is not None:
        weights = _local_file(cfg.pretrained)
        if weights is None:
            raise UsageError(
                f"model.pretrained={cfg.pretrained!r}: audio models start from an mmcl "
                f"checkpoint file, which does not exist; fix the path (to start only the text "
                f"tower from open_clip weights, use model.text_pretrained)"
            )
        _load("model.pretrained", weights, lambda state: load_weights(model, state))
    if cfg.text_pretrained is not None:
        weights = _local_file(cfg.text_pretrained)
        if weights is None:
            _check_tag("model.text_pretrained", name, cfg.text_pretrained)
            pretrained_cfg = open_clip.get_pretrained_cfg(name, cfg.text_pretrained)
            weights = Path(open_clip.download_pretrained(pretrained_cfg))
        _load("model.text_pretrained", weights, lambda state: load_text_tower(model, state))
    return model
