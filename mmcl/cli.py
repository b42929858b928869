"""The `mmcl` command: one entry point, one subcommand per job (shard, train, eval, export, convert, demo).

Each subcommand module contributes `add_parser(subparsers)` and a `run(args) -> int`; this file only
parses, dispatches and turns UsageError into a one-line message with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mmcl import __version__
from mmcl.errors import EXIT_FAILED, EXIT_USAGE, RunFailed, UsageError
from shards_tools.cli import HelpfulFormatter, add_shard_parser


def build_parser() -> argparse.ArgumentParser:
    from mmcl.convert import add_convert_parser
    from mmcl.curate.cli import add_score_parser
    from mmcl.eval.cli import add_eval_parser
    from mmcl.export import add_export_parser
    from mmcl.train.cli import add_train_parser
    from pipelines.demo import add_demo_parser

    parser = argparse.ArgumentParser(
        prog="mmcl",
        formatter_class=HelpfulFormatter,
        description=(
            "Multimodal contrastive pretraining on streaming WebDataset shards.\n\n"
            "example:\n"
            "  mmcl shard image-text --input captions.csv --output shards/ --image-size 256\n"
            "  mmcl train --config configs/image_text/micro.yaml\n"
            "  mmcl eval zero-shot --checkpoint runs/micro --data heldout/ --output reports/heldout\n"
            "  mmcl export --format hf runs/micro exported/micro\n"
            "  mmcl convert laion-clap 630k-audioset-best.pt clap-630k --like laion/clap-htsat-unfused\n"
            "  mmcl demo\n"
        ),
    )
    parser.add_argument("--version", action="version", version=f"mmcl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_shard_parser(subparsers, add_score_parser)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    add_export_parser(subparsers)
    add_convert_parser(subparsers)
    add_demo_parser(subparsers)
    return parser


def _message_lines(err: Exception) -> list[str]:
    """The lines of an error's message. An error raised in a DataLoader worker arrives re-raised with the
    worker's traceback as its text ("Caught ... Original Traceback ..."): only its own message is kept."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = (
            last.split(": ", 1)[1]
            if last.startswith(f"{type(err).__module__}.{type(err).__name__}: ")
            else last
        )
    return text.splitlines() or [""]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (UsageError, RunFailed) as err:
        prog = getattr(args, "prog_name", "mmcl")
        for line in _message_lines(err):
            print(f"{prog}: error: {line}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, UsageError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
