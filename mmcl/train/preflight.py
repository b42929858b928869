"""What a training run is refused for before anything is built, checked once: the sources (missing shards,
too few shards for the readers), train.resume, and the periodic evaluation's data.

`mmcl train --check` runs `preflight` and stops; a run runs it first thing in `Trainer.setup` and hands the
resolved sources to the data stream, which then does not resolve or check them again.

The world size (processes x data.workers readers share the shards): in a run, the Accelerator's
num_processes, which also splits the stream. `--check` builds no Accelerator and takes WORLD_SIZE, which
`accelerate launch` and torchrun set for every process and the Accelerator reads its num_processes from.
"""

from __future__ import annotations

import os

from mmcl.config import TrainConfig
from mmcl.data.pipeline import check_shard_counts, read_options
from mmcl.data.sources import Source, resolve_sources
from mmcl.train.checkpoint import check_resume_path


def launch_world_size() -> int:
    """The number of processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def preflight(config: TrainConfig, world_size: int) -> list[Source]:
    """Raise UsageError naming the first problem; return the resolved training sources."""
    sources = resolve_sources(config.data, config.model.modality)
    check_shard_counts(sources, world_size * max(config.data.workers, 1), config.data.resampled)
    if config.train.resume not in ("auto", "never"):
        check_resume_path(config.train.resume)
    if config.eval.every_steps:
        from mmcl.eval.periodic import check_eval_data

        check_eval_data(config.eval, config.model.modality, read_options(config.data))
    return sources
