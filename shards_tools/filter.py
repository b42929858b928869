"""`mmcl shard filter`: keep the pairs of a shard set that score well, as a new shard set; and the half it
shares with `mmcl shard dedup` (`shards_tools.dedup`): writing a subset of a shard set.

The decision (`choose_kept`) reads the scores folder `mmcl shard score` wrote (`shards_tools.scores`):
`--min-score X` keeps exactly the pairs whose `--field` is >= X, `--keep-fraction F` the best ceil(F n) of the
n scored pairs (with `--per-class`, the best ceil(F n_c) of each class, by the rows' label_index), ties
going to the earlier pair (shard order, then position). For `p_value` lower is better: <= X, the lowest.
A pair without a sidecar row (or without the field) could not be scored and is removed (`no_score`).

`write_subset` writes the kept pairs into OUT under the input's shard names, each in its input order, with
`writer.sample_bytes` + `writer.tar_end` (the same inputs give the same bytes), under a temporary name,
fsynced and renamed. A shard left with no pair is not written, and is listed in the manifest's "filtered":
{"empty_shards": [...]}: `mmcl shard verify` would accept an empty tar, but a training reader dealt only
empty shards stops the run ("got no samples in epoch"). Then OUT/removed.jsonl (one row per removed pair:
key, shard, reason, value; `duplicate` rows also name the kept pair, "of"), and last sizes.json and
manifest.json: the input's header, the new shards and totals, the input's skipped items by reason plus the
removed pairs by reason (so `totals.items = samples + skipped` still holds), and a "filtered" entry saying
from what and how. The input shards are never modified; OUT may not be SHARDS or inside it, and may only
hold what this command writes (a re-run replaces a previous filter or dedup output, removing its shards
that the new one no longer has).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from shards_tools import __version__
from shards_tools.errors import UsageError
from shards_tools.manifest import MANIFEST, SIZES, load_manifest
from shards_tools.scores import FIELDS, lower_is_better, read_sidecar, sidecar_path
from shards_tools.tar_stream import DEFAULT_READ_OPTIONS, ReadOptions, iter_samples
from shards_tools.writer import open_new, sample_bytes, tar_end, write_atomic

REMOVED = "removed.jsonl"
REASONS = ("below_min_score", "below_keep_fraction", "no_score", "too_large", "duplicate")


# ------------------------------------------------------------------------------------------ the rule


@dataclass(frozen=True)
class Rule:
    """What `mmcl shard filter` keeps: `min_score` or `keep_fraction` (one of them) of `field`."""

    field: str = "score"
    min_score: float | None = None
    keep_fraction: float | None = None
    per_class: bool = False

    def check(self) -> None:
        """UsageError naming the flag for a rule that cannot be applied."""
        if self.field not in FIELDS:
            raise UsageError(f"--field must be one of {', '.join(FIELDS)}, got {self.field!r}")
        if (self.min_score is None) == (self.keep_fraction is None):
            raise UsageError(
                "give exactly one of --min-score X (keep the pairs scoring at least X) and "
                "--keep-fraction F (keep the best F of the pairs)"
            )
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise UsageError(f"--min-score must be a finite number, got {self.min_score}")
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise UsageError(f"--keep-fraction must be in (0, 1], got {self.keep_fraction}")
        if self.per_class and self.keep_fraction is None:
            raise UsageError("--per-class applies only with --keep-fraction F (the best F of each class)")

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.field)

    def describe(self) -> dict:
        """The rule as the manifest's "filtered" entry records it."""
        rule: dict = {"field": self.field}
        if self.min_score is not None:
            rule["max_p_value" if self.lower_is_better else "min_score"] = self.min_score
        else:
            rule["keep_fraction"] = self.keep_fraction
            rule["per_class"] = self.per_class
        return rule


def fraction_count(fraction: float, n: int) -> int:
    """ceil(fraction * n), computed on the decimal the user typed (0.3 x 10 is 3, not 4)."""
    return math.ceil(Fraction(repr(fraction)) * n)


