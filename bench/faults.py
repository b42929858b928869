"""Fault-injection suite: bad inputs, kill -9, damaged files and hostile configs, nothing lost.

Run from the repository root with the project venv:

    .venv/bin/python bench/faults.py                                   # 10 sharding + 5 training kill trials
    .venv/bin/python bench/faults.py --sharding-trials 3 --training-trials 1 --only sharding

Every scenario runs the real `mmcl` commands in subprocesses, as a user would, on inputs generated under
--work-dir (default bench/out/faults/, git-ignored; rebuilt each run):

  sharding  a corpus of bad inputs in three layouts (CSV manifest, COCO, audio folder): each bad item must be
            skipped with the expected reason in manifest.json's errors_by_reason and _errors.jsonl, and every
            good item must be in the shards (the `source` of every sample's .json is compared, as a multiset,
            with the good inputs). Then kill -9 at random points of a sharding run, re-run the same command:
            manifest.json, sizes.json, _errors.jsonl and every tar must equal an uninterrupted run's, byte for
            byte.
  training  a truncated and a corrupted shard in the stream (training completes, warnings, bad_samples
            counted, every readable good sample of the epoch trained on); kill -9 at random steps (and once
            while a checkpoint is being written) then resume: final model.safetensors equal to an
            uninterrupted run's (torch.equal, every tensor) and metrics.jsonl with each step once; SIGTERM:
            exit 0, saved, resumes identically; a damaged newest checkpoint (no COMPLETE, truncated weights, a
            pickle bomb as optimizer.pt, garbage state.json): the previous one is used and the result is still
            identical.
  loading   a pickle bomb is never executed (auto resume, train.resume, model.pretrained); pipe: shard URLs
            are refused unless data.allow_pipe, also when a shard *file name* starts with pipe: (folder
            listing).
  config    a matrix of invalid configs: exit code 2, one message per problem naming the key, no traceback.

Results: a table on stdout and WORK_DIR/results.json (every trial with where its kill landed). The exit status
is 1 when any check failed. Training runs use OMP_NUM_THREADS=1 (CPU, deterministic, and fair to a shared
machine).

The corpora and their checks are tests/fault_corpora.py (sharding) and tests/fault_training.py (training),
which tests/test_faults.py runs the cheap, deterministic parts of.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from fault_corpora import (  # noqa: E402
    PWNED,
    build_audio_corpus,
    build_coco_corpus,
    build_image_corpus,
    build_kill_corpus,
    check_corpus_output,
    leftover_temporaries,
    manifest_hashes_hold,
    output_digest,
)
from fault_training import (  # noqa: E402
    CHECKPOINT_EVERY,
    CONFIG_CASES,
    DAMAGES,
    TRAIN_STEPS,
    build_train_shards,
    check_bad_sample_metric,
    check_elastic_epoch,
    check_epoch,
    check_resumed_run,
    config_case_files,
    damage_checkpoint,
    damage_shards,
    epoch_keys,
    logged_step,
    make_pickle_bomb,
    metrics_rows,
    run_config_case,
    train_config,
    train_env,
    trained_keys,
    usable_keys,
)
from host import machine_line  # noqa: E402
from processes import cpu_launch_env, kill9, mmcl_command, run_mmcl  # noqa: E402

# ================================================================================================ processes


def mmcl(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mmcl ARGS` as a user runs it, whatever its exit status; 15 minutes is a hang."""
    return run_mmcl(*args, check=False, cwd=cwd, env=env, timeout=900)


def start_mmcl(
    *args: str, cwd: Path = REPO, env: dict | None = None, log: Path | None = None
) -> subprocess.Popen:
    """Start `mmcl ARGS` in its own process group (so the whole tree can be killed), output to `log`."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [sys.executable, "-m", "mmcl", *map(str, args)],
        cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip


def wait_for(
    predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float, poll: float = 0.005
) -> bool:
    """Poll until `predicate()` or the process exits; True if the predicate held while it still ran."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return proc.poll() is None
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


# ================================================================================================ results


@dataclass
class Row:
    """One line of the results table."""

    area: str
    scenario: str
    inputs: int = 0  # inputs tried: items, samples or configs
    faults: int = 0  # faults injected
    runs: int = 0  # runs (trials) attempted
    survived: int = 0  # runs that ended as specified
    lost: int | None = 0  # samples lost (None: not applicable)
    problems: list[str] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.survived == self.runs and not self.lost


