"""All-gather helpers for global negatives: gradients flow back to the rank that owns each slice."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn
from torch import Tensor


def rank_and_world_size() -> tuple[int, int]:
    """Return ``(rank, world_size)`` of the default process group, or ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, differentiably.

    Rank ``r``'s slice of the result is rows ``[r * B, (r + 1) * B)``. In backward, the gradient that
    every rank computes for a slice is summed and delivered to the rank that owns it (reduce-scatter on
    NCCL, all-to-all + sum on gloo), so ``x`` receives ``d(sum_r loss_r) / dx``. Every rank must pass the
    same shape. Identity when not distributed or with a world size of 1.
    """
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return x
    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0 without autograd (for weights and targets).

    Every rank must pass the same shape. Returns ``x`` detached when not distributed.
    """
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)
