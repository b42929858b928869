"""`mmcl eval zero-shot ...` and `mmcl eval retrieval ...`: parse flags, check data and model choice
(cheap), then build the model, evaluate and write the report. No evaluation logic lives here."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from mmcl.errors import UsageError
from mmcl.eval.config import check_model_choice

if TYPE_CHECKING:
    from mmcl.eval.loading import ModelSource

ZERO_SHOT_EXAMPLE = (
    "example:\n"
    "  mmcl eval zero-shot --checkpoint runs/micro/checkpoints/step-00001000 --data data/digits_test"
    " --output reports/digits\n"
    "  mmcl eval zero-shot --open-clip ViT-B-32 --pretrained laion2b_s34b_b79k --data data/cifar"
    " --output reports/cifar10\n"
    "  mmcl eval zero-shot --checkpoint runs/clap --data ESC-50-master --folds 5 --debias"
    " --output reports/esc50\n"
    "  mmcl eval zero-shot --checkpoint runs/micro --data shards/val --classes names.txt --templates short"
    " --output reports/val\n"
    "  mmcl eval zero-shot --hf-clap laion/clap-htsat-unfused --protocol laion-clap --data ESC-50-master"
    " --output reports/esc50-laion\n"
)
RETRIEVAL_EXAMPLE = (
    "example:\n"
    "  mmcl eval retrieval --checkpoint runs/micro/checkpoints/step-00001000 --data shards/coco-val"
    " --output reports/coco\n"
    "  mmcl eval retrieval --open-clip ViT-B-32 --pretrained weights/vit_b32.safetensors"
    " --data 'shards/f30k-{000..004}.tar' --output reports/f30k\n"
    "  mmcl eval retrieval --hf-clap laion/clap-htsat-fused --protocol laion-clap --data shards/clotho-eval"
    " --output reports/clotho\n"
)
LAYOUTS = """data layouts (--format, detected by default):
  shards        mmcl shards (folder of .tar, a .tar, or a brace pattern) with .cls labels;
                class names from manifest.json beside them or --classes
  class-folder  ROOT/<class>/<image or audio file>, classes sorted like torchvision's ImageFolder
  cifar10       cifar-10-batches-py/test_batch + batches.meta (the python pickles)
  cifar100      cifar-100-python/test + meta (fine labels)
  esc50         ESC-50-master/meta/esc50.csv + audio/ (--folds)
  urbansound8k  UrbanSound8K/metadata/UrbanSound8K.csv + audio/foldN/ (--folds)
