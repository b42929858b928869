"""The training config: YAML -> typed, validated dataclasses (pydantic), with `key=value` overrides.

`load_train_config("configs/x.yaml", ["optim.lr=1e-3"])` returns a TrainConfig or raises UsageError whose
message names the bad key (with the closest valid key when it is a typo) and the fix. Defaults live in the
schema below, not in the code that reads it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmcl.data.config import DataConfig
from mmcl.errors import UsageError
from mmcl.eval.config import EvalConfig
from mmcl.models.config import ModelConfig
from mmcl.noise.config import NoiseConfig

# A YAML alias repeats a node by reference, so a few hundred bytes of nested aliases ("billion laughs") expand
# to millions of values once validated or dumped; real configs hold a few hundred.
MAX_CONFIG_VALUES = 100_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunConfig(_Strict):
    output_dir: Path = Field(Path("runs/default"), description="checkpoints, logs and reports go here")
    seed: int = 0


class LossConfig(_Strict):
    kind: Literal["clip", "siglip"] = "clip"
    gather: bool = Field(True, description="global negatives: gather features from every process")
    local_loss: bool = Field(False, description="local rows vs global columns (less memory, same gradient)")


class OptimConfig(_Strict):
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null turns clipping off")


class TrainLoopConfig(_Strict):
    steps: int = Field(1000, ge=1, description="optimizer steps in total")
    accumulation_steps: int = Field(
        1,
        ge=1,
        description="micro-batches per step; every accumulated sample stays a negative (feature cache)",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    compile: bool = False
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1, description="checkpoints kept on disk")
    resume: str = Field("auto", description="auto (latest in output_dir), never, or a checkpoint folder")
    max_bad_steps: int = Field(100, ge=0, description="stop after this many non-finite losses in a row")
    max_steps_per_run: int | None = Field(
        None, ge=1, description="checkpoint and exit after this many steps (for time-limited job slots)"
    )
    elastic_batch: Literal["per_process", "global"] = Field(
        "per_process",
        description="resumed on another number of processes: keep data.batch_size per process, or keep the "
        "global batch (data.batch_size becomes the saved global batch / processes / accumulation_steps)",
    )
    log_sample_keys: bool = Field(
        False, description="write the keys every step trained on to RUN/sample_keys/rank-R.jsonl"
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: object) -> object:
        return "no" if value is False else value  # YAML reads an unquoted `no` as false


class TrainConfig(_Strict):
    """A whole training recipe; `mmcl train --config FILE key=value ...`."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check_combination(self) -> TrainConfig:
        if self.loss.kind == "siglip" and not self.model.siglip:
            raise ValueError(
                "loss.kind is siglip but model.siglip is false: set model.siglip: true "
                "(it adds the logit bias SigLIP needs)"
            )
        if self.model.modality == "audio":
            for key in ("sample_rate", "clip_seconds", "max_seconds"):
                model_value, data_value = getattr(self.model.audio, key), getattr(self.data, key)
                if key == "max_seconds" and self.model.audio.long_clips == "crop":
                    model_value = None  # recordings are cropped to clip_seconds
                if key in self.data.model_fields_set and data_value != model_value:
                    raise ValueError(
                        f"data.{key}={data_value} differs from model.audio.{key}={model_value}; "
                        f"remove data.{key} (it follows the model)"
                    )
                setattr(self.data, key, model_value)
            if self.data.image_on_device is True:
                raise ValueError(
                    "data.image_on_device: true is for image models; remove it (audio is cropped in workers)"
                )
        self.noise.check_pairs_per_step(self.data.batch_size * self.train.accumulation_steps)
        if self.noise.soft_target_alpha and self.loss.kind == "siglip":
            raise ValueError(
                "noise.soft_target_alpha works with loss.kind: clip only (SigLIP has no softmax targets)"
            )
        if self.eval.every_steps and not (self.eval.zero_shot or self.eval.retrieval):
            raise ValueError(
                "eval.every_steps is set but eval has no zero_shot or retrieval tasks; add one "
                "(e.g. zero_shot: [{name: heldout, data: PATH}]) or set every_steps: 0"
            )
        if self.optim.warmup_steps >= self.train.steps:
            raise ValueError(
                f"optim.warmup_steps={self.optim.warmup_steps} >= train.steps={self.train.steps}: "
                "lower warmup_steps or train longer"
            )
        return self


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_all_keys(annotation, f"{prefix}{name}."))
    return keys


def _format_error(err: ValidationError, source: str) -> str:
    known = _all_keys(TrainConfig)
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, known, n=1)
            hint = (
                f"; did you mean {close[0]}?"
                if close
                else "; remove it (see the config reference in README.md)"
            )
            lines.append(f"{source}: unknown key {key}{hint}")
        elif problem["type"] == "missing":
            lines.append(f"{source}: {key} is required")
        else:
            got = problem.get("input")
            got_text = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"{source}: {key or 'config'}: {message}{got_text}")
    return "\n".join(lines)


def load_yaml(text: str, where: str) -> Any:
    """YAML through PyYAML's safe loader, refused (UsageError) when its aliases expand to more than
    MAX_CONFIG_VALUES values or it nests deeper than the parser's stack: the document is composed, its
    expanded size counted over the node graph (each shared node counted once per use, computed once), and
    only then constructed."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node)
        if size > MAX_CONFIG_VALUES:
            raise UsageError(
                f"{where}: the YAML expands to {size:,} values through its aliases (&anchor / *alias), "
                f"more than the {MAX_CONFIG_VALUES:,} a config may hold; write the values out"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise UsageError(f"{where}: the YAML is nested too deeply to read") from None
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes `root` stands for once every alias is expanded; iterative, each node visited once."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if children_done or not children:
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            continue
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def apply_override(values: dict[str, Any], assignment: str) -> None:
    """Set `a.b.c=VALUE` in a nested dict; VALUE is parsed as YAML (numbers, booleans, lists)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UsageError(f"override {assignment!r} is not key=value (e.g. optim.lr=1e-3)")
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UsageError(f"override {assignment!r}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = load_yaml(raw, f"override {assignment!r}") if raw else ""
    except yaml.YAMLError as err:
        raise UsageError(
            f"override {assignment!r}: the value is not valid YAML ({err.problem}); quote it"
        ) from None


def load_train_config(path: Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read YAML, apply overrides, validate. Relative shard paths stay relative to the working directory."""
    values: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise UsageError(f"config file {path} not found (the shipped recipes are in configs/)")
        try:
            values = load_yaml(path.read_text(), str(path)) or {}
        except yaml.YAMLError as err:
            raise UsageError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise UsageError(f"{path} must hold a mapping of sections (run, model, data, ...)")
    for assignment in overrides:
        apply_override(values, assignment)
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        raise UsageError(_format_error(err, source)) from None