def print_table(rows: list[Row]) -> str:
    header = "| area | scenario | inputs tried | faults injected | runs survived | samples lost | result |"
    lines = [header, "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lost = "n/a" if r.lost is None else str(r.lost)
        lines.append(
            f"| {r.area} | {r.scenario} | {r.inputs} | {r.faults} | {r.survived}/{r.runs} | {lost} | "
            f"{'OK' if r.ok else 'FAIL'} |"
        )
    total_faults = sum(r.faults for r in rows)
    lines.append(
        f"| **all** | | {sum(r.inputs for r in rows)} | {total_faults} | "
        f"{sum(r.survived for r in rows)}/{sum(r.runs for r in rows)} | "
        f"{sum(r.lost or 0 for r in rows)} | {'OK' if all(r.ok for r in rows) else 'FAIL'} |"
    )
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ================================================================================================ sharding


def bench_bad_inputs(work: Path) -> list[Row]:
    rows = []
    builders = (build_image_corpus, build_coco_corpus, build_audio_corpus)
    for name, builder in zip(("image_csv", "coco", "audio"), builders, strict=True):
        corpus = builder(work / "inputs" / name)
        row = Row("sharding", f"bad inputs: {corpus.name}", runs=1)
        for workers in (2,):
            out = work / "shards" / f"{name}-w{workers}"
            result = mmcl(*corpus.shard_args(out, workers))
            crashed = result.returncode != 0 or "Traceback" in result.stderr
            if crashed:
                row.problems.append(f"exit {result.returncode}: {result.stderr[-800:]}")
                continue
            check = check_corpus_output(out, corpus)
            verify = mmcl("shard", "verify", out)
            if verify.returncode != 0:
                check["problems"].append(f"mmcl shard verify: {verify.stdout[-400:]}")
            if (corpus.input.parent / PWNED).exists():
                check["problems"].append("the pipe: row ran its command")
            row.inputs, row.faults, row.lost = check["inputs"], check["faults"], check["lost"]
            row.problems += check["problems"]
            row.survived += not check["problems"]
            row.details.append({"workers": workers, **check})
        log(f"{row.scenario}: {row.survived}/{row.runs} {'OK' if row.ok else row.problems}")
        rows.append(row)
    return rows


def sharding_command(manifest: Path, out: Path) -> list[str]:
    """The sharding run that the kill trials interrupt: 2 workers, shards of 10, images to 128 pixels."""
    return ["shard", "image-text", "--input", str(manifest), "--output", str(out), "--quiet",
            "--shard-size", "10", "--workers", "2", "--image-size", "128"]  # fmt: skip


def bench_sharding_kills(work: Path, trials: int, rng: random.Random, images: int) -> Row:
    manifest = build_kill_corpus(work / "inputs" / "kill", images)
    reference = work / "shards" / "kill-reference"
    timeline = sharding_timeline(manifest, reference, work / "logs" / "kill-reference.log")
    if timeline is None:
        return Row("sharding", "kill -9 at random points, re-run", problems=["the reference run failed"])
    ready, work_s = timeline
    expected = output_digest(reference)
    items = sum(1 for _ in manifest.open()) - 1
    samples = json.loads((reference / "manifest.json").read_text())["totals"]["samples"]
    log(f"sharding reference: {items} items, {samples} samples, {len(expected) - 3} shards, "
        f"start-up {ready:.1f} s, work {work_s:.1f} s")  # fmt: skip
    row = Row("sharding", f"kill -9 at random points, re-run ({items} items, 2 workers)", inputs=items)
    for trial in range(trials):
        out = work / "shards" / f"kill-{trial}"
        landed = []
        for k in range(2 if trial % 4 == 3 else 1):
            kill_log = work / "logs" / f"kill-{trial}-{k}.log"
            kill = kill_sharding_run(manifest, out, work_s, rng, (trial + k) % 2 == 1, kill_log)
            if kill is not None:
                landed.append(kill)
                row.faults += 1
        trial_problems = rerun_problems(manifest, out, expected, landed)
        row.runs += 1
        row.survived += not trial_problems
        row.problems += [f"trial {trial}: {p}" for p in trial_problems]
        row.details.append({"trial": trial, "kills": landed, "identical": not trial_problems})
        kills = [(k["delay_after_start_s"], k["shards_recorded_at_kill"]) for k in landed]
        log(
            f"sharding kill trial {trial}: kills {kills}"
            f" -> {'identical' if not trial_problems else trial_problems}"
        )
        shutil.rmtree(out, ignore_errors=True)
    return row


def sharding_timeline(manifest: Path, reference: Path, log_path: Path) -> tuple[float, float] | None:
    """An uninterrupted run into `reference`: (its start-up s, until _progress/options.json appears; its work
    s, reading, planning, writing every shard and merging, until manifest.json appears); None if it failed."""
    started = time.time()
    proc = start_mmcl(*sharding_command(manifest, reference), log=log_path)
    wait_for(lambda: (reference / "_progress" / "options.json").exists(), proc, 600)
    ready = time.time()
    wait_for(lambda: (reference / "manifest.json").exists(), proc, 600)
    work_s = time.time() - ready
    proc.wait()
    return None if proc.returncode != 0 else (ready - started, work_s)


def kill_sharding_run(
    manifest: Path, out: Path, work_s: float, rng: random.Random, whole_group: bool, log_path: Path
) -> dict | None:
    """Start the sharding run into `out` and kill -9 it at a random point of its work (retried with another
    point when the run finished first, up to 5 times); returns where the kill landed, None if it never did."""
    for _attempt in range(5):
        delay = rng.uniform(0, work_s * 1.02)
        proc = start_mmcl(*sharding_command(manifest, out), log=log_path)
        running = wait_for(lambda: (out / "_progress" / "options.json").exists(), proc, 600)
        time.sleep(delay)
        if not running or proc.poll() is not None:
            proc.wait()  # finished before the kill: try again with another delay
            shutil.rmtree(out, ignore_errors=True)
            continue
        done = len(list((out / "_progress").glob("*.tar.json")))
        orphans = kill9(proc, whole_group, grace=2.0)
        return {
            "delay_after_start_s": round(delay, 3),
            "shards_recorded_at_kill": done,
            "temporaries_at_kill": len(leftover_temporaries(out)),
            "manifest_written": (out / "manifest.json").exists(),
            "killed": "process group" if whole_group else "main process only",
            "orphans_left_running": len(orphans),
        }
    return None


def rerun_problems(manifest: Path, out: Path, expected: dict[str, str], landed: list[dict]) -> list[str]:
    """Re-run the killed sharding run: its output must equal the uninterrupted run's, byte for byte."""
    rerun = mmcl(*sharding_command(manifest, out))
    digest = output_digest(out) if rerun.returncode == 0 else {}
    problems = []
    if rerun.returncode != 0:
        problems.append(f"re-run exit {rerun.returncode}: {rerun.stderr[-400:]}")
    elif digest != expected:
        differ = sorted(n for n in set(digest) | set(expected) if digest.get(n) != expected.get(n))
        problems.append(f"output differs from the uninterrupted run: {differ[:5]}")
    elif not manifest_hashes_hold(out):
        problems.append("a shard's sha256 differs from manifest.json")
    if leftover_temporaries(out):
        problems.append(f"temporaries left: {leftover_temporaries(out)[:3]}")
    if any(k["orphans_left_running"] for k in landed):
        problems.append("pool workers outlived the killed process")
    return problems


# ================================================================================================ training


def checkpoint_state(run: Path) -> dict:
    """The run's checkpoint folders: complete ones, partial ones (no COMPLETE marker) and temporary ones."""
    root = run / "checkpoints"
    if not root.exists():
        return {"complete": [], "partial": [], "temporary": []}
    return {
        "complete": sorted(p.name for p in root.glob("step-*") if (p / "COMPLETE").exists()),
        "partial": sorted(p.name for p in root.glob("step-*") if not (p / "COMPLETE").exists()),
        "temporary": sorted(p.name for p in root.glob(".step-*")),
    }


def bench_training(work: Path, trials: int, elastic_trials: int, rng: random.Random) -> list[Row]:
    env = train_env()
    shards = build_train_shards(work / "train")
    reference = work / "runs" / "reference"
    config = train_config(work / "configs" / "reference.yaml", shards, reference)
    started = time.time()
    result = mmcl("train", "--config", config, env=env)
    if result.returncode != 0:
        return [Row("training", "reference run", problems=[result.stderr[-1000:]])]
    log(f"training reference: {TRAIN_STEPS} steps in {time.time() - started:.0f} s")
    return [
        bench_bad_shards(work, shards, env),
        bench_training_kills(work, shards, reference, env, trials, rng),
        bench_elastic_kills(work, shards, env, elastic_trials, rng),
        bench_sigterm(work, shards, reference, env, rng),
        bench_damaged_checkpoints(work, shards, reference, env),
    ]


def bench_training_kills(
    work: Path, shards: Path, reference: Path, env: dict, trials: int, rng: random.Random
) -> Row:
    """kill -9 at random steps (the first kill of the first trial while a checkpoint is written), resume."""
    step_s = statistics.median(
        8 / r["samples_per_s"] for r in metrics_rows(reference)
    )  # one step's wall time
    row = Row("training", f"kill -9 at random steps, resume ({TRAIN_STEPS} steps, 2 loader workers)")
    for trial in range(trials):
        run = work / "runs" / f"kill-{trial}"
        cfg = train_config(work / "configs" / f"kill-{trial}.yaml", shards, run)
        landed = []
        for k in range(2 if trial % 3 == 2 else 1):
            proc = start_mmcl(
                "train", "--config", cfg, env=env, log=work / "logs" / f"train-kill-{trial}-{k}.log"
            )
            landed.append(
                kill_training_run(proc, run, step_s, rng, trial == 0 and k == 0, (trial + k) % 2 == 0)
            )
        row.faults += sum(not kill.get("missed") for kill in landed)
        resumed = mmcl("train", "--config", cfg, env=env)
        problems = resume_problems(resumed, run, reference, landed)
        resumed_from = next(
            (line for line in resumed.stdout.splitlines() if "resumed from" in line), "fresh start"
        )
        row.runs += 1
        row.survived += not problems
        row.problems += [f"trial {trial}: {p}" for p in problems]
        row.details.append(
            {"trial": trial, "kills": landed, "resume": resumed_from, "identical": not problems}
        )
        log(f"training kill trial {trial}: {[(k['target'], k.get('logged_step_at_kill')) for k in landed]}; "
            f"{resumed_from.strip()} -> {'identical' if not problems else problems}")  # fmt: skip
    row.inputs = TRAIN_STEPS * 8 * row.runs
    return row


LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2)]  # (processes, loader workers)