def choose_kept(
    keys: Mapping[str, Sequence[str]], rows: Mapping[str, Mapping[str, dict]], rule: Rule
) -> dict[tuple[str, str], dict]:
    """The pairs `rule` removes, as {(shard, key): {"reason", "value"}}, given each shard's keys in order
    (`keys`, shards in walk order) and its sidecar rows by key (`rows`)."""
    rule.check()
    removed: dict[tuple[str, str], dict] = {}
    scored: list[tuple[str, str]] = []
    values: list[float] = []
    labels: list[int] = []
    for name, shard_keys_ in keys.items():
        shard_rows = rows.get(name, {})
        for key in shard_keys_:
            row = shard_rows.get(key)
            value = None if row is None else row.get(rule.field)
            if value is None:
                removed[(name, key)] = {"reason": "no_score", "value": None}
                continue
            if rule.per_class:
                if row.get("label_index") is None:
                    raise UsageError(
                        f"--per-class: the sidecar row of {key!r} ({name}) has no label_index; classes come "
                        "from the scores' label_index (shards made with --label-column or a labelled "
                        "layout); drop --per-class"
                    )
                labels.append(int(row["label_index"]))
            scored.append((name, key))
            values.append(float(value))
    if not scored:
        raise UsageError(
            f"no pair of the shard set has a {rule.field!r} in the scores folder: score the shards with "
            "`mmcl shard score`, or pick another --field"
        )
    array = np.asarray(values, dtype=np.float64)
    if rule.min_score is not None:
        kept = array <= rule.min_score if rule.lower_is_better else array >= rule.min_score
        reason = "below_min_score"
        if not kept.any():
            best, than = (array.min(), "at most") if rule.lower_is_better else (array.max(), "at least")
            raise UsageError(
                f"no pair's {rule.field} is {than} --min-score {rule.min_score} (the best is {best:g}): "
                "nothing would be kept"
            )
    else:
        groups = np.asarray(labels, dtype=np.int64) if rule.per_class else np.zeros(len(array), np.int64)
        position = np.arange(len(array))  # shard order, then position: the walk order of `keys`
        # by class, best first within a class, ties to the earlier pair
        ranking = np.lexsort((position, array if rule.lower_is_better else -array, groups))
        _, starts, sizes = np.unique(groups[ranking], return_index=True, return_counts=True)
        quota = np.asarray([fraction_count(rule.keep_fraction, int(size)) for size in sizes])
        rank = position - np.repeat(starts, sizes)  # rank within its class, of ranking's i-th pair
        kept = np.zeros(len(array), dtype=bool)
        kept[ranking[rank < np.repeat(quota, sizes)]] = True
        reason = "below_keep_fraction"
    for i in np.flatnonzero(~kept):
        removed[scored[i]] = {"reason": reason, "value": values[i]}
    return removed


# ------------------------------------------------------------------------------------------ input, output


def input_shards(shards: Path) -> tuple[dict, list[str]]:
    """SHARDS' checked manifest and its shard names, sorted (the order everything here walks them in)."""
    manifest = load_manifest(Path(shards))
    return manifest, sorted(s["name"] for s in manifest["shards"])


def check_output(shards: Path, output: Path, names: Iterable[str]) -> None:
    """UsageError unless OUTPUT may receive the subset: not SHARDS or inside it (the input is never
    modified), not a file, and holding only what filter/dedup write (a previous output is replaced)."""
    source, target = Path(shards).resolve(), Path(output).resolve()
    if target == source or source in target.parents:
        raise UsageError(
            f"--output {output} is the shard set {shards} or inside it: the input is never modified; "
            "write the subset to a folder outside it"
        )
    if target.exists() and not target.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder")
    if not target.is_dir():
        return
    ours = {*names, MANIFEST, SIZES, REMOVED}
    previous = _previous_output(output)
    if previous is not None:
        ours.update(s["name"] for s in previous["shards"])
    for path in sorted(target.iterdir()):
        if path.name in ours or (path.name.startswith(".") and ".tmp-" in path.name):
            continue
        raise UsageError(
            f"--output {output} already holds {path.name}, which `mmcl shard filter`/`dedup` would not write "
            "there: give an empty or new folder (a previous filter or dedup output is replaced)"
        )


def _previous_output(output: Path) -> dict | None:
    """The manifest of a previous filter/dedup output in OUTPUT; UsageError for any other shard set."""
    if not (Path(output) / MANIFEST).exists():
        return None
    previous = load_manifest(Path(output))
    if "filtered" not in previous:
        raise UsageError(
            f"--output {output} holds a shard set that `mmcl shard filter`/`dedup` did not write; give an "
            "empty or new folder"
        )
    return previous


def _refuse(shards: Path) -> Callable[[Exception], bool]:
    """An iter_samples handler: a shard that cannot be read stops the command (no partial subset)."""

    def handler(err: Exception) -> bool:
        raise UsageError(f"{err}; check the input with `mmcl shard verify {shards}`")

    return handler


