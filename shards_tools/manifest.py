"""The output's index: manifest.json (shards, counts, hashes, totals, options), open_clip's sizes.json
and _errors.jsonl, composed from the per-part records that sharding runs leave under `_parts/`.

Nothing here depends on timing or worker count: the same input and options give byte-identical files.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from shards_tools import __version__
from shards_tools.errors import UsageError
from shards_tools.shard_format import is_shard_name, parse_json_object
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
    """Read OUT/manifest.json or raise UsageError saying what to run first, or what is wrong with it: a
    manifest may come with shards from elsewhere, and its shard names are opened as files, so each must be a
    plain file name in OUT (not absolute, no folders, no ``..``)."""
    path = Path(output) / MANIFEST
    if not path.exists():
        raise UsageError(
            f"{path} not found: is {output} a folder written by `mmcl shard`? "
            f"(a --part run needs `mmcl shard merge {output}` first)"
        )
    return read_checked(path, "manifest", manifest_problem, "re-run the sharding command to rewrite it")


def read_checked(path: Path, what: str, problem: Callable[[dict], str | None], fix: str) -> dict:
    """A JSON object from an index file that may come from elsewhere, or UsageError naming `path`, what is
    wrong (unreadable, not an object, or `problem(value)`) and the `fix`."""
    try:
        value = parse_json_object(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is not a readable {what} ({err}); {fix}") from None
    found = problem(value)
    if found is not None:
        raise UsageError(f"{path}: {found}; {fix}")
    return value


def shard_list_problem(manifest: dict, fields: tuple[str, ...] = ("count",)) -> str | None:
    """What makes a manifest's shard list unusable for reading counts, or None: every entry needs a plain
    file name and a non-negative integer for each of `fields`; a modality, if given, is image or audio."""
    if manifest.get("modality", "image") not in ("image", "audio"):
        return f"modality {str(manifest.get('modality'))[:100]!r} is not image or audio"
    if not isinstance(manifest.get("shards"), list):
        return "no shards list"
    for shard in manifest["shards"]:
        if not isinstance(shard, dict) or not is_shard_name(shard.get("name")):
            name = shard.get("name") if isinstance(shard, dict) else shard
            return f"shard name {str(name)[:200]!r} is not a plain file name in the shard folder"
        for field in fields:
            if not _is_count(shard.get(field)):
                return (
                    f"{shard['name']}: {field} {str(shard.get(field))[:100]!r} is not a non-negative integer"
                )
    return None


def manifest_problem(manifest: dict) -> str | None:
    """What makes a parsed manifest.json unusable for verify and stats, or None: the fields they rely on."""
    problem = shard_list_problem(manifest, ("count", "bytes"))
    if problem is not None:
        return problem
    if "modality" not in manifest or not isinstance(manifest.get("prefix"), str):
        return "no modality or prefix"
    if not all(isinstance(shard.get("sha256"), str) for shard in manifest["shards"]):
        return "a shard without its sha256"
    totals = manifest.get("totals")
    if not isinstance(totals, dict) or not all(
        _is_count(totals.get(k)) for k in ("shards", "samples", "bytes", "skipped")
    ):
        return "totals are not non-negative integers"
    if not isinstance(manifest.get("errors_by_reason", {}), dict):
        return "errors_by_reason is not an object"
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_sizes(path: Path) -> dict[str, int]:
    """open_clip's sizes.json (shard name -> sample count); UsageError naming the file if it is malformed."""
    return read_checked(path, "sizes.json", sizes_problem, "fix or delete it")


def sizes_problem(sizes: dict) -> str | None:
    """What makes a parsed sizes.json unusable, or None: every entry must map a shard name to a count."""
    bad = next(
        (name for name, count in sizes.items() if not is_shard_name(name) or not _is_count(count)), None
    )
    return (
        None
        if bad is None
        else f"entry {bad!r}: {str(sizes[bad])[:100]!r} is not a shard name with a sample count"
    )


def _read_part(path: Path) -> dict:
    """One part record, checked for the fields merging relies on."""
    return read_checked(
        path, "part record written by `mmcl shard`", _part_problem, "re-run that part (--part K/N)"
    )


def _part_problem(part: dict) -> str | None:
    fields = {"part": int, "parts": int, "planned_shards": int, "options": dict, "shards": list}
    wrong = [name for name, kind in fields.items() if not isinstance(part.get(name), kind)]
    if wrong:
        return f"{', '.join(wrong)} missing or of the wrong type"
    problem = shard_list_problem(part, ("index", "count", "items", "bytes"))
    if problem is None and not all(isinstance(s.get("errors"), list) and isinstance(s.get("sha256"), str)
                                   for s in part["shards"]):  # fmt: skip
        problem = "a shard without its sha256 or error list"
    return problem


def merge_parts(output: Path) -> dict:
    """Join the parts' records into manifest.json, sizes.json and _errors.jsonl; returns the manifest."""
    output = Path(output)
    files = sorted((output / PARTS_DIR).glob("part-*-of-*.json"))
    if not files:
        raise UsageError(
            f"no part records in {output / PARTS_DIR}: run `mmcl shard ... --output {output}` first"
        )
    parts = [_read_part(f) for f in files]
    counts = {p["parts"] for p in parts}
    if len(counts) != 1:
        raise UsageError(
            f"{output / PARTS_DIR} mixes runs split into {sorted(counts)} parts; remove the stale ones"
        )
    total_parts = counts.pop()
    missing = sorted(set(range(total_parts)) - {p["part"] for p in parts})
    if missing:
        listed = ", ".join(f"{k}/{total_parts}" for k in missing)
        raise UsageError(
            f"parts {listed} of {output} have not finished; run them (--part K/N), then merge again"
        )
    first = parts[0]
    for other in parts[1:]:
        if other["options"] != first["options"]:
            raise UsageError(
                f"part {other['part']} of {output} was written with other options than part {first['part']}"
            )
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
    write_atomic(
        output / ERRORS, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors).encode("utf-8")
    )
    write_atomic(output / MANIFEST, _dump(manifest))
    return manifest
