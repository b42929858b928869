"""`mmcl shard ...`: image-text, audio-text, merge, verify, stats. Parses flags into a ShardConfig and calls
the library; no logic lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from shards_tools.config import build_config
from shards_tools.errors import UsageError

IMAGE_EXAMPLE = (
    "example:\n"
    "  mmcl shard image-text --input captions.csv --output shards/cc --image-size 256 --shard-size 10000\n"
    "  mmcl shard image-text --input train2017_captions.json --format coco --media-root train2017"
    " --output shards/coco\n"
    '  mmcl shard image-text --input imagenet/train --output shards/inet --template "a photo of a {label}."\n'
)
AUDIO_EXAMPLE = """example:
  mmcl shard audio-text --input clotho_captions_development.csv --output shards/clotho --sample-rate 48000
  mmcl shard audio-text --input ESC-50-master --output shards/esc50 --folds 5 --sample-rate 16000
"""

# pydantic field path -> the flag a user typed, so messages name the flag.
FLAG_NAMES = {
    "input.path": "--input",
    "input.format": "--format",
    "output": "--output",
    "prefix": "--prefix",
    "shard_size": "--shard-size",
    "max_shard_bytes": "--max-shard-bytes",
    "workers": "--workers",
    "distributor": "--distributor",
    "part": "--part",
    "noise_rate": "--noise-rate",
    "max_error_rate": "--max-error-rate",
    "image.image_size": "--image-size",
    "image.resize_mode": "--resize-mode",
    "image.min_size": "--min-size",
    "image.quality": "--quality",
    "audio.sample_rate": "--sample-rate",
    "audio.max_seconds": "--max-seconds",
    "fetch.timeout": "--timeout",
    "fetch.retries": "--retries",
    "fetch.threads": "--fetch-threads",
    "fetch.deadline": "--url-deadline",
    "fetch.max_bytes": "--max-bytes",
}


class HelpfulFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples in descriptions as written and shows defaults (every `mmcl` subcommand's help)."""


def add_shard_parser(
    subparsers: argparse._SubParsersAction,
    more: Callable[[argparse._SubParsersAction], None] | None = None,
) -> None:
    """`mmcl shard ...`; `more(subcommands)` adds the subcommands that need torch (`score`, from mmcl)."""
    shard = subparsers.add_parser(
        "shard",
        help="convert datasets to WebDataset shards",
        formatter_class=HelpfulFormatter,
        description="Convert image-text and audio-text datasets into WebDataset tar shards.\n\n"
        + IMAGE_EXAMPLE
        + "  mmcl shard verify shards/cc\n",
    )
    sub = shard.add_subparsers(dest="shard_command", metavar="SUBCOMMAND", required=True)
    if more is not None:
        more(sub)
    for modality, example in (("image", IMAGE_EXAMPLE), ("audio", AUDIO_EXAMPLE)):
        p = sub.add_parser(
            f"{modality}-text",
            help=f"shard {modality}-text pairs",
            formatter_class=HelpfulFormatter,
            description=f"Shard {modality}-text pairs from a manifest, folder or public layout.\n\n{example}",
        )
        _add_common(p)
        _add_image(p) if modality == "image" else _add_audio(p)
        p.set_defaults(run=_run_shard, modality=modality, prog_name=f"mmcl shard {modality}-text")

    _add_subset_parsers(sub)  # filter, dedup
    merge = sub.add_parser(
        "merge",
        help="join the manifests of --part K/N runs",
        formatter_class=HelpfulFormatter,
        description="Join the records of all --part K/N runs in OUT into manifest.json and sizes.json.\n\n"
        "example:\n  mmcl shard merge shards/cc\n",
    )
    merge.add_argument("output", type=Path, help="the --output folder the parts wrote to")
    merge.set_defaults(run=_run_merge, prog_name="mmcl shard merge")

    verify = sub.add_parser(
        "verify",
        help="re-read every shard and check it",
        formatter_class=HelpfulFormatter,
        description="Re-read every shard: counts, sha256, keys and that every sample decodes.\n"
        "Exits 1 and lists the problems if anything is wrong.\n\nexample:\n  mmcl shard verify shards/cc\n",
    )
    verify.add_argument("output", type=Path)
    verify.add_argument("--no-decode", action="store_true", help="check counts and hashes only")
    add_max_bytes(verify, "report any tar member larger than this instead of reading it")
    verify.set_defaults(run=_run_verify, prog_name="mmcl shard verify")

    stats = sub.add_parser(
        "stats",
        help="counts, sizes and distributions of a shard set",
        formatter_class=HelpfulFormatter,
        description="Counts, sizes, caption lengths, image sizes or durations, errors by reason.\n"
        "With --scores (the folder `mmcl shard score` wrote for these shards): pairs scored, the --field's\n"
        "quantiles and histogram and, where the shards were made with --noise-rate, the AUROC of a low\n"
        "score (a high p_value) for the noisy pairs and the precision and recall at --threshold.\n\n"
        "example:\n  mmcl shard stats shards/cc --plot cc_stats.png\n"
        "  mmcl shard stats shards/cc --scores scores/cc --threshold 0.2 --plot cc_stats.png\n"
        "    (draws the scores to cc_stats.scores.png)\n",
    )
    stats.add_argument("output", type=Path)
    stats.add_argument(
        "--plot",
        type=Path,
        help="write histograms to this PNG (with --scores, the scores to NAME.scores.png)",
    )
    stats.add_argument("--json", action="store_true", help="print the statistics as JSON")
    add_max_bytes(stats, "count any tar member larger than this as unreadable instead of reading it")
    from shards_tools.scores import FIELDS

    g = stats.add_argument_group("scores")
    g.add_argument("--scores", type=Path, help="also report this scores folder's sidecars of the shards")
    # SUPPRESS: absent unless given, so that stats can refuse them without --scores
    g.add_argument(
        "--field",
        choices=FIELDS,
        default=argparse.SUPPRESS,
        help="with --scores: the number to report (default: score)",
    )
    g.add_argument(
        "--threshold",
        type=float,
        default=argparse.SUPPRESS,
        help="with --scores: report the filter that flags the pairs below this as noisy (p_value: above)",
    )
    stats.set_defaults(run=_run_stats, prog_name="mmcl shard stats")