"""


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    from mmcl.eval.formats import CLASSIFICATION_FORMATS
    from mmcl.eval.templates import TEMPLATE_SETS
    from shards_tools.cli import HelpfulFormatter

    evaluate = subparsers.add_parser(
        "eval",
        help="zero-shot classification and retrieval of a trained model",
        formatter_class=HelpfulFormatter,
        description="Evaluate an mmcl checkpoint, an open_clip model or a transformers CLAP model: "
        "zero-shot classification or retrieval.\n"
        "Writes results.json (CLIP_benchmark keys), report.md and plots into --output.\n\n"
        + ZERO_SHOT_EXAMPLE
        + RETRIEVAL_EXAMPLE.removeprefix("example:\n"),
    )
    sub = evaluate.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    zero_shot = sub.add_parser(
        "zero-shot",
        help="zero-shot classification with prompt ensembles",
        formatter_class=HelpfulFormatter,
        description="Classify labelled media by comparing them with prompts for every class\n"
        "(acc1, acc5, mean per-class recall, confusion matrix).\n\n" + LAYOUTS + "\n" + ZERO_SHOT_EXAMPLE,
    )
    add_model_flags(zero_shot)
    g = zero_shot.add_argument_group("data")
    g.add_argument("--data", required=True, help="dataset root, shard folder, .tar or brace pattern")
    g.add_argument("--format", default="auto", choices=["auto", *CLASSIFICATION_FORMATS], help="data layout")
    g.add_argument("--classes", type=Path, help="class names, one per line in class-index order")
    g.add_argument("--folds", type=int, nargs="+", help="ESC-50 / UrbanSound8K folds to evaluate on")
    g.add_argument("--name", help="dataset name in the report; without it, the layout's or the folder's name")
    g = zero_shot.add_argument_group("classifier")
    g.add_argument(
        "--templates",
        default="auto",
        help=f"prompt set ({', '.join(TEMPLATE_SETS)}), a file with one template per line ({{}} for the "
        "class), or auto: openai for images, audio for audio",
    )
    g.add_argument(
        "--debias",
        action="store_true",
        help="re-weight logits to a uniform class prior estimated on the data (no labels used)",
    )
    _add_protocol(zero_shot)
    _add_run(zero_shot)
    zero_shot.set_defaults(run=_run_zero_shot, prog_name="mmcl eval zero-shot")

    retrieval = sub.add_parser(
        "retrieval",
        help="text<->media retrieval on captioned shards",
        formatter_class=HelpfulFormatter,
        description="Recall@1/5/10 and mean/median rank in both directions on shards whose items carry one\n"
        'or several captions (.json "text" list or .txt).\n\n' + RETRIEVAL_EXAMPLE,
    )
    add_model_flags(retrieval)
    g = retrieval.add_argument_group("data")
    g.add_argument("--data", required=True, help="shard folder, .tar or brace pattern")
    g.add_argument("--name", help="dataset name in the report; without it, the folder's name")
    _add_protocol(retrieval)
    _add_run(retrieval)
    retrieval.set_defaults(run=_run_retrieval, prog_name="mmcl eval retrieval")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    from mmcl.models.config import LONG_CLIP_MODES

    g = p.add_argument_group("model (one of --checkpoint, --open-clip, --hf-clap)")
    g.add_argument(
        "--checkpoint", type=Path, help="mmcl checkpoint folder, or a run folder (its newest checkpoint)"
    )
    g.add_argument(
        "--open-clip", dest="open_clip", metavar="NAME", help="open_clip architecture, e.g. ViT-B-32"
    )
    g.add_argument(
        "--pretrained", metavar="TAG_OR_PATH", help="with --open-clip: pretrained tag or weights file"
    )
    g.add_argument(
        "--hf-clap",
        dest="hf_clap",
        metavar="NAME_OR_DIR",
        help="a transformers ClapModel: hub name (e.g. laion/clap-htsat-unfused) or save_pretrained folder",
    )
    g.add_argument(
        "--long-clips",
        choices=LONG_CLIP_MODES,
        help="audio models: recordings longer than the window are cropped (centre), averaged over "
        "windows, or fused (CLAP fusion models); default: the model's model.audio.long_clips",
    )
    g.add_argument(
        "--max-seconds", type=float, help="with --long-clips average|fusion: the longest stretch used"
    )


def _add_protocol(p: argparse.ArgumentParser) -> None:
    from mmcl.eval.formats import PROTOCOLS

    p.add_argument_group("protocol").add_argument(
        "--protocol",
        choices=PROTOCOLS,
        help="a published evaluation protocol, which fixes prompts, folds, clip handling and metrics "
        "(laion-clap: LAION-CLAP's, see README 'CLAP models')",
    )


def _add_run(p: argparse.ArgumentParser) -> None:
    from shards_tools.cli import add_max_bytes

    g = p.add_argument_group("run")
    g.add_argument("--output", required=True, type=Path, help="folder for results.json, report.md and plots")
    g.add_argument("--batch-size", type=int, default=64, help="items (and prompts) per forward pass")
    g.add_argument(
        "--workers", type=int, default=2, help="DataLoader processes decoding media (0: in-process)"
    )
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--max-samples", type=int, help="evaluate an even subset of this many items")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("untrusted data")
    g.add_argument(
        "--allow-pipe",
        action="store_true",
        help="accept a pipe:COMMAND --data path, which runs COMMAND in a shell: only for data you trust",
    )
    add_max_bytes(g, "skip any media file or tar member larger than this (counted as skipped)")


def _read_options(args: argparse.Namespace):
    from shards_tools.tar_stream import ReadOptions

    return ReadOptions(max_member_bytes=args.max_bytes, allow_pipe=args.allow_pipe)


def check_run_flags(args: argparse.Namespace) -> str:
    """Validate the numeric flags; returns the device to use. On a CPU the process keeps the memory a batch
    frees for the next (mmcl.host_memory): with glibc's defaults every batch's activations fault in anew."""
    for flag, value, least in (
        ("--batch-size", args.batch_size, 1),
        ("--workers", args.workers, 0),
        ("--max-samples", getattr(args, "max_samples", None), 1),
    ):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    import torch

    from mmcl.host_memory import keep_freed_memory

    if args.device == "auto":
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        chosen = args.device
    try:
        device = torch.device(chosen)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    if device.type == "cpu":
        keep_freed_memory()
    return chosen


def _print_summary(
    task: str, data_name: str, source: ModelSource, results: dict, paths: dict[str, Path]
) -> None:
    from mmcl.eval.report import format_table, headline, scalar_metrics

    metrics = scalar_metrics(results)
    counted = results.get("num_samples", results.get("num_items"))
    print(format_table(metrics))
    print(
        f"{task} of {data_name} ({counted} items, {results['skipped']} skipped) by {source.name} "
        f"({source.pretrained})"
    )
    print(headline(task, metrics))
    plots = [str(paths[k]) for k in ("confusion", "recall") if k in paths]
    print(
        f"report: {paths['markdown']} (JSON: {paths['json']}"
        + (f"; plots: {', '.join(plots)})" if plots else ")")
    )


def _audio_overrides(args: argparse.Namespace) -> dict:
    """model.audio settings the command line replaces for this evaluation."""
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise UsageError(f"--max-seconds must be > 0, got {args.max_seconds}")
    given = {"long_clips": args.long_clips, "max_seconds": args.max_seconds}
    return {k: v for k, v in given.items() if v is not None}


def _protocol_audio(args: argparse.Namespace, audio: dict) -> dict:
    """The clip handling --protocol fixes (CLAP's fusion for fusion models, else one window), merged
    into the command line's; a conflicting --long-clips is refused."""
    from mmcl.eval.loading import audio_config

    cfg = audio_config(args.checkpoint, args.hf_clap)
    if cfg is None:
        raise UsageError(f"--protocol {args.protocol} evaluates audio-text models; this one is image-text")
    wanted = "fusion" if cfg.tower == "hf" and cfg.fusion_model else "crop"
    if audio.get("long_clips", wanted) != wanted:
        raise UsageError(
            f"--long-clips {audio['long_clips']} conflicts with --protocol {args.protocol}, which takes "
            f"{wanted} for this model (fusion for CLAP fusion models, else one window); remove it"
        )
    return {**audio, "long_clips": wanted}


def _run_zero_shot(args: argparse.Namespace) -> int:
    # the flags first: a mistyped command fails before seconds of model-library imports
    check_model_choice(args.checkpoint, args.open_clip, args.pretrained, args.hf_clap)
    device = check_run_flags(args)
    from mmcl.eval.datasets import detect_format, open_classification
    from mmcl.eval.loading import load_eval_model, model_source
    from mmcl.eval.protocols import zero_shot_settings
    from mmcl.eval.report import write_report
    from mmcl.eval.templates import load_templates
    from mmcl.eval.zero_shot import evaluate_zero_shot

    source = model_source(args.checkpoint, args.open_clip, args.pretrained, args.hf_clap)
    audio, folds, padding = _audio_overrides(args), args.folds, "repeat"
    if args.protocol is not None:
        audio = _protocol_audio(args, audio)
        fmt = detect_format(args.data, source.modality) if args.format == "auto" else args.format
        settings = zero_shot_settings(
            args.protocol, fmt, templates=args.templates, folds=args.folds, debias=args.debias,
            classes=args.classes, max_samples=args.max_samples,
        )  # fmt: skip
        folds, padding = settings["folds"], settings["padding"]
    data = open_classification(
        args.data,
        source.modality,
        format=args.format,
        classes_file=args.classes,
        folds=folds,
        name=args.name,
        read_options=_read_options(args),
    )
    templates = settings["templates"] if args.protocol else load_templates(args.templates, source.modality)
    model = load_eval_model(
        args.checkpoint, args.open_clip, args.pretrained, device=device, hf_clap=args.hf_clap, audio=audio
    )
    results = evaluate_zero_shot(
        model,
        data,
        templates,
        batch_size=args.batch_size,
        workers=args.workers,
        debias=args.debias,
        max_samples=args.max_samples,
        progress=not args.quiet,
        padding=padding,
        protocol=args.protocol,
    )
    options = {
        "format": data.format,
        "templates": f"{args.templates} ({len(templates)})" if not args.protocol else templates[0],
        "debias": args.debias,
        "folds": folds,
        "max_samples": args.max_samples,
        "protocol": args.protocol,
        "audio": audio or None,
    }
    paths = write_report(
        args.output,
        dataset=data.name,
        model=source.name,
        pretrained=source.pretrained,
        task=data.task,
        results=results,
        class_names=list(data.class_names),
        options=options,
    )
    _print_summary(data.task, data.name, source, results, paths)
    return 0


def _run_retrieval(args: argparse.Namespace) -> int:
    check_model_choice(args.checkpoint, args.open_clip, args.pretrained, args.hf_clap)
    device = check_run_flags(args)
    from mmcl.eval.datasets import open_retrieval
    from mmcl.eval.loading import load_eval_model, model_source
    from mmcl.eval.protocols import LAION_PADDING, check_retrieval_options
    from mmcl.eval.report import write_report
    from mmcl.eval.retrieval import evaluate_retrieval

    source = model_source(args.checkpoint, args.open_clip, args.pretrained, args.hf_clap)
    audio, padding = _audio_overrides(args), "repeat"
    if args.protocol is not None:
        check_retrieval_options(args.protocol, args.max_samples)
        audio, padding = _protocol_audio(args, audio), LAION_PADDING
    data = open_retrieval(args.data, source.modality, name=args.name, read_options=_read_options(args))
    model = load_eval_model(
        args.checkpoint, args.open_clip, args.pretrained, device=device, hf_clap=args.hf_clap, audio=audio
    )
    results = evaluate_retrieval(
        model,
        data,
        batch_size=args.batch_size,
        workers=args.workers,
        max_samples=args.max_samples,
        progress=not args.quiet,
        padding=padding,
        protocol=args.protocol,
    )
    paths = write_report(
        args.output,
        dataset=data.name,
        model=source.name,
        pretrained=source.pretrained,
        task=data.task,
        results=results,
        options={"max_samples": args.max_samples, "protocol": args.protocol, "audio": audio or None},
    )
    _print_summary(data.task, data.name, source, results, paths)
    return 0
