"""Evaluation inside a training run: every `eval.every_steps` steps the trainer calls
`evaluate_during_training(model, cfg)` and logs the returned scalars.

It runs in the calling process (no DataLoader workers: the trainer already has its own), on the model's
device, in eval mode, and puts the model back in the mode it found it in. In a multi-process run call
it on the main process only, with the unwrapped model. Templates default to the short set for images,
since the classifier is rebuilt at every call (the text tower keeps changing). Evaluation data is read
with the training data's ReadOptions: pipe: paths run only with data.allow_pipe, under the same caps.
"""

from __future__ import annotations

from pathlib import Path

from mmcl.eval.config import EvalConfig, RetrievalTask, ZeroShotTask
from mmcl.eval.datasets import EvalData, open_classification, open_retrieval
from mmcl.eval.report import scalar_metrics
from mmcl.eval.retrieval import evaluate_retrieval
from mmcl.eval.templates import load_templates
from mmcl.eval.zero_shot import evaluate_zero_shot
from mmcl.models import DualEncoder
from shards_tools.tar_stream import DEFAULT_READ_OPTIONS, ReadOptions

__all__ = ["EvalConfig", "RetrievalTask", "ZeroShotTask", "check_eval_data", "evaluate_during_training"]
PERIODIC_TEMPLATES = {"image": "short", "audio": "audio"}
PIPE_HINT = "set data.allow_pipe: true"


def _open_zero_shot(index: int, task: ZeroShotTask, modality: str, read_options: ReadOptions) -> EvalData:
    classes = Path(task.classes) if task.classes is not None else None
    return open_classification(
        task.data, modality, format=task.format, classes_file=classes, folds=task.folds, name=task.name,
        read_options=read_options, where=f"eval.zero_shot[{index}].data", allow_hint=PIPE_HINT,
    )  # fmt: skip


def _open_retrieval(index: int, task: RetrievalTask, modality: str, read_options: ReadOptions) -> EvalData:
    return open_retrieval(
        task.data, modality, name=task.name, read_options=read_options, where=f"eval.retrieval[{index}].data",
        allow_hint=PIPE_HINT,
    )  # fmt: skip


def check_eval_data(cfg: EvalConfig, modality: str, read_options: ReadOptions = DEFAULT_READ_OPTIONS) -> None:
    """Open every task's data and templates (listings only, nothing decoded): call it before training
    so that a wrong path, or a pipe: path the config does not allow, fails at once with a UsageError, not
    after the first `every_steps` steps."""
    for index, task in enumerate(cfg.zero_shot):
        _open_zero_shot(index, task, modality, read_options)
        load_templates(task.templates or PERIODIC_TEMPLATES[modality], modality)
    for index, task in enumerate(cfg.retrieval):
        _open_retrieval(index, task, modality, read_options)


def evaluate_during_training(
    model: DualEncoder, cfg: EvalConfig, read_options: ReadOptions = DEFAULT_READ_OPTIONS
) -> dict[str, float]:
    """Every task's scalar metrics as {"TASK/METRIC": value}, e.g. {"cifar10/acc1": 0.41,
    "coco/image_retrieval_recall@5": 0.12}."""
    was_training = model.training
    results: dict[str, float] = {}
    try:
        for index, task in enumerate(cfg.zero_shot):
            data = _open_zero_shot(index, task, model.modality, read_options)
            templates = load_templates(task.templates or PERIODIC_TEMPLATES[model.modality], model.modality)
            metrics = evaluate_zero_shot(
                model, data, templates, batch_size=cfg.batch_size, max_samples=cfg.max_samples
            )
            results.update({f"{task.name}/{k}": v for k, v in scalar_metrics(metrics).items()})
        for index, task in enumerate(cfg.retrieval):
            data = _open_retrieval(index, task, model.modality, read_options)
            metrics = evaluate_retrieval(model, data, batch_size=cfg.batch_size, max_samples=cfg.max_samples)
            results.update({f"{task.name}/{k}": v for k, v in scalar_metrics(metrics).items()})
    finally:
        model.train(was_training)
    return results
