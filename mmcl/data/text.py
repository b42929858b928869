"""Text of a sample: parse its JSON, pick one caption among several (the batch tokenizes them, in
mmcl.data.pipeline.collate).

Caption sources, first that has a non-empty one wins: the JSON "text" list (mmcl and LAION-CLAP
shards; a plain string is one caption), the .txt file (mmcl's first caption, img2dataset), the JSON
"caption" (img2dataset).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mmcl.data.common import BadSample
from shards_tools.shard_format import parse_json_object


def read_meta(sample: dict) -> dict:
    """The sample's JSON record ({} without one); BadSample if it is not a JSON object, or nested deeper than
    any real record (shard_format.parse_json_object)."""
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        return parse_json_object(raw)
    except ValueError as err:
        raise BadSample(sample["__key__"], str(err)) from None


def _clean(captions: object) -> list[str]:
    listed = [captions] if isinstance(captions, str) else captions if isinstance(captions, list) else []
    return [c.strip() for c in listed if isinstance(c, str) and c.strip()]


def captions_of(sample: dict, meta: dict) -> list[str]:
    """All usable captions of a sample, in the order of the sources listed in the module docstring."""
    found = _clean(meta.get("text"))
    if not found and "txt" in sample:
        found = _clean(sample["txt"].decode("utf-8", errors="replace"))
    return found or _clean(meta.get("caption"))


def choose_caption(sample: dict, meta: dict, seed: Callable[[], int]) -> str:
    """One caption, drawn with random.Random(seed()) when there are several (the seed is derived only then:
    most samples have one); BadSample when there is none."""
    captions = captions_of(sample, meta)
    if not captions:
        raise BadSample(sample["__key__"], "no caption (empty or missing json text / .txt / json caption)")
    return captions[random.Random(seed()).randrange(len(captions))] if len(captions) > 1 else captions[0]
