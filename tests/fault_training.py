"""Training runs with a known answer, for fault injection: micro shards and config, checks that a resumed
run equals an uninterrupted one, damaged checkpoints and shards, what one epoch of the stream must hold, and
a matrix of invalid configs with the message each must give.

tests/test_faults.py runs the cheap, deterministic cases in-process; bench/faults.py runs them through the
real CLI and kills training runs at random steps. tests/fault_corpora.py holds the sharding side.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from fault_corpora import PWNED
from media_files import COLOURS, make_image

IMAGE_EXTENSIONS = ("jpg", "png", "webp")
TRAIN_STEPS = 24
CHECKPOINT_EVERY = 4


def build_train_shards(
    root: Path,
    count: int = 96,
    shard_size: int = 12,
    *,
    size: tuple[int, int] = (40, 40),
    noise_rate: float = 0.0,
    labels: bool = False,
) -> Path:
    """`count` size[0] x size[1] images of coloured squares captioned with their colour, sharded in-process
    into count/shard_size shards under root/shards; `noise_rate`: that share of the captions swapped (marked
    noisy in each .json); `labels`: the colour as each sample's class."""
    from shards_tools.config import build_config
    from shards_tools.run import run_sharding

    rows = []
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        make_image(root / "in" / f"{i:03d}.png", colour, size=size, seed=i)
        rows.append(f"{i:03d}.png,a photo of a {colour} square" + (f",{colour}\n" if labels else "\n"))
    (root / "in" / "m.csv").write_text("path,caption" + (",label\n" if labels else "\n") + "".join(rows))
    out = root / "shards"
    inputs = {
        "modality": "image",
        "path": root / "in" / "m.csv",
        **({"label_column": "label"} if labels else {}),
    }
    config = {
        "input": inputs,
        "output": out,
        "shard_size": shard_size,
        "workers": 1,
        "noise_rate": noise_rate,
    }
    run_sharding(build_config(config), progress=False)
    return out


