"""`mmcl convert`: bring a model from another project's own format into one mmcl (and its peers) load.

    mmcl convert laion-clap CHECKPOINT.pt OUT --like laion/clap-htsat-unfused

laion-clap: a LAION-CLAP checkpoint (the laion_clap package's .pt) becomes a transformers ClapModel folder,
for `model.hf_clap: OUT`, `mmcl eval --hf-clap OUT` and `ClapModel.from_pretrained(OUT)`
(mmcl.models.laion_clap).
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONVERT_EXAMPLE = """example:
  mmcl convert laion-clap 630k-audioset-best.pt clap-630k-audioset --like laion/clap-htsat-unfused
  mmcl convert laion-clap 630k-audioset-fusion-best.pt clap-630k-fusion --like laion/clap-htsat-fused
  mmcl convert laion-clap music_audioset_epoch_15_esc_90.14.pt clap-music --like laion/larger_clap_music
  mmcl eval zero-shot --hf-clap clap-630k-audioset --protocol laion-clap --data ESC-50-master --output r
"""


def add_convert_parser(subparsers: argparse._SubParsersAction) -> None:
    from shards_tools.cli import HelpfulFormatter

    p = subparsers.add_parser(
        "convert",
        help="turn another project's checkpoint into a transformers model mmcl loads",
        formatter_class=HelpfulFormatter,
        description="Convert a LAION-CLAP checkpoint (.pt) into a transformers ClapModel folder (weights,\n"
        "config, processor) with the architecture, tokenizer and feature extractor of --like.\n\n"
        + CONVERT_EXAMPLE,
    )
    p.add_argument("source", choices=["laion-clap"], help="the checkpoint's format")
    p.add_argument("checkpoint", type=Path, help="the checkpoint file")
    p.add_argument("output", type=Path, help="the new folder to write")
    p.add_argument(
        "--like",
        required=True,
        metavar="NAME_OR_DIR",
        help="a transformers CLAP of the same architecture (hub name or folder): its config and processor",
    )
    p.set_defaults(run=_run_convert, prog_name="mmcl convert")


def _run_convert(args: argparse.Namespace) -> int:
    from mmcl.models.laion_clap import convert_laion_checkpoint

    output = convert_laion_checkpoint(args.checkpoint, args.output, args.like)
    print(f"converted {args.checkpoint} to {output} (ClapModel.from_pretrained, model.hf_clap, --hf-clap)")
    return 0