def saved_and_past(run: Path, step: int) -> bool:
    """The run has a complete checkpoint and has logged `step`."""
    return bool(checkpoint_state(run)["complete"]) and logged_step(run) >= step


def bench_elastic_kills(work: Path, shards: Path, env: dict, trials: int, rng: random.Random) -> Row:
    """kill -9 a run on one layout of processes x loader workers at a random step after its first checkpoint,
    resume on another layout: every sample of epoch 0 trained on exactly once (train.log_sample_keys)."""
    steps = 2 * TRAIN_STEPS  # 2 to 4 epochs, so that kills land in every epoch
    row = Row("training", f"kill -9, resume on other processes x workers ({steps} steps)")
    env = cpu_launch_env(env)
    expected = usable_keys(shards)
    for trial in range(trials):
        before = rng.choice(LAYOUTS)
        after = rng.choice([layout for layout in LAYOUTS if layout != before])
        run = work / "runs" / f"elastic-{trial}"
        configs = [
            train_config(
                work / "configs" / f"elastic-{trial}-{i}.yaml",
                shards,
                run,
                data={"workers": workers},
                train={"steps": steps, "log_sample_keys": True, "checkpoint_every": 3},
            )  # fmt: skip
            for i, (_, workers) in enumerate((before, after))
        ]
        log_path = work / "logs" / f"elastic-{trial}.log"
        with open(log_path, "w") as out:
            proc = subprocess.Popen(
                mmcl_command(before[0], "train", "--config", configs[0]),
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
            step = rng.randint(4, steps - 6)
            hit = wait_for(partial(saved_and_past, run, step), proc, 900)
            time.sleep(rng.uniform(0, 0.05))  # within the next step or two (a micro step takes ~50 ms)
            if not hit or proc.poll() is not None:
                proc.wait()
                row.runs += 1
                row.problems.append(f"trial {trial}: the run ended before its kill (see {log_path})")
                continue
            kill = {"logged_step_at_kill": logged_step(run), **checkpoint_state(run)}
            orphans = kill9(proc, whole_group=True, grace=10.0)
        row.faults += 1
        resumed = subprocess.run(
            mmcl_command(after[0], "train", "--config", configs[1]),
            cwd=REPO, capture_output=True, text=True, env=env, timeout=900,
        )  # fmt: skip
        problems = (
            [f"resume exit {resumed.returncode}: {resumed.stderr[-600:]}"] if resumed.returncode else []
        )
        if not problems:
            problems = check_elastic_epoch(run, expected)
            if "elastic resume" not in resumed.stdout:
                problems.append("the resumed run did not report an elastic resume")
            logged = [r["step"] for r in metrics_rows(run)]
            if logged != list(range(1, steps + 1)):
                problems.append(f"metrics.jsonl steps {logged}")
        if orphans:
            problems.append("loader workers outlived the killed process")
        row.runs += 1
        row.survived += not problems
        row.lost += len(expected) - len({k for e, k in trained_keys(run) if e == 0} & expected)
        row.problems += [f"trial {trial}: {p}" for p in problems]
        row.details.append({"trial": trial, "before": before, "after": after, **kill, "ok": not problems})
        outcome = problems or "each sample once"
        log(f"elastic kill trial {trial}: {before} killed after step {kill['logged_step_at_kill']} "
            f"(checkpoints {kill['complete']}), resumed on {after} -> {outcome}")  # fmt: skip
    row.inputs = sum(len(trained_keys(work / "runs" / f"elastic-{t}")) for t in range(trials))
    return row


def kill_training_run(
    proc: subprocess.Popen, run: Path, step_s: float, rng: random.Random, during_save: bool, whole_group: bool
) -> dict:
    """kill -9 the training run `proc` (writing to `run`) while it writes a checkpoint (`during_save`), else
    within the step after a random one it has not logged yet, else during start-up; returns where it
    landed."""
    if during_save:  # the moment a checkpoint folder is being written
        target = "while a checkpoint is written"
        hit = wait_for(lambda: any((run / "checkpoints").glob(".step-*")), proc, 600, poll=0.001)
        delay = 0.0
    elif logged_step(run) + 1 <= TRAIN_STEPS - 1:
        step = rng.randint(logged_step(run) + 1, TRAIN_STEPS - 1)
        target = f"after step {step}"
        hit = wait_for(lambda: logged_step(run) >= step, proc, 600)
        delay = rng.uniform(0, step_s)  # lands within the next step or its checkpoint
        time.sleep(delay)
    else:
        target, hit, delay = "during start-up", True, rng.uniform(0, 3.0)
        time.sleep(delay)
    if not hit or proc.poll() is not None:
        proc.wait()
        return {"target": target, "missed": True}
    state = checkpoint_state(run)
    orphans = kill9(proc, whole_group, grace=10.0)  # loader workers poll every 5 s
    return {
        "target": target, "extra_delay_s": round(delay, 3), "logged_step_at_kill": logged_step(run), **state,
        "orphans_left_running": len(orphans),
    }  # fmt: skip


def resume_problems(
    resumed: subprocess.CompletedProcess, run: Path, reference: Path, landed: list[dict]
) -> list[str]:
    """What is wrong with a run resumed after its kills: it must equal the uninterrupted `reference`."""
    if resumed.returncode != 0:
        problems = [f"resume exit {resumed.returncode}: {resumed.stderr[-600:]}"]
    else:
        problems = check_resumed_run(run, reference)
        if checkpoint_state(run)["temporary"]:
            problems.append(f"temporary checkpoint folders left: {checkpoint_state(run)['temporary']}")
    if any(k.get("orphans_left_running") for k in landed):
        problems.append("loader workers outlived the killed process")
    return problems


def bench_sigterm(work: Path, shards: Path, reference: Path, env: dict, rng: random.Random) -> Row:
    row = Row("training", "SIGTERM mid-run: saved, exit 0, resume", runs=1)
    run = work / "runs" / "sigterm"
    cfg = train_config(work / "configs" / "sigterm.yaml", shards, run)
    proc = start_mmcl("train", "--config", cfg, env=env, log=work / "logs" / "sigterm.log")
    step = rng.randint(1, TRAIN_STEPS - 2)
    if not wait_for(lambda: logged_step(run) >= step, proc, 600):
        proc.wait()
        row.problems.append("the run ended before SIGTERM")
        return row
    os.kill(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=300)
    text = (work / "logs" / "sigterm.log").read_text()
    saved = checkpoint_state(run)["complete"]
    row.faults = 1
    if code != 0 or "stop requested" not in text:
        row.problems.append(
            f"exit {code}, 'stop requested' {'in' if 'stop requested' in text else 'not in'} the log"
        )
    resumed = mmcl("train", "--config", cfg, env=env)
    if resumed.returncode != 0:
        row.problems.append(f"resume exit {resumed.returncode}")
    else:
        row.problems += check_resumed_run(run, reference)
    row.survived = int(not row.problems)
    row.inputs = TRAIN_STEPS * 8
    row.details.append({"sigterm_after_step": step, "saved": saved[-1:] if saved else None})
    log(f"SIGTERM after step {step}: exit {code}, saved {saved[-1:]} -> {'OK' if row.ok else row.problems}")
    return row


def bench_damaged_checkpoints(work: Path, shards: Path, reference: Path, env: dict) -> Row:
    """The reference run without its final checkpoint and its newest one damaged: resume uses the one
    before."""
    row = Row("training", "damaged newest checkpoint: previous one used")
    newest, previous = (
        f"step-{TRAIN_STEPS - CHECKPOINT_EVERY:08d}",
        f"step-{TRAIN_STEPS - 2 * CHECKPOINT_EVERY:08d}",
    )
    for index, how in enumerate(DAMAGES):
        run = work / "runs" / f"damaged-{index}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(reference, run)
        shutil.rmtree(run / "checkpoints" / f"step-{TRAIN_STEPS:08d}")
        marker = run / PWNED
        damage_checkpoint(run / "checkpoints" / newest, how, marker)
        cfg = train_config(work / "configs" / f"damaged-{index}.yaml", shards, run)
        result = mmcl("train", "--config", cfg, env=env)
        problems = [] if result.returncode == 0 else [f"exit {result.returncode}: {result.stderr[-500:]}"]
        output = result.stdout + result.stderr
        if f"resumed from {run / 'checkpoints' / previous}" not in output:
            problems.append(f"did not resume from {previous}")
        if how != "no COMPLETE marker" and f"{newest} is damaged" not in output:
            problems.append("no warning naming the damaged checkpoint")
        if marker.exists():
            problems.append("the pickle bomb ran")
        if not problems:
            problems = check_resumed_run(run, reference)
        row.runs += 1
        row.faults += 1
        row.survived += not problems
        row.problems += [f"{how}: {p}" for p in problems]
        warning = next((line for line in output.splitlines() if "damaged" in line), "")
        row.details.append({"damage": how, "warning": warning[:300], "ok": not problems})
        log(f"damaged checkpoint ({how}) -> {'OK' if not problems else problems}")
    row.inputs = row.runs * TRAIN_STEPS * 8
    return row


def bench_bad_shards(work: Path, shards: Path, env: dict) -> Row:
    damaged = work / "train" / "damaged"
    facts = damage_shards(shards, damaged)
    row = Row("training", "truncated + corrupt shard in the stream", runs=2, faults=1 + facts["bad"])
    row.inputs = sum(json.loads((shards / "sizes.json").read_text()).values())
    cfg = train_config(work / "configs" / "damaged-shards.yaml", damaged, work / "runs" / "damaged-shards")
    keys, boundary, bad = epoch_keys(cfg)
    row.problems += check_epoch(keys, boundary, bad, facts)
    row.lost = len(facts["good_keys"] - set(keys) - boundary)
    row.survived += not row.problems
    result = mmcl("train", "--config", cfg, env=env)
    rows = metrics_rows(work / "runs" / "damaged-shards")
    counts = [r["bad_samples"] for r in rows]
    problems = []
    if result.returncode != 0:
        problems.append(f"training exit {result.returncode}: {result.stderr[-500:]}")
    elif len(rows) != TRAIN_STEPS:
        problems.append(f"{len(rows)} metrics rows")
    else:
        problems += check_bad_sample_metric(work / "runs" / "damaged-shards", facts, result.stderr)
    row.problems += problems
    row.survived += not problems
    reported = truncation_reported(shards / facts["truncated"], work / "train")
    row.details.append({"epoch_samples": len(keys), "usable_good": len(facts["good_keys"]),
                        "bad_samples_by_step": counts, "truncation_warned": reported,
                        **{k: facts[k] for k in ("truncated", "corrupted")}})  # fmt: skip
    log(f"damaged shards: {len(facts['good_keys'])} usable good samples, all in epoch 0: {not row.lost}, "
        f"bad_samples {counts} -> {'OK' if row.ok else row.problems}")  # fmt: skip
    return row


def truncation_reported(shard: Path, scratch: Path) -> dict[str, bool]:
    """Whether mmcl's tar stage (pipeline.keyed_samples) reports a copy of `shard` cut in the middle of a
    member's data, and one cut inside a 512-byte tar header block."""
    from mmcl.data.pipeline import keyed_samples

    with tarfile.open(shard) as archive:
        member = archive.getmembers()[len(archive.getmembers()) // 2]
    cuts = {
        "cut mid-member": member.offset_data + member.size // 2,
        "cut inside a header": member.offset + 100,
    }
    reported = {}
    for name, cut in cuts.items():
        copy = scratch / f"{name.replace(' ', '-')}.tar"
        copy.write_bytes(shard.read_bytes()[:cut])
        errors: list[Exception] = []
        list(keyed_samples([str(copy)], lambda err, errors=errors: errors.append(err) or True))
        reported[name] = bool(errors)
    return reported


# ============================================================================================ loading, config


def _config_matrix_main(work: str) -> int:
    """`faults.py _config-matrix WORK`: every case in this one process (imports paid once); JSON on stdout."""
    from mmcl.cli import main

    work_dir = Path(work)
    shards = work_dir / "train" / "shards4"
    base = train_config(
        work_dir / "configs" / "matrix-base.yaml", shards, work_dir / "runs" / "matrix", train={"steps": 4}
    )
    files = config_case_files(work_dir / "config-cases", shards)
    results = [run_config_case(case, base, work_dir / "config-cases", files, main) for case in CONFIG_CASES]
    sys.stdout.write("\n" + json.dumps(results) + "\n")
    return 0


def bench_loading_and_config(work: Path, env: dict) -> list[Row]:
    shards4 = build_train_shards(work / "train4", count=48, shard_size=12)
    shutil.rmtree(work / "train" / "shards4", ignore_errors=True)
    shutil.copytree(shards4, work / "train" / "shards4")
    base = work / "configs" / "matrix-base.yaml"  # written by the matrix
    return [bench_config_matrix(work, env, base), bench_loading(work, env, base, shards4)]


def bench_config_matrix(work: Path, env: dict, base: Path) -> Row:
    """The invalid-config matrix, in one process; then the real exit status of two of its cases."""
    result = subprocess.run(
        [sys.executable, __file__, "_config-matrix", str(work)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    cases = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else []
    row = Row("config", "invalid configs: exit 2, one message, no traceback", inputs=len(CONFIG_CASES),
              faults=len(CONFIG_CASES), runs=len(CONFIG_CASES), lost=None)  # fmt: skip
    if not cases:
        row.problems.append(f"the matrix crashed: {result.stderr[-800:]}")
    for case in cases:
        row.survived += case["ok"]
        if not case["ok"]:
            row.problems.append(f"{case['case']}: exit {case['exit']}: {case['message']}")
        if case["pwned"]:
            row.problems.append(f"{case['case']}: a command or pickle ran")
    for overrides, expected in ((["optim.learning_rate=1"], "unknown key"), (["data.workers=5"], "readers")):
        real = mmcl("train", "--config", base, *overrides, env=env)
        row.runs += 1
        row.inputs += 1
        row.faults += 1
        fine = real.returncode == 2 and expected in real.stderr and "Traceback" not in real.stderr
        row.survived += fine
        if not fine:
            row.problems.append(f"real process {overrides}: exit {real.returncode}: {real.stderr[-300:]}")
    row.details = cases
    log(f"config matrix: {row.survived}/{row.runs} -> {'OK' if row.ok else row.problems}")
    return row


def bench_loading(work: Path, env: dict, base: Path, shards4: Path) -> Row:
    """Pickle bombs everywhere mmcl reads a torch file; pipe: URLs in configs and in file names."""
    load = Row("loading", "pickle bombs and shell-executing URLs refused", lost=None)
    bombs = work / "loading"
    bombs.mkdir(parents=True, exist_ok=True)
    marker = bombs / PWNED
    bomb = make_pickle_bomb(bombs / "weights.pt", marker)
    bomb_dir = bombs / "checkpoints" / "step-00000003"
    bomb_dir.mkdir(parents=True, exist_ok=True)
    for name in ("optimizer.pt", "rng.pt"):
        make_pickle_bomb(bomb_dir / name, marker)
    (bomb_dir / "state.json").write_text("{}")
    (bomb_dir / "COMPLETE").write_text("ok\n")
    checks = {
        "model.pretrained=<pickle bomb .pt>": mmcl(
            "train",
            "--config",
            base,
            f"model.pretrained={bomb}",
            f"run.output_dir={bombs / 'run-a'}",
            env=env,
        ),
        "train.resume=<checkpoint with pickle bombs>": mmcl(
            "train",
            "--config",
            base,
            f"train.resume={bomb_dir}",
            f"run.output_dir={bombs / 'run-b'}",
            env=env,
        ),
        "pipe: URL without data.allow_pipe": mmcl(
            "train", "--config", base, "--check", f"data.sources=[{{urls: 'pipe:touch {marker}'}}]", env=env
        ),
    }
    for name, res in checks.items():
        load.runs += 1
        load.faults += 1
        fine = res.returncode == 2 and "Traceback" not in res.stderr and not marker.exists()
        if name.startswith("pipe") and "data.allow_pipe" not in res.stderr:
            fine = False
        if "pickle" in name and "refused by torch.load(weights_only=True)" not in res.stderr:
            fine = False
        load.survived += fine
        load.details.append({"case": name, "exit": res.returncode, "message": res.stderr.strip()[-300:]})
        if not fine:
            load.problems.append(
                f"{name}: exit {res.returncode}, executed: {marker.exists()}: {res.stderr[-300:]}"
            )
    pipe_named_shard(load, bombs, shards4, env)
    load.inputs = load.runs
    log(f"loading: {load.survived}/{load.runs} -> {'OK' if load.ok else load.problems}")
    return load


def pipe_named_shard(load: Row, bombs: Path, shards4: Path, env: dict) -> None:
    """A shard whose *file name* starts with pipe: in a folder source "." is read as a file, not run."""
    folder = bombs / "cwd"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for i, tar in enumerate(sorted(shards4.glob("*.tar"))):
        name = f"pipe:touch {PWNED}.tar" if i == 0 else tar.name
        shutil.copy(tar, folder / name)
    cfg = train_config(bombs / "cwd.yaml", ".", bombs / "run-c", train={"steps": 4})
    res = mmcl("train", "--config", cfg, cwd=folder, env=env)
    load.runs += 1
    load.faults += 1
    fine = res.returncode == 0 and not (folder / f"{PWNED}.tar").exists() and "skipped" not in res.stderr
    load.survived += fine
    load.details.append(
        {
            "case": "shard file named 'pipe:touch PWNED.tar' in folder source '.'",
            "exit": res.returncode,
            "command_ran": (folder / f"{PWNED}.tar").exists(),
        }
    )
    if not fine:
        load.problems.append(
            f"pipe: file name: exit {res.returncode}, ran: {(folder / f'{PWNED}.tar').exists()}"
        )


# ================================================================================================ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--sharding-trials", type=int, default=10, help="kill -9 trials of a sharding run")
    parser.add_argument("--training-trials", type=int, default=5, help="kill -9 trials of a training run")
    parser.add_argument(
        "--elastic-trials", type=int, default=10, help="kill -9 trials resumed on other processes x workers"
    )
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "out" / "faults")
    parser.add_argument("--images", type=int, default=400, help="images in the sharding kill corpus")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    parser.add_argument("--json", type=Path, help="results file (default WORK_DIR/results.json)")
    parser.add_argument(
        "--only", nargs="+", choices=("sharding", "training", "loading"), help="some areas only"
    )
    args = parser.parse_args(argv)
    work = Path(os.path.abspath(args.work_dir))
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    rng = random.Random(args.seed)
    areas = set(args.only or ("sharding", "training", "loading"))
    started = time.time()
    info = machine_line()
    log(f"fault injection in {work} on {info}")

    rows: list[Row] = []
    if "sharding" in areas:
        rows += bench_bad_inputs(work)
        rows.append(bench_sharding_kills(work, args.sharding_trials, rng, args.images))
    if "training" in areas:
        rows += bench_training(work, args.training_trials, args.elastic_trials, rng)
    if "loading" in areas:
        rows += bench_loading_and_config(work, train_env())

    table = print_table(rows)
    elapsed = time.time() - started
    print(f"\n{table}\n\n{elapsed / 60:.1f} min on {info}")
    for row in rows:
        for problem in row.problems:
            print(f"FAIL {row.scenario}: {problem}")
    results = {
        "command": "python bench/faults.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "elapsed_s": round(elapsed, 1),
        "ok": all(r.ok for r in rows),
        "table": table,
        "rows": [{**r.__dict__, "ok": r.ok} for r in rows],
    }
    path = args.json or work / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {path}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_config-matrix":
        raise SystemExit(_config_matrix_main(sys.argv[2]))
    raise SystemExit(main())
