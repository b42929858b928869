"""AdamW parameter groups and the learning-rate schedule as a pure function of the step.

`lr_at(step)` needs no scheduler state, so a resumed run gets the same learning rate as an uninterrupted
one by construction (nanoGPT's lesson).
"""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("logit_scale", "logit_bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices: no weight decay on norms, biases, embeddings of ndim < 2, or the temperature."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(
    step: int, *, base_lr: float, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float
) -> float:
    """Linear warmup to base_lr, then cosine decay to min_lr_ratio * base_lr at total_steps (or constant)."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
