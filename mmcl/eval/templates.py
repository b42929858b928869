"""Prompt templates for zero-shot classification: built-in sets or a file, each with one `{}` for the class.

Prompt ensembling (averaging a class's text embeddings over many phrasings) makes the classifier less
sensitive to any one wording (the 80 OpenAI templates added 3.5 ImageNet points in the CLIP paper):

* `openai`: the 80 ImageNet templates of the CLIP paper (open_clip's `OPENAI_IMAGENET_TEMPLATES`, written
  here as format strings so files and built-ins are the same kind of thing);
* `short`: a handful of plain photo prompts, 10x cheaper, for quick or periodic evaluation;
* `audio`: sound prompts in the style of CLAP's zero-shot evaluation;
* a file: one template per line containing `{}`; blank lines and lines starting with `#` are skipped.
"""

from __future__ import annotations

from pathlib import Path

from mmcl.errors import UsageError

OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SHORT_IMAGE_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
    "a good photo of a {}.",
    "itap of a {}.",
)

AUDIO_TEMPLATES = (
    "This is a sound of {}.",
    "the sound of a {}.",
    "the sound of {}.",
    "a recording of {}.",
    "a recording of a {}.",
    "this is the sound of a {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "openai": OPENAI_IMAGENET_TEMPLATES,
    "short": SHORT_IMAGE_TEMPLATES,
    "audio": AUDIO_TEMPLATES,
}
DEFAULT_SET = {"image": "openai", "audio": "audio"}


def check_template(template: str, where: str) -> str:
    """`template` if `template.format(name)` puts the class name in exactly one place; else UsageError."""
    try:
        filled = template.format("\x00")
    except (IndexError, KeyError, ValueError) as err:
        raise UsageError(
            f"{where}: template {template!r} is not a format string with one {{}} ({err}); "
            "write literal braces as {{ and }}"
        ) from None
    if filled.count("\x00") != 1:
        raise UsageError(f"{where}: template {template!r} must contain {{}} exactly once (the class name)")
    return template


def load_templates(spec: str | None, modality: str) -> list[str]:
    """The templates named by `spec`: a built-in set (openai, short, audio), a file of templates, or
    "auto"/None for the modality's default (openai for images, audio for audio)."""
    name = DEFAULT_SET[modality] if spec in (None, "auto") else spec
    if name in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[name])
    path = Path(name).expanduser()
    if not path.is_file():
        raise UsageError(
            f"--templates {name!r} is neither a built-in set ({', '.join(TEMPLATE_SETS)}) "
            "nor an existing file of templates (one per line, with {} for the class name)"
        )
    lines = [line.strip() for line in path.read_text("utf-8").splitlines()]
    templates = [check_template(line, str(path)) for line in lines if line and not line.startswith("#")]
    if not templates:
        raise UsageError(f"{path} holds no templates: write one per line, e.g. 'a photo of a {{}}.'")
    return templates
