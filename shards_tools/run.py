"""One sharding run: read -> plan -> skip finished shards -> write the rest in parallel -> manifest.

Re-running the same command on the same output resumes: shards whose tar still matches its record are
kept, temporary files of a killed run are removed, the rest is redone, and the result is identical to an
uninterrupted run. A run with other output options on the same folder is refused, so nothing is mixed.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from shards_tools import readers
from shards_tools.config import ShardConfig
from shards_tools.distribute import run_shard_tasks
from shards_tools.errors import UsageError
from shards_tools.manifest import PARTS_DIR, merge_parts, part_path, write_part
from shards_tools.plan import ShardPlanner
from shards_tools.shard_format import parse_json_object
from shards_tools.writer import PROGRESS_DIR, ShardJob, finished_record, shard_name, write_atomic

OPTIONS_FILE = "options.json"


class ShardingAborted(Exception):
    """The run stopped on purpose (error rate above --max-error-rate); finished shards are kept."""


def _check_options(config: ShardConfig) -> None:
    """Refuse to resume into a folder written with different output options."""
    progress = Path(config.output) / PROGRESS_DIR
    progress.mkdir(parents=True, exist_ok=True)
    path = progress / OPTIONS_FILE
    wanted = config.output_options()
    if path.exists():
        try:
            stored = parse_json_object(path.read_bytes())
        except (OSError, ValueError) as err:
            raise UsageError(
                f"{path} is damaged ({err}): it records the options {config.output} was written with; delete "
                f"{progress} to start that folder afresh (finished shards are then written again), or choose "
                "a new --output"
            ) from None
        if stored != wanted:
            changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise UsageError(
                f"{config.output} holds shards written with other options (differs in: "
                f"{', '.join(changed)}); re-run with the original options to resume, or choose a new --output"
            )
    else:
        write_atomic(path, json.dumps(wanted, indent=1).encode("utf-8"))


def _remove_stale_temporaries(output: Path, shard_names: list[str], part: int, parts: int) -> None:
    """Remove what killed runs left half-written. A run split into parts removes only the temporaries of
    its own shards, their records and its part file: in a job array the other parts may be writing theirs
    into the same folder right now."""
    if parts == 1:
        patterns = [(output, ".*.tmp-*"), (output / PROGRESS_DIR, ".*.tmp-*")]
    else:
        patterns = [(output, f".{name}.tmp-*") for name in shard_names]
        patterns += [(output / PROGRESS_DIR, f".{name}.json.tmp-*") for name in shard_names]
    patterns.append((output / PARTS_DIR, f".{part_path(output, part, parts).name}.tmp-*"))
    for folder, pattern in patterns:
        for tmp in folder.glob(pattern):
            tmp.unlink(missing_ok=True)


def _class_index(config: ShardConfig, planner: ShardPlanner) -> list[str] | None:
    names = readers.class_names(config.input)
    if names is None:
        names = sorted(planner.labels) if planner.labels else None
    return names


def run_sharding(config: ShardConfig, *, progress: bool = True) -> dict:
    """Write (or finish writing) the shards described by `config`; returns manifest.json's content, or
    this part's summary for a `--part K/N` run with N > 1 (then `merge_parts` writes the manifest)."""
    output = Path(config.output)
    items = readers.read_items(config.input)  # raises UsageError on a missing or unreadable input
    output.mkdir(parents=True, exist_ok=True)
    _check_options(config)

    planner = ShardPlanner(
        items,
        shard_size=config.shard_size,
        max_shard_bytes=config.max_shard_bytes,
        shuffle=config.shuffle,
        noise_rate=config.noise_rate,
        seed=config.seed,
    )
    try:
        return _write_planned(config, output, planner, progress)
    finally:
        planner.close()


def _write_planned(config: ShardConfig, output: Path, planner: ShardPlanner, progress: bool) -> dict:
    if not len(planner):
        raise UsageError(f"{config.input.path} holds no items to shard (format: {config.input.format})")
    class_names = _class_index(config, planner)
    if len(planner.noise_permutation()) < planner.noise_requested:
        print(
            f"warning: --noise-rate {config.noise_rate:g} asked for {planner.noise_requested} mismatched "
            f"pairs; only {len(planner.noise_permutation())} can get a caption of another label or text (one "
            "label holds most of the items); the manifest records the pairs made",
            file=sys.stderr,
        )
    if planner.unused_label_columns:
        column = sorted(planner.unused_label_columns)[0]
        print(
            "warning: --noise-rate without --label-column: a noisy pair gets a caption with other text, "
            "which can name its own class in other words (a matched pair recorded as noisy); column "
            f"{column!r} looks like a class label: pass --label-column {column} so that every noisy pair "
            "gets another class's caption",
            file=sys.stderr,
        )
    part, parts = config.part or (0, 1)
    mine = [index for index in range(len(planner)) if index % parts == part]
    _remove_stale_temporaries(output, [shard_name(config.prefix, index) for index in mine], part, parts)

    records, todo = [], []
    for index in mine:
        record = finished_record(output, shard_name(config.prefix, index), planner.shard_items(index))
        (records.append(record) if record else todo.append(index))

    job = ShardJob(
        config=config,
        class_index={name: i for i, name in enumerate(class_names or [])},
        noise_active=config.noise_rate > 0,
    )
    total_items = sum(planner.shard_items(index) for index in mine)
    done_items = sum(r["items"] for r in records)
    errors = sum(len(r["errors"]) for r in records)
    bar = tqdm(
        total=total_items,
        initial=done_items,
        unit="item",
        desc=f"sharding {output.name}",
        disable=not progress or None,
        file=sys.stderr,
    )
    plans = (planner.shard(index) for index in todo)  # read back as the distributor takes them
    reasons = Counter(e["reason"] for r in records for e in r["errors"])
    with bar:
        for done in run_shard_tasks(plans, len(todo), job, config.workers, config.distributor):
            if done.record is not None:
                records.append(done.record)
            done_items += done.items
            errors += len(done.errors)
            reasons.update(e["reason"] for e in done.errors)
            bar.update(done.items)
            bar.set_postfix(skipped=errors)
            if done_items and errors / done_items > config.max_error_rate:
                raise ShardingAborted(
                    f"{errors} of {done_items} items skipped ({errors / done_items:.1%}) exceeds "
                    f"--max-error-rate {config.max_error_rate:g}; reasons: {dict(reasons)}. Finished shards "
                    f"are kept in {output}; fix the input or raise --max-error-rate, then re-run to resume"
                )

    header = {
        "modality": config.modality,
        "prefix": config.prefix,
        "planned_shards": len(planner),
        "class_names": class_names,
        "noise": {
            "rate": config.noise_rate,
            "seed": config.seed,
            "noisy_pairs": len(permutation := planner.noise_permutation()),
            "permutation": [list(pair) for pair in permutation],
        }
        if config.noise_rate > 0
        else None,
        "options": config.output_options(),
    }
    write_part(output, part, parts, header, records)
    if parts == 1:
        return merge_parts(output)
    return {"part": part, "parts": parts, "shards": len(records), "samples": sum(r["count"] for r in records)}
