"""`mmcl export`: hand a trained model back to the ecosystem, in the format its peers load.

    mmcl export --format hf RUN_OR_CHECKPOINT OUT

image-text: an open_clip hub-style folder, `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and
`open_clip_model.safetensors` (mmcl's image-text weights are exactly open_clip's state dict), which
`open_clip.create_model_and_transforms("local-dir:OUT")` loads with no registration and no mmcl installed.

audio-text, a fine-tuned transformers CLAP model (model.hf_clap): a ClapModel folder (config.json,
model.safetensors with both temperatures) and its processor (feature extractor settings, tokenizer), which
`ClapModel.from_pretrained(OUT)` and `ClapProcessor.from_pretrained(OUT)` load with no mmcl installed.

Other audio-text runs (mmcl's own audio towers, transformers encoders with new projections, open_clip text
towers) are refused: no transformers class holds those towers, so a folder that ClapModel or AutoModel
loads would have to carry a copy of mmcl's and open_clip's tower code (transformers' remote code), a
second implementation to keep equal to the first.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from mmcl.checkpoint_folder import resolve_checkpoint
from mmcl.errors import UsageError

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
EXPORT_EXAMPLE = """example:
  mmcl export --format hf runs/micro exported/micro
  python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:exported/micro')"
  mmcl export --format hf runs/clap-finetuned exported/clap
  python -c "from transformers import ClapModel; ClapModel.from_pretrained('exported/clap')"
"""


def export_model(checkpoint: Path, output: Path, format: str = "hf") -> Path:
    """Write the model of `checkpoint` (a checkpoint folder, or a run folder: its newest checkpoint) to the
    new folder `output` in `format`; returns `output`."""
    if format != "hf":
        raise UsageError(f"--format {format!r}: the one export format is hf")
    folder = resolve_checkpoint(checkpoint, argument="checkpoint")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise UsageError(f"{output} exists and is not empty; choose a new output folder")
    # the arguments are checked; only now the model libraries (seconds to import)
    from mmcl.eval.loading import checkpoint_config

    config = checkpoint_config(folder)
    if config.modality == "image":
        return _export_open_clip(folder, output)
    if config.hf_clap is not None:
        return _export_clap(folder, output)
    raise UsageError(
        f"{folder} holds an audio-text model whose towers no transformers class loads (mmcl's own audio "
        "tower, or an encoder with a new projection, and an open_clip text tower): it does not export. "
        "Audio-text runs export when they fine-tune a whole CLAP model (model.hf_clap), as a ClapModel "
        "folder; evaluate this one with mmcl eval --checkpoint"
    )


def _export_clap(folder: Path, output: Path) -> Path:
    """A ClapModel folder and its processor (also the extractor's preprocessor_config.json, which
    transformers 4 reads)."""
    from mmcl.eval.loading import load_eval_model

    model = load_eval_model(checkpoint=folder)
    output.mkdir(parents=True, exist_ok=True)
    model.to_clap_model().save_pretrained(output)
    model.processor.save_pretrained(output)
    model.processor.feature_extractor.save_pretrained(output)
    return output


def _export_open_clip(folder: Path, output: Path) -> Path:
    """open_clip's local-dir layout: its model config, its preprocessing, its state dict."""
    import open_clip
    from open_clip.transform import PreprocessCfg
    from safetensors.torch import save_file

    from mmcl.eval.loading import checkpoint_config, load_eval_model
    from mmcl.models.factory import resolve_open_clip_name

    name = resolve_open_clip_name(checkpoint_config(folder))
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise UsageError(f"{folder}: its open_clip architecture {name!r} has no config to export")
    model = load_eval_model(checkpoint=folder)
    preprocess_cfg = asdict(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model.clip)))
    output.mkdir(parents=True, exist_ok=True)
    (output / OPEN_CLIP_CONFIG).write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=1) + "\n"
    )
    state = {k: v.detach().cpu().contiguous() for k, v in model.export_state_dict().items()}
    save_file(state, output / OPEN_CLIP_WEIGHTS)
    if model_cfg["text_cfg"].get("hf_tokenizer_name"):  # open_clip's local-dir reads its tokenizer here
        model.tokenizer.save_pretrained(output)
    return output


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    from shards_tools.cli import HelpfulFormatter

    p = subparsers.add_parser(
        "export",
        help="write a trained model in its ecosystem's format",
        formatter_class=HelpfulFormatter,
        description="Write a trained model where its peers load it: image-text models as an open_clip\n"
        "folder (open_clip.create_model_and_transforms('local-dir:OUT')), fine-tuned CLAP models\n"
        "(model.hf_clap) as a transformers ClapModel folder (ClapModel.from_pretrained(OUT)).\n\n"
        + EXPORT_EXAMPLE,
    )
    p.add_argument(
        "checkpoint", type=Path, help="a checkpoint folder, or a run folder (its newest checkpoint)"
    )
    p.add_argument("output", type=Path, help="the new folder to write")
    p.add_argument("--format", default="hf", choices=["hf"], help="the ecosystem's format")
    p.set_defaults(run=_run_export, prog_name="mmcl export")


def _run_export(args: argparse.Namespace) -> int:
    output = export_model(args.checkpoint, args.output, args.format)
    print(f"exported {args.checkpoint} to {output}")
    return 0
