"""Models: the DualEncoder interface, its open_clip image-text and mmcl audio-text implementations,
the config schema, and the factory that builds them.

Names are imported lazily, so `from mmcl.models.config import ModelConfig` (config parsing) does not
pay for importing torch and open_clip.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "AudioTowerConfig": "config",
    "ModelConfig": "config",
    "SpecAugmentConfig": "config",
    "AudioTower": "audio_tower",
    "AudioTextEncoder": "dual_encoder",
    "DualEncoder": "dual_encoder",
    "ImageTextEncoder": "dual_encoder",
    "build_model": "factory",
    "get_tokenizer": "factory",
    "register_model_configs": "factory",
    "read_state_dict": "weights",
    "save_open_clip_weights": "weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmcl.models' has no attribute {name!r}")
    return getattr(import_module(f"mmcl.models.{_EXPORTS[name]}"), name)