def add_max_bytes(group: argparse._ActionsContainer, help_text: str) -> None:
    """The --max-bytes flag (one cap on what a single file, URL body or tar member may make mmcl read)."""
    from shards_tools.config import DEFAULT_MAX_BYTES

    group.add_argument(
        "--max-bytes", type=_positive_int("--max-bytes"), default=DEFAULT_MAX_BYTES, help=help_text
    )


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a whole number of bytes, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1, got {value}")
        return value

    return parse


def _add_common(p: argparse.ArgumentParser) -> None:
    from shards_tools.config import InputSpec

    formats = InputSpec.model_fields["format"].annotation.__args__
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, type=Path, help="manifest file, media folder or dataset root")
    g.add_argument(
        "--format", default="auto", choices=formats, help="input layout (auto-detected by default)"
    )
    g.add_argument(
        "--media-root", type=Path, help="media folder for layouts that keep it apart (COCO, Clotho, ...)"
    )
    g.add_argument("--url-column", help="manifest column with the path or URL")
    g.add_argument("--caption-column", action="append", help="manifest caption column (repeat for several)")
    g.add_argument("--label-column", help="manifest column with a class label")
    g.add_argument("--template", action="append", help="caption template for labelled inputs, with {label}")
    g.add_argument("--folds", type=int, nargs="+", help="ESC-50/UrbanSound8K folds to keep")
    g.add_argument(
        "--allow-outside-root", action="store_true", help="accept manifest paths outside its folder"
    )
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, type=Path, help="folder for the shards and manifest.json")
    g.add_argument("--prefix", default="shard", help="shard file name prefix: PREFIX-000000.tar")
    g.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    g.add_argument(
        "--max-shard-bytes", type=int, help="also close a shard when its inputs reach this many bytes"
    )
    g.add_argument("--seed", type=int, default=0, help="seed for --shuffle and --noise-rate")
    g.add_argument("--shuffle", action="store_true", help="shuffle items before sharding")
    g.add_argument(
        "--noise-rate",
        type=float,
        default=0.0,
        help="benchmark noise: this fraction of pairs get another label's (or other text's) caption",
    )
    g.add_argument(
        "--max-error-rate", type=float, default=1.0, help="abort when more items than this are skipped"
    )
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    g.add_argument("--distributor", default="multiprocessing", choices=["multiprocessing", "ray"])
    g.add_argument(
        "--part", help="do part K of N (0-based), e.g. 3/16, for job arrays; then `mmcl shard merge`"
    )
    g.add_argument("--timeout", type=float, default=10.0, help="seconds per URL fetch")
    g.add_argument("--retries", type=int, default=2, help="retries per URL")
    g.add_argument(
        "--fetch-threads", type=int, default=16, help="concurrent URL downloads per worker process"
    )
    g.add_argument(
        "--url-deadline",
        type=float,
        default=60.0,
        help="seconds per URL in all, retries included (a server that trickles bytes cannot hang a worker)",
    )
    add_max_bytes(g, "skip any input file, URL body or tar member larger than this (reason too_large)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_image(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images")
    g.add_argument("--image-size", type=int, help="resize to this size (see --resize-mode)")
    g.add_argument(
        "--resize-mode",
        default="keep-ratio-largest",
        choices=["none", "keep-ratio-largest", "center-crop", "shortest-side"],
    )
    g.add_argument("--min-size", type=int, default=0, help="skip images whose shorter side is smaller")
    g.add_argument("--image-format", default="jpg", choices=["jpg", "png", "webp"])
    g.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")


