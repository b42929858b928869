"""`mmcl train --config FILE [key=value ...]` (also under `accelerate launch -m mmcl train ...`)."""

from __future__ import annotations

import argparse
from pathlib import Path

TRAIN_EXAMPLE = """example:
  mmcl train --config configs/image_text/micro.yaml train.steps=200 run.output_dir=runs/micro
  accelerate launch --multi_gpu --num_processes 8 -m mmcl train --config configs/image_text/vit_b32_cc3m.yaml
"""


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from shards_tools.cli import HelpfulFormatter

    p = subparsers.add_parser(
        "train",
        help="train a dual encoder on shards",
        formatter_class=HelpfulFormatter,
        description="Train an image-text or audio-text dual encoder on streaming WebDataset shards.\n"
        "Resumes from the latest checkpoint in run.output_dir unless train.resume=never.\n\n" + TRAIN_EXAMPLE,
    )
    p.add_argument("--config", type=Path, help="YAML recipe (see configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. optim.lr=1e-3"
    )
    p.add_argument("--check", action="store_true", help="validate the config and the shards, then exit")
    p.set_defaults(run=_run_train, prog_name="mmcl train")


def _run_train(args: argparse.Namespace) -> int:
    from mmcl.config import load_train_config

    config = load_train_config(args.config, args.overrides)
    if args.check:  # what a run checks first (mmcl.train.preflight), without building anything
        from mmcl.train.preflight import launch_world_size, preflight

        preflight(config, launch_world_size())
        print(f"config OK: {args.config}")
        return 0
    from mmcl.train.trainer import run_training

    state = run_training(config)
    print(
        f"trained {state.step} steps ({state.samples_seen} samples); checkpoints in "
        f"{config.run.output_dir}/checkpoints"
    )
    return 0
