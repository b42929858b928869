"""Training data: streaming WebDataset shards -> mixed, shuffled, decoded batches with exact resume.

Names are imported lazily, so `from mmcl.data.config import DataConfig` (config parsing) does not
pay for importing torch. See `mmcl.data.pipeline` for the stages and the resume state.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DataConfig": "config",
    "SourceConfig": "config",
    "Source": "sources",
    "resolve_sources": "sources",
    "BadSample": "common",
    "DataProgress": "progress",
    "StreamState": "progress",
    "TrainStream": "pipeline",
    "build_loader": "pipeline",
    "build_train_stream": "pipeline",
    "collate": "pipeline",
    "decode_image": "image",
    "load_clip": "audio",
    "choose_caption": "text",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmcl.data' has no attribute {name!r}")
    return getattr(import_module(f"mmcl.data.{_EXPORTS[name]}"), name)