def train_config(path: Path, shards: Path | str, output: Path, **sections) -> Path:
    """A micro image-text recipe: CPU, 2 loader workers, a checkpoint every CHECKPOINT_EVERY steps, every
    step logged; TRAIN_STEPS steps are 2 epochs of the 96-sample shards."""
    import yaml

    config = {
        "run": {"output_dir": str(output), "seed": 0},
        "model": {"modality": "image", "open_clip_name": "mmcl-micro-vit"},
        "data": {"sources": [{"urls": str(shards)}], "batch_size": 8, "workers": 2, "shuffle_buffer": 50},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": TRAIN_STEPS, "log_every": 1, "checkpoint_every": CHECKPOINT_EVERY, "keep_last": 3},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(run: Path, steps: int = TRAIN_STEPS) -> Path:
    return Path(run) / "checkpoints" / f"step-{steps:08d}" / "model.safetensors"


def check_resumed_run(run: Path, reference: Path, steps: int = TRAIN_STEPS) -> list[str]:
    """The run's final weights equal the reference's, and metrics.jsonl has each step once, same losses."""
    problems = []
    if not final_weights(run, steps).exists():
        return [f"no final checkpoint step-{steps:08d}"]
    same, detail = weights_equal(final_weights(run, steps), final_weights(reference, steps))
    if not same:
        problems.append(f"final weights differ: {detail}")
    rows, ref_rows = metrics_rows(run), metrics_rows(reference)
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl steps {[r['step'] for r in rows]}")
    elif [r["loss"] for r in rows] != [r["loss"] for r in ref_rows]:
        problems.append("metrics.jsonl losses differ from the uninterrupted run")
    return problems


def trained_keys(run: Path, until: int | None = None) -> list[tuple[int, str]]:
    """(epoch, key) of every sample the run trained on, from its train.log_sample_keys files (every rank),
    up to step `until` (None: all)."""
    keys = []
    for path in sorted((Path(run) / "sample_keys").glob("rank-*.jsonl")):
        for line in path.read_text("utf-8").splitlines():
            row = json.loads(line)
            if until is None or row["step"] <= until:
                keys += [(epoch, key) for epoch, key in row["samples"]]
    return keys


def check_elastic_epoch(run: Path, expected: set[str]) -> list[str]:
    """After a resume on other counts: every key of epoch 0 trained on exactly once, no (epoch, key) twice."""
    from collections import Counter

    keys = trained_keys(run)
    problems = []
    twice = [k for k, n in Counter(keys).items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} samples trained twice in one epoch, e.g. {twice[:3]}")
    epoch0 = {key for epoch, key in keys if epoch == 0}
    if epoch0 != expected:
        problems.append(f"epoch 0: {len(expected - epoch0)} samples lost, {len(epoch0 - expected)} unknown")
    return problems


def train_env() -> dict:
    """The environment of a training process: one OpenMP thread (CPU, deterministic, and fair to a shared
    machine), the Hugging Face hub offline."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def logged_step(run: Path) -> int:
    """The highest step metrics.jsonl shows (tolerates a line being written)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    step = 0
    for line in path.read_text("utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            step = max(step, int(json.loads(line)["step"]))
    return step


def make_pickle_bomb(path: Path, marker: Path) -> Path:
    """A torch file whose unpickling under weights_only=False runs code (creates `marker`)."""
    import torch

    class Bomb:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state": {0: {"exp_avg": Bomb()}}, "param_groups": []}, path)
    return path


def weights_equal(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two safetensors files hold the same tensors, compared with torch.equal."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return False, f"keys differ: {sorted(set(x) ^ set(y))[:5]}"
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    return not differ, f"{len(differ)} of {len(x)} tensors differ" + (
        f" (first: {differ[0]})" if differ else ""
    )


def metrics_rows(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()] if path.exists() else []


def damage_checkpoint(checkpoint: Path, how: str, marker: Path) -> None:
    if how == "no COMPLETE marker":
        (checkpoint / "COMPLETE").unlink()
    elif how == "model.safetensors truncated (COMPLETE kept)":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "optimizer.pt is a pickle bomb":
        make_pickle_bomb(checkpoint / "optimizer.pt", marker)
    elif how == "state.json is garbage":
        (checkpoint / "state.json").write_bytes(b"\x00{garbage")
    else:
        raise ValueError(how)


DAMAGES = (
    "no COMPLETE marker",
    "model.safetensors truncated (COMPLETE kept)",
    "optimizer.pt is a pickle bomb",
    "state.json is garbage",
)


def damage_shards(source: Path, target: Path) -> dict:
    """Copy shards, cut one in the middle of a member (as an interrupted copy or download leaves it) and
    corrupt 4 samples of another (2 undecodable images, an invalid JSON with no .txt caption, a JSON list).

    Returns the injected bad count, the keys a reader can still use (image and JSON wholly before the cut,
    the corrupted ones excepted) and the shard names."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    names = sorted(p.name for p in target.glob("*.tar"))
    truncated, corrupted = target / names[1], target / names[2]
    with tarfile.open(truncated) as archive:
        images = [m for m in archive.getmembers() if m.name.split(".", 1)[1] in IMAGE_EXTENSIONS]
    cut = images[len(images) // 2]  # halfway through the image of the middle sample
    truncated.write_bytes(truncated.read_bytes()[: cut.offset_data + cut.size // 2])
    with tarfile.open(corrupted) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    bad = {keys[0]: "image", keys[1]: "image", keys[2]: "json+txt", keys[3]: "jsonlist"}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for member, payload in members:
            key, ext = member.name.split(".", 1)
            what = bad.get(key)
            if what == "image" and ext in IMAGE_EXTENSIONS:
                payload = payload[:16] + b"\0" * 64
            elif what == "json+txt" and ext in ("json", "txt"):
                payload = b"{broken" if ext == "json" else b""
            elif what == "jsonlist" and ext == "json":
                payload = b"[1, 2]"
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))
    corrupted.write_bytes(out.getvalue())
    return {
        "bad": len(bad),
        "bad_keys": set(bad),
        "good_keys": usable_keys(target) - set(bad),
        "truncated": truncated.name,
        "corrupted": corrupted.name,
    }


def usable_keys(folder: Path) -> set[str]:
    """Keys of the samples whose image and .json (which holds the captions) lie wholly in the shard files."""
    usable: set[str] = set()
    for tar in sorted(Path(folder).glob("*.tar")):
        size, parts = tar.stat().st_size, {}
        with contextlib.suppress(tarfile.TarError, OSError), tarfile.open(tar) as archive:
            for member in archive:
                if member.offset_data + member.size <= size:
                    parts.setdefault(member.name.split(".")[0], set()).add(member.name.split(".", 1)[1])
        usable |= {key for key, exts in parts.items() if "json" in exts and exts & set(IMAGE_EXTENSIONS)}
    return usable


def epoch_keys(cfg_path: Path) -> tuple[list[str], set[str], set[str]]:
    """One epoch of the training stream (in-process, 0 workers): the keys of the batches wholly in epoch 0,
    the keys of the batch that crosses into epoch 1 (it holds the epoch's last samples), and the keys of
    the samples the stream skipped as bad (each is logged as a warning too)."""
    import torch

    from mmcl.config import load_train_config
    from mmcl.data.common import BadSample, log_and_continue
    from mmcl.data.pipeline import build_train_stream

    bad: set[str] = set()

    def handler(err: Exception) -> bool:
        if isinstance(err, BadSample):
            bad.add(err.key)
        return log_and_continue(err)

    cfg = load_train_config(cfg_path, ["data.workers=0"])
    stream = build_train_stream(
        cfg.data,
        modality="image",
        media_transform=lambda image: torch.zeros(3, 4, 4),
        tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
        handler=handler,
    )
    keys: list[str] = []
    for batch in stream:
        if batch["epoch"] > 0:
            return keys, set(batch["keys"]), bad
        keys += batch["keys"]
    raise AssertionError("the stream ended")


def check_epoch(keys: list[str], boundary: set[str], bad: set[str], facts: dict) -> list[str]:
    """Every usable good sample is in epoch 0 exactly once (the boundary batch may hold the last ones), and
    the samples skipped as bad are exactly the injected ones."""
    problems = []
    if len(keys) != len(set(keys)):
        problems.append(f"{len(keys) - len(set(keys))} samples twice in one epoch")
    missing = facts["good_keys"] - set(keys) - boundary
    if missing:
        problems.append(f"{len(missing)} usable samples never trained on in epoch 0: {sorted(missing)[:5]}")
    if set(keys) - facts["good_keys"]:
        problems.append(
            f"samples that should have been skipped: {sorted(set(keys) - facts['good_keys'])[:5]}"
        )
    if bad != facts["bad_keys"]:
        problems.append(
            f"the stream skipped {sorted(bad)}, the injected bad samples are {sorted(facts['bad_keys'])}"
        )
    return problems


def check_bad_sample_metric(
    run: Path, facts: dict, stderr: str | None, steps: int = TRAIN_STEPS
) -> list[str]:
    """After training on damaged shards: metrics.jsonl's bad_samples never drops, reaches at least the
    injected count (it counts every skip, so a bad sample met again in a later epoch counts again) and ends
    equal to the sum over the loader workers' own counts saved in the last checkpoint; each injected bad
    sample and the truncated shard were named in a warning."""
    problems = []
    counts = [r["bad_samples"] for r in metrics_rows(run)]
    state = json.loads((Path(run) / "checkpoints" / f"step-{steps:08d}" / "state.json").read_text("utf-8"))
    readers = sum(
        w["skipped"]
        for rank in state["train_state"]["data"]["ranks"].values()
        for w in rank["workers"].values()
    )
    if counts != sorted(counts) or not counts or counts[-1] < facts["bad"] or counts[-1] != readers:
        problems.append(
            f"metrics bad_samples {counts}: should rise to the readers' total {readers} >= {facts['bad']}"
        )
    if stderr is not None:
        problems += check_warnings(stderr, facts)
    return problems


def check_warnings(text: str, facts: dict) -> list[str]:
    """Each injected bad sample and the truncated shard are named in a warning."""
    unnamed = [key for key in sorted(facts["bad_keys"]) if f"skipped: {key}:" not in text]
    return (
        [f"no warning for {unnamed or facts['truncated']}"]
        if unnamed or facts["truncated"] not in text
        else []
    )


CONFIG_CASES: list[tuple[str, list[str] | None, str | None, str]] = [
    # (name, overrides, config text replacing the valid base (None: the base), text the message must hold)
    ("unknown key (typo)", ["optim.learning_rate=1"], None, "unknown key optim.learning_rate"),
    ("unknown section", ["optimiser.lr=1"], None, "unknown key optimiser"),
    ("wrong type", ["train.steps=many"], None, "train.steps"),
    ("list for an integer", ["data.batch_size=[8]"], None, "data.batch_size"),
    ("batch size 0", ["data.batch_size=0"], None, "data.batch_size"),
    ("negative workers", ["data.workers=-1"], None, "data.workers"),
    ("unknown choice", ["train.mixed_precision=fp8"], None, "train.mixed_precision"),
    ("no data section", None, "run: {seed: 0}\n", "data is required"),
    ("config file missing", None, "<missing>", "not found"),
    ("config is a list", None, "- run\n- data\n", "must hold a mapping"),
    ("YAML syntax error", None, "data: [unclosed\n", "not valid YAML"),
    ("override without =", ["optim.lr"], None, "not key=value"),
    ("override value not YAML", ["data.sources=[{urls: x"], None, "quote it"),
    ("empty sources", ["data.sources=[]"], None, "data.sources"),
    ("missing shards", ["data.sources=[{urls: '{SHARDS}/nope-{000..003}.tar'}]"], None, "nope-000.tar"),
    ("folder without shards", ["data.sources=[{urls: '{EMPTY}'}]"], None, "holds no *.tar"),
    ("pipe: URL", ["data.sources=[{urls: 'pipe:touch {TMP}/PWNED'}]"], None, "data.allow_pipe"),
    (
        "unsupported scheme",
        ["data.sources=[{urls: 's3://bucket/shard-000000.tar'}]"],
        None,
        "unsupported scheme",
    ),
    ("fewer shards than processes*workers", ["data.workers=5"], None, "5 readers"),
    ("warmup >= steps", ["optim.warmup_steps=50", "train.steps=10"], None, "optim.warmup_steps"),
    ("siglip loss without model.siglip", ["loss.kind=siglip"], None, "model.siglip"),
    ("image shards for an audio model", ["model.modality=audio"], None, "image-text pairs"),
    ("unknown architecture", ["model.open_clip_name=NoSuchNet"], None, "NoSuchNet"),
    ("resume folder missing", ["train.resume={TMP}/nope"], None, "train.resume"),
    ("resume folder partial (no COMPLETE)", ["train.resume={PARTIAL}"], None, "COMPLETE"),
    ("resume folder holds a pickle bomb", ["train.resume={BOMB}"], None, "train.resume"),
]


def config_case_files(root: Path, shards: Path) -> dict[str, str]:
    """The files the config cases refer to: 4 shards, an empty folder, a partial and a booby-trapped
    checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty").mkdir(exist_ok=True)
    partial = root / "checkpoints" / "step-00000003"
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "state.json").write_text("{}")
    bomb = root / "bomb" / "step-00000003"
    bomb.mkdir(parents=True, exist_ok=True)
    for name in ("state.json", "model.json"):
        (bomb / name).write_text("{}")
    make_pickle_bomb(bomb / "optimizer.pt", root / PWNED)
    make_pickle_bomb(bomb / "rng.pt", root / PWNED)
    (bomb / "COMPLETE").write_text("ok\n")
    return {
        "{SHARDS}": str(shards),
        "{EMPTY}": str(root / "empty"),
        "{TMP}": str(root),
        "{PARTIAL}": str(partial),
        "{BOMB}": str(bomb),
    }


def run_config_case(case, base: Path, root: Path, files: dict[str, str], main: Callable) -> dict:
    """Run one invalid-config case through `main` (mmcl.cli.main, in-process); returns what happened."""
    name, overrides, text, expected = case
    config = base
    if text == "<missing>":
        config = root / "missing.yaml"
    elif text is not None:
        config = root / f"case-{CONFIG_CASES.index(case)}.yaml"
        config.write_text(text)
    args = ["train", "--config", str(config)]
    for override in overrides or []:
        for key, value in files.items():
            override = override.replace(key, value)
        args.append(override)
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    except Exception:  # noqa: BLE001  (a crash is what this looks for)
        import traceback

        code, err = "crash", io.StringIO(traceback.format_exc())
    stderr = err.getvalue()
    messages = [line for line in stderr.splitlines() if line.startswith("mmcl train: error:")]
    ok = code == 2 and "Traceback" not in stderr and bool(messages) and expected in stderr
    return {"case": name, "exit": code, "ok": ok, "message": " / ".join(messages)[:400],
            "pwned": (root / PWNED).exists()}  # fmt: skip
