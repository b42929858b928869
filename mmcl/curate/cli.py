"""`mmcl shard score`'s flags: registered beside the torch-free shard subcommands without importing torch (the
work is in mmcl.curate.score, imported when the command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = (
    "example:\n"
    "  mmcl shard score shards/cc --checkpoint runs/early --output scores/cc --p-values --embeddings\n"
    "  mmcl shard score shards/cc --open-clip ViT-B-32 --pretrained laion2b_s34b_b79k --output scores/cc\n"
    "  mmcl shard score shards/clotho --hf-clap laion/clap-htsat-unfused --output scores/clotho --part 0/4\n"
    "  mmcl shard score shards/cc --from-run runs/micro --output scores/cc-run\n"
)


def add_score_parser(shard_commands: argparse._SubParsersAction) -> None:
    """Register `mmcl shard score` beside the torch-free shard subcommands."""
    from mmcl.eval.cli import add_model_flags
    from shards_tools.cli import HelpfulFormatter, add_max_bytes

    p = shard_commands.add_parser(
        "score",
        help="score every pair of a shard set with a model (or a run's weights)",
        formatter_class=HelpfulFormatter,
        description="Score every image-text or audio-text pair of a shard set, writing a sidecar per shard "
        "into --output (shards are not rewritten).\n\n" + EXAMPLE,
    )
    p.add_argument("shards", help="shard folder, .tar or brace pattern")
    p.add_argument("--output", required=True, type=Path, help="the scores folder")
    add_model_flags(p)
    p.add_argument(
        "--from-run", type=Path, help="export a run's pair weights (train.log_sample_keys) instead"
    )
    p.add_argument(
        "--until-step",
        type=int,
        help="with --from-run: the weights as they were at this step (a checkpoint's)",
    )
    g = p.add_argument_group("scores")
    g.add_argument("--p-values", action="store_true", help="also the in-batch p-value local_fdr uses")
    g.add_argument("--embeddings", action="store_true", help="also keep the embeddings (float16 .npy)")
    g.add_argument(
        "--batch-size", type=int, default=64, help="pairs per forward pass (and per p-value batch)"
    )
    g.add_argument(
        "--workers", type=int, default=2, help="DataLoader processes decoding media (0: in-process)"
    )
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--part", help="score part K of N (0-based), e.g. 3/16, for job arrays")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("untrusted data")
    g.add_argument("--allow-pipe", action="store_true", help="accept pipe:COMMAND shard paths (runs a shell)")
    add_max_bytes(g, "skip any tar member larger than this (the sample is not scored)")
    p.set_defaults(run=_run, prog_name="mmcl shard score")


def check_score_flags(args: argparse.Namespace) -> tuple[int, int]:
    """The flags that need no model or torch, checked before either is imported (a mistyped command fails
    in a fraction of a second, not after seconds of imports); returns --part as (K, N)."""
    from mmcl.errors import UsageError
    from shards_tools.cli import parse_part

    models = [args.checkpoint, args.open_clip, args.hf_clap, args.from_run]
    if sum(m is not None for m in models) != 1:
        raise UsageError("give exactly one of --checkpoint, --open-clip, --hf-clap and --from-run")
    if args.pretrained and not args.open_clip:
        raise UsageError("--pretrained goes with --open-clip")
    if args.until_step is not None and (args.from_run is None or args.until_step < 1):
        raise UsageError("--until-step takes a step >= 1, with --from-run")
    part = parse_part(args.part) or (0, 1)
    if not 0 <= part[0] < part[1]:
        raise UsageError(f"--part {args.part}: K must be in 0..N-1")
    return part


def _run(args: argparse.Namespace) -> int:
    part = check_score_flags(args)
    from mmcl.curate.score import run_score

    return run_score(args, part)
