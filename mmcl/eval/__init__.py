"""Zero-shot evaluation: classification and retrieval of image-text and audio-text models.

Names are imported lazily, so `from mmcl.eval.config import EvalConfig` (config parsing) does not pay
for importing torch, open_clip and matplotlib.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "EvalConfig": "config",
    "EvalData": "datasets",
    "MediaDecoder": "datasets",
    "open_classification": "datasets",
    "open_retrieval": "datasets",
    "load_eval_model": "loading",
    "evaluate_during_training": "periodic",
    "write_report": "report",
    "evaluate_retrieval": "retrieval",
    "retrieval_metrics": "retrieval",
    "load_templates": "templates",
    "build_classifier": "zero_shot",
    "classification_metrics": "zero_shot",
    "debias_logits": "zero_shot",
    "evaluate_zero_shot": "zero_shot",
    "extract_features": "zero_shot",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmcl.eval' has no attribute {name!r}")
    return getattr(import_module(f"mmcl.eval.{_EXPORTS[name]}"), name)