def shard_keys(
    shards: Path, manifest: dict, names: Sequence[str], options: ReadOptions, progress: bool = False
) -> tuple[dict[str, list[str]], dict[tuple[str, str], dict]]:
    """Every shard's sample keys in order (a pass that reads no member data: local tars are seeked through),
    and the samples with a member refused by `options` (over --max-bytes, sparse...), as removals with
    reason `too_large`: they are left out of the decision. UsageError for a shard that is missing, cut
    short or not the size its manifest says."""
    from tqdm import tqdm

    sizes = {s["name"]: s["bytes"] for s in manifest["shards"]}
    keys: dict[str, list[str]] = {}
    refused: dict[tuple[str, str], dict] = {}
    for name in tqdm(names, desc="read keys", unit="shard", disable=not progress, dynamic_ncols=True):
        path = Path(shards) / name
        if not path.is_file():
            raise UsageError(f"{path}: listed in {Path(shards) / MANIFEST} but missing")
        if path.stat().st_size != sizes[name]:
            raise UsageError(
                f"{path}: {path.stat().st_size} bytes, its manifest says {sizes[name]}: the shard changed; "
                f"check it with `mmcl shard verify {shards}`"
            )
        keys[name] = []
        for sample in iter_samples(str(path), handler=_refuse(shards), options=options, extensions=()):
            keys[name].append(sample["__key__"])
            if "__problem__" in sample:
                refused[(name, sample["__key__"])] = _too_large(sample["__problem__"])
    return keys, refused


def _too_large(problem: str) -> dict:
    return {"reason": "too_large", "value": None, "detail": problem}


def usable(
    keys: Mapping[str, Sequence[str]], refused: Mapping[tuple[str, str], dict]
) -> dict[str, list[str]]:
    """`keys` less the refused samples."""
    return {name: [k for k in ks if (name, k) not in refused] for name, ks in keys.items()}


def sidecar_rows(scores: Path, names: Iterable[str]) -> dict[str, dict[str, dict]]:
    """Each shard's sidecar rows by key (the last row of a repeated key counts, as in scores.shard_scores);
    UsageError when SCORES is not a folder or holds no sidecar for any of the shards."""
    scores = Path(scores)
    if not scores.is_dir():
        raise UsageError(
            f"--scores {scores}: not a folder (`mmcl shard score SHARDS --output ...` writes one)"
        )
    rows = {
        name: {row["key"]: row for row in read_sidecar(sidecar_path(scores, name))}
        for name in names
        if sidecar_path(scores, name).is_file()
    }
    if not rows:
        raise UsageError(
            f"--scores {scores} has no sidecar for any shard of this set: score it with `mmcl shard score`"
        )
    return rows


def _dump(obj: object) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