def _add_audio(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("audio")
    g.add_argument("--sample-rate", type=int, help="resample to this rate (Hz)")
    g.add_argument("--max-seconds", type=float, help="keep at most this many seconds from the start")
    g.add_argument("--keep-channels", action="store_true", help="do not mix down to mono")
    g.add_argument("--audio-format", default="flac", choices=["flac", "wav"])


def parse_part(text: str | None) -> tuple[int, int] | None:
    """--part K/N as (K, N); None without it. The range is checked by whoever uses it."""
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--part: expected K/N such as 0/4, got {text!r}") from None
    return k, n


def config_from_args(args: argparse.Namespace):
    """Map parsed flags onto the typed ShardConfig (validation errors name the flag)."""
    fields = {
        "input": {
            "modality": args.modality,
            "path": args.input,
            "format": args.format,
            "media_root": args.media_root,
            "url_column": args.url_column,
            "caption_columns": args.caption_column,
            "label_column": args.label_column,
            "templates": args.template,
            "folds": args.folds,
            "allow_outside_root": args.allow_outside_root,
        },
        "output": args.output,
        "prefix": args.prefix,
        "shard_size": args.shard_size,
        "max_shard_bytes": args.max_shard_bytes,
        "distributor": args.distributor,
        "part": parse_part(args.part),
        "seed": args.seed,
        "shuffle": args.shuffle,
        "noise_rate": args.noise_rate,
        "max_error_rate": args.max_error_rate,
        "fetch": {
            "timeout": args.timeout,
            "retries": args.retries,
            "threads": args.fetch_threads,
            "deadline": args.url_deadline,
            "max_bytes": args.max_bytes,
        },
    }
    if args.workers is not None:
        fields["workers"] = args.workers
    if args.modality == "image":
        fields["image"] = {
            "image_size": args.image_size,
            "resize_mode": args.resize_mode,
            "min_size": args.min_size,
            "image_format": args.image_format,
            "quality": args.quality,
        }
    else:
        fields["audio"] = {
            "sample_rate": args.sample_rate,
            "max_seconds": args.max_seconds,
            "mono": not args.keep_channels,
            "audio_format": args.audio_format,
        }
    return build_config(fields, FLAG_NAMES)


def _run_shard(args: argparse.Namespace) -> int:
    from shards_tools.run import ShardingAborted, run_sharding

    config = config_from_args(args)
    try:
        result = run_sharding(config, progress=not args.quiet)
    except ShardingAborted as err:
        print(f"{args.prog_name}: aborted: {err}", file=sys.stderr)
        return 1
    if "totals" in result:
        totals = result["totals"]
        reasons = ", ".join(f"{k}: {v}" for k, v in result["errors_by_reason"].items()) or "none"
        print(
            f"wrote {totals['samples']} samples in {totals['shards']} shards to {config.output} "
            f"({totals['skipped']} skipped: {reasons})\nmanifest: {config.output / 'manifest.json'}"
        )
        if totals["skipped"]:
            print(f"skipped items and reasons: {config.output / '_errors.jsonl'}")
    else:
        print(
            f"part {result['part']}/{result['parts']}: {result['samples']} samples in {result['shards']} "
            f"shards; when every part is done: mmcl shard merge {config.output}"
        )
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from shards_tools.manifest import merge_parts

    manifest = merge_parts(args.output)
    totals = manifest["totals"]
    print(f"merged {totals['shards']} shards, {totals['samples']} samples: {args.output / 'manifest.json'}")
    return 0


SUBSET_EPILOG = (
    "--output OUT gets the kept pairs under the input's shard names, manifest.json, sizes.json and\n"
    "removed.jsonl (one row per removed pair: key, shard, reason, value); SHARDS is never modified.\n"
    "Check OUT with `mmcl shard verify OUT` and train on it like any shard set.\n"
)


def _add_subset_parsers(sub: argparse._SubParsersAction) -> None:
    """`mmcl shard filter` and `mmcl shard dedup`: new shard sets made of a scored set's chosen pairs."""
    from shards_tools.dedup import DEFAULT_MARGIN, EMBEDDINGS
    from shards_tools.scores import FIELDS

    filt = sub.add_parser(
        "filter",
        help="keep the pairs that score well (a new shard set)",
        formatter_class=HelpfulFormatter,
        description="Keep the pairs of SHARDS whose score (from `mmcl shard score`) is at least\n"
        "--min-score, or the best --keep-fraction of them (of each class with --per-class); for\n"
        "--field p_value, lower is better. Pairs without a score are removed (no_score).\n"
        + SUBSET_EPILOG
        + "\nexample:\n"
        "  mmcl shard filter shards/cc --scores scores/cc --min-score 0.25 --output shards/cc-clean\n"
        "  mmcl shard filter shards/cc --scores scores/cc --keep-fraction 0.7 --output shards/cc-70\n"
        "  mmcl shard filter shards/inet --scores scores/inet --keep-fraction 0.8 --per-class"
        " --output shards/inet-80\n",
    )
    dedup = sub.add_parser(
        "dedup",
        help="remove near-duplicate pairs (a new shard set)",
        formatter_class=HelpfulFormatter,
        description="Remove the near-duplicates among SHARDS' pairs, SemDeDup-style, from the embeddings of\n"
        "`mmcl shard score --embeddings`: k-means, then within each cluster a pair whose cosine similarity\n"
        "to an earlier kept pair is at least --threshold is removed (duplicate, of: the kept key).\n"
        "Pairs without an embedding are removed (no_score).\n" + SUBSET_EPILOG + "\nexample:\n"
        "  mmcl shard dedup shards/cc --scores scores/cc --threshold 0.95 --output shards/cc-dedup\n"
        "  mmcl shard dedup shards/cc --scores scores/cc --threshold 0.9 --output shards/cc-dd --dry-run\n",
    )
    for p in (filt, dedup):
        p.add_argument("shards", type=Path, help="the shard set (a folder written by `mmcl shard`)")
        p.add_argument("--scores", type=Path, required=True, help="the folder `mmcl shard score` wrote")
        p.add_argument("--output", type=Path, required=True, help="folder for the new shard set")
    filt.add_argument("--min-score", type=float, help="keep the pairs whose --field is at least this")
    filt.add_argument("--keep-fraction", type=float, help="keep the best ceil(F n) pairs, 0 < F <= 1")
    filt.add_argument("--per-class", action="store_true", help="with --keep-fraction: per class")
    filt.add_argument("--field", choices=FIELDS, default="score", help="the number to filter on")
    dedup.add_argument("--threshold", type=float, required=True, help="cosine similarity of a duplicate")
    dedup.add_argument("--clusters", type=int, help="k-means clusters; unset: round(sqrt(pairs))")
    dedup.add_argument("--seed", type=int, default=0, help="seed of the k-means sample and start")
    dedup.add_argument("--embedding", choices=EMBEDDINGS, default="media", help="which embedding to compare")
    dedup.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help="also compare a pair within its second-nearest cluster when that is this close (0: SemDeDup)",
    )
    dedup.add_argument("--dry-run", action="store_true", help="only write OUT/removed.jsonl and print counts")
    for p, name in ((filt, "filter"), (dedup, "dedup")):
        add_max_bytes(p, "remove any pair with a tar member larger than this (reason too_large)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(run=_run_filter if name == "filter" else _run_dedup, prog_name=f"mmcl shard {name}")


def _report_subset(filtered: dict, output: Path, dry_run: bool = False) -> None:
    reasons = ", ".join(f"{k}: {v}" for k, v in filtered.get("removed_by_reason", {}).items()) or "none"
    total = filtered["kept"] + filtered["removed"]
    verb = "would keep" if dry_run else "kept"
    print(f"{verb} {filtered['kept']} of {total} pairs, removed {filtered['removed']} ({reasons})")
    if not dry_run:
        print(f"manifest: {output / 'manifest.json'}")
    print(f"removed pairs: {output / 'removed.jsonl'}")


def _run_filter(args: argparse.Namespace) -> int:
    from shards_tools.filter import Rule, filter_shards
    from shards_tools.tar_stream import ReadOptions

    rule = Rule(args.field, args.min_score, args.keep_fraction, args.per_class)
    rule.check()
    manifest = filter_shards(
        args.shards, args.scores, args.output, rule,
        options=ReadOptions(max_member_bytes=args.max_bytes), progress=not args.quiet,
    )  # fmt: skip
    _report_subset(manifest["filtered"], args.output)
    return 0


def _run_dedup(args: argparse.Namespace) -> int:
    from shards_tools.dedup import dedup_shards
    from shards_tools.tar_stream import ReadOptions

    result = dedup_shards(
        args.shards, args.scores, args.output, args.threshold, clusters=args.clusters, seed=args.seed,
        embedding=args.embedding, margin=args.margin, options=ReadOptions(max_member_bytes=args.max_bytes),
        progress=not args.quiet, dry_run=args.dry_run,
    )  # fmt: skip
    stats = result["dedup"]
    print(
        f"{stats.get('rows', 0)} pairs compared in {stats.get('clusters', 0)} clusters "
        f"(largest {stats.get('largest_cluster', 0)}, {stats.get('boundary_rows', 0)} also in a second one)"
    )
    _report_subset(result, args.output, dry_run=args.dry_run)
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from shards_tools.verify import verify_shards

    report = verify_shards(args.output, decode=not args.no_decode, max_member_bytes=args.max_bytes)
    print(report.summary())
    return 0 if report.ok else 1


def _run_stats(args: argparse.Namespace) -> int:
    import json

    from shards_tools import stats as shard_stats

    if args.scores is None:
        given = [flag for flag in ("--field", "--threshold") if hasattr(args, flag[2:])]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(
                f"{' and '.join(given)} only {verb} with --scores SCORES (a `mmcl shard score` folder)"
            )
    stats = shard_stats.collect_stats(args.output, max_member_bytes=args.max_bytes)
    public = {k: v for k, v in stats.items() if not k.startswith("_")}
    scores = None
    if args.scores is not None:
        scores = shard_stats.collect_score_stats(
            args.output, args.scores, getattr(args, "field", "score"), getattr(args, "threshold", None)
        )
        public["scores"] = {k: v for k, v in scores.items() if not k.startswith("_")}
    if args.json:
        print(json.dumps(public, indent=1))
    else:
        print(shard_stats.format_stats(stats))
        if scores is not None:
            print(shard_stats.format_score_stats(scores))
    where = sys.stderr if args.json else sys.stdout  # with --json, stdout is the JSON alone
    if args.plot:
        shard_stats.plot_stats(stats, args.plot)
        print(f"plot: {args.plot}", file=where)
        if scores is not None:
            shard_stats.plot_score_stats(scores, shard_stats.scores_plot_path(args.plot))
            print(f"scores plot: {shard_stats.scores_plot_path(args.plot)}", file=where)
    return 0
