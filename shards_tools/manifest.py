"""The output's index: manifest.json (shards, counts, hashes, totals, options), open_clip's sizes.json
and _errors.jsonl, composed from the per-part records that sharding runs leave under `_parts/`.

Nothing here depends on timing or worker count: the same input and options give byte-identical files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mmcl import __version__
from mmcl.errors import UsageError
from shards_tools.writer import write_atomic

PARTS_DIR = "_parts"
MANIFEST = "manifest.json"
SIZES = "sizes.json"
ERRORS = "_errors.jsonl"


def part_path(output: Path, part: int, parts: int) -> Path:
    return output / PARTS_DIR / f"part-{part:05d}-of-{parts:05d}.json"


def write_part(output: Path, part: int, parts: int, header: dict, records: list[dict]) -> None:
    """Store what one part wrote: the shared header (options, classes, noise) and its shard records."""
    payload = {"part": part, "parts": parts, **header, "shards": sorted(records, key=lambda r: r["index"])}
    path = part_path(output, part, parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, _dump(payload))


def _dump(obj: object) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8")


def load_manifest(output: Path) -> dict:
    """Read OUT/manifest.json or raise UsageError saying what to run first."""
    path = Path(output) / MANIFEST
    if not path.exists():
        raise UsageError(f"{path} not found: is {output} a folder written by `mmcl shard`? (a --part run needs `mmcl shard merge {output}` first)")
    try:
        return json.loads(path.read_text("utf-8"))
    except ValueError as err:
        raise UsageError(f"{path} is not valid JSON ({err}); re-run the sharding command to rewrite it") from None


def merge_parts(output: Path) -> dict:
    """Join the parts' records into manifest.json, sizes.json and _errors.jsonl; returns the manifest."""
    output = Path(output)
    files = sorted((output / PARTS_DIR).glob("part-*-of-*.json"))
    if not files:
        raise UsageError(f"no part records in {output / PARTS_DIR}: run `mmcl shard ... --output {output}` first")
    parts = [json.loads(f.read_text("utf-8")) for f in files]
    counts = {p["parts"] for p in parts}
    if len(counts) != 1:
        raise UsageError(f"{output / PARTS_DIR} mixes runs split into {sorted(counts)} parts; remove the stale ones")
    total_parts = counts.pop()
    missing = sorted(set(range(total_parts)) - {p["part"] for p in parts})
    if missing:
        listed = ", ".join(f"{k}/{total_parts}" for k in missing)
        raise UsageError(f"parts {listed} of {output} have not finished; run them (--part K/N), then merge again")
    first = parts[0]
    for other in parts[1:]:
        if other["options"] != first["options"]:
            raise UsageError(f"part {other['part']} of {output} was written with other options than part {first['part']}")
    shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["index"])
    if len(shards) != first["planned_shards"]:
        raise UsageError(f"{output}: parts hold {len(shards)} shards, the plan has {first['planned_shards']}")

    errors = [e for s in shards for e in s["errors"]]
    by_reason = dict(sorted(Counter(e["reason"] for e in errors).items()))
    samples = sum(s["count"] for s in shards)
    manifest = {
        "format": "mmcl-shards/1",
        "tool": f"mmcl {__version__}",
        "modality": first["modality"],
        "prefix": first["prefix"],
        "shards": [{k: s[k] for k in ("name", "count", "bytes", "sha256")} for s in shards],
        "totals": {
            "shards": len(shards),
            "samples": samples,
            "bytes": sum(s["bytes"] for s in shards),
            "items": sum(s["items"] for s in shards),
            "skipped": len(errors),
        },
        "errors_by_reason": by_reason,
        "class_names": first["class_names"],
        "noise": first["noise"],
        "options": first["options"],
    }
    write_atomic(output / SIZES, _dump({s["name"]: s["count"] for s in shards}))
    write_atomic(output / ERRORS, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors).encode("utf-8"))
    write_atomic(output / MANIFEST, _dump(manifest))
    return manifest