class _Lines:
    """removed.jsonl, streamed to a temporary file and renamed into place by `publish`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.stream = open_new(self.tmp)

    def write(self, row: dict) -> None:
        self.stream.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))

    def publish(self) -> None:
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.stream.close()
        self.tmp.unlink(missing_ok=True)


def _removed_row(name: str, key: str, info: Mapping) -> dict:
    return {"key": key, "shard": name, **info}


def _write_shard(
    source: Path, target: Path, name: str, removed: Mapping[tuple[str, str], dict], lines: _Lines,
    options: ReadOptions, shards: Path,
) -> tuple[dict | None, dict[str, int]]:  # fmt: skip
    """Copy one shard's kept samples to `target` atomically; its manifest entry (None: no sample kept, no
    file written) and its removals by reason."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    digest, size, count, reasons = hashlib.sha256(), 0, 0, {}
    stream = open_new(tmp)
    try:
        for sample in iter_samples(str(source), handler=_refuse(shards), options=options):
            key = sample["__key__"]
            info = removed.get((name, key))
            if info is None and "__problem__" in sample:
                info = _too_large(sample["__problem__"])
            if info is not None:
                lines.write(_removed_row(name, key, info))
                reasons[info["reason"]] = reasons.get(info["reason"], 0) + 1
                continue
            data = sample_bytes({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
            stream.write(data)
            digest.update(data)
            size += len(data)
            count += 1
        if count == 0:  # not written: a reader dealt only empty shards would fail the training run
            stream.close()
            tmp.unlink()
            target.unlink(missing_ok=True)  # a crashed run's, or a previous output's
            return None, reasons
        end = tar_end(size)
        stream.write(end)
        digest.update(end)
        size += len(end)
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        os.replace(tmp, target)
    except BaseException:
        stream.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"name": name, "count": count, "bytes": size, "sha256": digest.hexdigest()}, reasons


def write_subset(
    shards: Path,
    output: Path,
    removed: Mapping[tuple[str, str], dict],
    *,
    scores: Path,
    rule: dict,
    options: ReadOptions = DEFAULT_READ_OPTIONS,
    progress: bool = False,
    manifest: dict | None = None,
    names: Sequence[str] | None = None,
) -> dict:
    """Write SHARDS' samples except `removed` ({(shard, key): {"reason", "value", ...}}) to OUTPUT as a
    new shard set (see the module docstring); returns its manifest. A sample with a member over
    `options.max_member_bytes` is removed too (reason `too_large`)."""
    from tqdm import tqdm

    shards, output = Path(shards), Path(output)
    if manifest is None or names is None:
        manifest, names = input_shards(shards)
    check_output(shards, output, names)
    previous = _previous_output(output)
    output.mkdir(parents=True, exist_ok=True)
    for stale in (MANIFEST, SIZES):  # until the new ones are written, OUT is visibly unfinished
        (output / stale).unlink(missing_ok=True)
    records, reasons, empty = [], {}, []
    lines = _Lines(output / REMOVED)
    try:
        for name in tqdm(names, desc="write", unit="shard", disable=not progress, dynamic_ncols=True):
            record, found = _write_shard(shards / name, output / name, name, removed, lines, options, shards)
            if record is None:
                empty.append(name)
            else:
                records.append(record)
            for reason, count in found.items():
                reasons[reason] = reasons.get(reason, 0) + count
        lines.publish()
    except BaseException:
        lines.discard()
        raise
    kept, dropped = sum(r["count"] for r in records), sum(reasons.values())
    header = {
        k: v for k, v in manifest.items() if k not in ("shards", "totals", "errors_by_reason", "filtered")
    }
    header["tool"] = f"mmcl {__version__}"
    by_reason = dict(manifest.get("errors_by_reason", {}))
    for reason, count in reasons.items():
        by_reason[reason] = by_reason.get(reason, 0) + count
    totals = {"shards": len(records), "samples": kept, "bytes": sum(r["bytes"] for r in records)}
    if isinstance(manifest["totals"].get("items"), int):
        totals["items"] = manifest["totals"]["items"]  # items = samples + skipped, as the sharder counts
    totals["skipped"] = manifest["totals"]["skipped"] + dropped
    filtered = {
        "from": str(shards),
        "scores": str(scores),
        "rule": rule,
        "kept": kept,
        "removed": dropped,
        "removed_by_reason": dict(sorted(reasons.items())),
        "empty_shards": empty,
    }
    if "filtered" in manifest:
        filtered["previous"] = manifest["filtered"]
    new = {
        **header,
        "shards": records,
        "totals": totals,
        "errors_by_reason": dict(sorted(by_reason.items())),
        "filtered": filtered,
    }
    write_atomic(output / SIZES, _dump({r["name"]: r["count"] for r in records}))
    write_atomic(output / MANIFEST, _dump(new))
    if previous is not None:
        for stale in sorted({s["name"] for s in previous["shards"]} - {r["name"] for r in records}):
            (output / stale).unlink(missing_ok=True)
    return new


def write_removed_only(
    shards: Path,
    output: Path,
    names: Sequence[str],
    keys: Mapping[str, Sequence[str]],
    removed: Mapping[tuple[str, str], dict],
) -> dict[str, int]:
    """A dry run's output: only OUTPUT/removed.jsonl (in walk order); returns the kept and removed counts."""
    check_output(shards, output, names)
    Path(output).mkdir(parents=True, exist_ok=True)
    lines = _Lines(Path(output) / REMOVED)
    total = 0
    try:
        for name in names:
            for key in keys[name]:
                total += 1
                if (name, key) in removed:
                    lines.write(_removed_row(name, key, removed[(name, key)]))
        lines.publish()
    except BaseException:
        lines.discard()
        raise
    return {"kept": total - len(removed), "removed": len(removed)}


def filter_shards(
    shards: Path,
    scores: Path,
    output: Path,
    rule: Rule,
    *,
    options: ReadOptions = DEFAULT_READ_OPTIONS,
    progress: bool = False,
) -> dict:
    """`mmcl shard filter`: apply `rule` to SHARDS with SCORES' sidecars and write the kept pairs to OUTPUT;
    returns the new manifest."""
    rule.check()
    manifest, names = input_shards(shards)
    check_output(shards, output, names)
    rows = sidecar_rows(scores, names)
    keys, refused = shard_keys(shards, manifest, names, options, progress=progress)
    removed = {**choose_kept(usable(keys, refused), rows, rule), **refused}
    return write_subset(shards, output, removed, scores=scores, rule=rule.describe(), options=options,
                        progress=progress, manifest=manifest, names=names)  # fmt: skip
