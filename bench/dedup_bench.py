"""Near-duplicate removal at scale (`mmcl shard dedup`'s core), simulated on random embeddings: time, peak
memory, recall of planted near-duplicates and false drops.

Run from the repository root with the project venv:

    .venv/bin/python bench/dedup_bench.py                          # 1M pairs, 512-d, 5 % planted copies
    .venv/bin/python bench/dedup_bench.py --pairs 200000 --data uniform --margins 0.02 0
    .venv/bin/python bench/dedup_bench.py --smoke                  # 20k pairs: it runs

The data, written once to --work-dir (default bench/out/dedup/, git-ignored; reused while its parameters
match): --pairs rows of float16 [rows, 2, --dim] embeddings in `NAME.emb.npy` files of --shard-rows (10k)
rows each, as `mmcl shard score --embeddings` writes them. Media embeddings (what dedup compares by
default) are drawn from --data:

  clustered  a mixture: --topics centres (default pairs / 100) on the unit sphere, each row its topic's
             centre plus a random direction of norm --spread (1.0: two rows of a topic have cosine ~0.5,
             of different topics ~0); real image embeddings are clustered like this, not isotropic
  uniform    isotropic Gaussian rows: no structure at all, the worst case for any clustering

Then --planted (5 %) of the rows, at random positions, are replaced by a near-copy of another random row
(that row plus a random direction scaled to cosine --copy-cosine, 0.99): each such pair should lose exactly
one member. The text half is random (not compared).

Measured, per --margins value, in a child process of its own (so its peak RSS is the dedup's alone):
`shards_tools.dedup.find_duplicates(EmbeddingRows(np.load(..., mmap_mode="r") for each file), --threshold)`,
exactly what `mmcl shard dedup` runs between reading the sidecars and writing the tar files: wall time (and
its k-means / assignment / per-cluster split), tracemalloc's peak (numpy's allocations: the working memory),
ru_maxrss (which also counts the pages of the memory-mapped .npy files it touched: page cache that the kernel
can drop, up to the files' size), recall (planted pairs with a member removed), false drops (removed rows
that are not the one expected member of a planted pair, per 100k kept-worthy rows), and the number of
clusters, the largest and the rows also searched in a second cluster (--margins: 0 is plain SemDeDup).
Results: a table on stdout and --out (default bench/out/dedup.json).

--planted-images (`--planted` is the simulation's share of copies) measures `mmcl shard dedup` end to end on
real images instead: --originals (1,000) Fashion-MNIST training images (pipelines.demo_data) and --copies
(100) planted near-copies of distinct, seeded originals (in turn: JPEG at quality 30-60, resized to 18-22 px
and back with bicubic, shifted by 1-2 px, cropped by 0-2 px a side and resized back, brightness x0.85-0.95
or x1.05-1.15), each with a paraphrased caption, the rows in a seeded random order, sharded 100 a shard
(`mmcl shard image-text`), embedded by --checkpoint (default: bench/out/curation/runs/large-s0-clean, a
micro ResNet trained on 6,000 Fashion-MNIST pairs; if missing, or --train, one trained on this set for
--train-steps) with `mmcl shard score --embeddings`, then `mmcl shard dedup --dry-run` per --embeddings
and --thresholds, and the same on a control: mean-centred pixels as the embedding. Per run: recall (a
planted pair found: one member removed as the duplicate of the other), pairs with either member removed,
the planted pairs at cosine >= T (what an exhaustive search could find), false drops (removed rows outside
the planted pairs, plus planted pairs that lost both members) as a share of the originals, how many of
those matched a pair of their class and their mean pixel difference to it (grey levels), and the wall time
of the dedup process. Work dir bench/out/dedup-planted/, results bench/out/dedup-planted.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from host import busy_cpu_seconds, host_facts, machine_line  # noqa: E402


def data_dir(args: argparse.Namespace) -> Path:
    tag = f"{args.data}-{args.pairs}-d{args.dim}-r{args.shard_rows}-p{args.planted}-s{args.seed}"
    if args.data == "clustered":
        tag += f"-t{topics(args)}-w{args.spread}"
    return Path(args.work_dir) / f"{tag}-c{args.copy_cosine}"


def topics(args: argparse.Namespace) -> int:
    return args.topics or max(1, args.pairs // 100)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def generate(args: argparse.Namespace, folder: Path) -> None:
    """Write the embedding files and truth.npy (row -> the row it is a planted copy of, or -1)."""
    if (folder / "truth.npy").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    n, dim = args.pairs, args.dim
    centres = unit(rng.standard_normal((topics(args), dim)).astype(np.float32))
    files = []
    for index, start in enumerate(range(0, n, args.shard_rows)):
        rows = min(args.shard_rows, n - start)
        media = unit(rng.standard_normal((rows, dim)).astype(np.float32))
        if args.data == "clustered":
            media = unit(centres[rng.integers(0, len(centres), rows)] + args.spread * media)
        block = np.empty((rows, 2, dim), dtype=np.float16)
        block[:, 0] = media
        block[:, 1] = unit(rng.standard_normal((rows, dim)).astype(np.float32))
        path = folder / f"shard-{index:06d}.tar.emb.npy"
        np.save(path, block)
        files.append(path)
    # planted copies: targets and sources disjoint, each source copied once
    planted = int(round(args.planted * n))
    chosen = rng.choice(n, size=2 * planted, replace=False)
    targets, sources = chosen[:planted], chosen[planted:]
    truth = np.full(n, -1, dtype=np.int64)
    truth[targets] = sources
    arrays = [np.load(p, mmap_mode="r+") for p in files]
    # cosine c between x and x + e (e orthogonal-ish, |e| = s): c = 1 / sqrt(1 + s^2)
    scale = np.sqrt(1.0 / args.copy_cosine**2 - 1.0)
    for target, source in zip(targets.tolist(), sources.tolist(), strict=True):
        x = arrays[source // args.shard_rows][source % args.shard_rows, 0].astype(np.float32)
        noise = unit(rng.standard_normal(dim).astype(np.float32))
        arrays[target // args.shard_rows][target % args.shard_rows, 0] = unit(x + scale * noise)
    for array in arrays:
        array.flush()
    del arrays
    np.save(folder / "truth.npy", truth)
    print(f"generated {n:,} x 2 x {dim} in {len(files)} files, {planted:,} planted copies, "
          f"{time.perf_counter() - started:.0f} s: {folder}", flush=True)  # fmt: skip


def child(folder: Path, threshold: float, margin: float, seed: int, clusters: int | None) -> dict:
    """One measured run of find_duplicates on the files in `folder` (in this process: the child)."""
    from shards_tools.dedup import EmbeddingRows, find_duplicates

    files = sorted(folder.glob("*.emb.npy"))
    tracemalloc.start()
    started = time.perf_counter()
    rows = EmbeddingRows([np.load(p, mmap_mode="r") for p in files], "media")
    result = find_duplicates(rows, threshold, clusters=clusters, seed=seed, margin=margin)
    seconds = time.perf_counter() - started
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    truth = np.load(folder / "truth.npy")
    removed = result.of >= 0
    targets = np.flatnonzero(truth >= 0)
    sources = truth[targets]
    hit = removed[targets] | removed[sources]
    both = removed[targets] & removed[sources]
    in_pair = np.zeros(len(truth), dtype=bool)
    in_pair[targets] = in_pair[sources] = True
    outside = int((removed & ~in_pair).sum())
    false_drops = outside + int(both.sum())
    kept_worthy = len(truth) - len(targets)  # every row but one of each planted pair
    # a found pair's removed member should name its partner
    found = targets[hit & ~both]
    partner = np.where(removed[found], truth[found], found)
    gone = np.where(removed[found], found, truth[found])
    return {
        "margin": margin,
        "seconds": round(seconds, 1),
        "split": result.stats["seconds"],
        "traced_peak_mb": round(traced_peak / 2**20, 1),
        "maxrss_mb": round(maxrss / 2**20, 1),
        "recall": round(float(hit.mean()), 5) if len(hit) else None,
        "planted": len(targets),
        "missed": int((~hit).sum()),
        "false_drops": false_drops,
        "false_drops_per_100k": round(1e5 * false_drops / kept_worthy, 3),
        "of_is_partner": round(float((result.of[gone] == partner).mean()), 5) if len(found) else None,
        "removed": result.removed,
        "clusters": result.clusters,
        "largest_cluster": result.stats["largest_cluster"],
        "boundary_rows": result.stats["boundary_rows"],
    }


def measured(command: list[str]) -> tuple[dict, dict]:
    """Run one child; its JSON result, and its CPU use and the rest of the machine's (cores, over its wall
    time: above ~0.1 others' work slowed it down)."""
    busy, children, started = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.time() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    load = {
        "wall_s": round(wall, 1),
        "child_cores": round(cpu / wall, 2),
        "others_cores": round(max(0.0, busy_cpu_seconds() - busy - cpu) / wall, 2),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    return json.loads(done.stdout.splitlines()[-1]), load


# ------------------------------------------------------------------------------------ --planted-images
# `mmcl shard dedup` end to end on real images: Fashion-MNIST originals and planted near-copies of some of
# them (re-encoded, resized, shifted, cropped, brightened; captions paraphrased), sharded, embedded by a
# trained micro ResNet (`mmcl shard score --embeddings`) and deduplicated (`mmcl shard dedup --dry-run`).

PLANT_KINDS = ("jpeg", "resize", "shift", "crop", "brightness")
PARAPHRASES = [
    "an image showing a {}.",
    "a picture of the {}.",
    "a {} in a photo.",
    "this photo shows a {}.",
    "the {}, in black and white.",
    "a photograph of one {}.",
    "here is a {}.",
]
EMBEDDING_CHOICES = ("media", "text", "both")  # shards_tools.dedup.EMBEDDINGS
CURATION_RUN = REPO / "bench" / "out" / "curation" / "runs" / "large-s0-clean"
MICRO_RESNET = REPO / "configs" / "image_text" / "micro_resnet.yaml"
QUIET_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "HF_HUB_OFFLINE": "1"}  # fmt: skip


def plant_copy(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    """A near-copy of the uint8 grayscale `image`: (file bytes, file suffix, what was done)."""
    from PIL import Image, ImageEnhance

    picture = Image.fromarray(image)
    size = picture.size
    if kind == "jpeg":
        quality = int(rng.integers(30, 61))
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=quality)
        return out.getvalue(), ".jpg", {"quality": quality}
    if kind == "resize":
        side = int(rng.integers(18, 23))
        picture = picture.resize((side, side), Image.BICUBIC).resize(size, Image.BICUBIC)
        params = {"via": side}
    elif kind == "shift":
        dx, dy = 0, 0
        while dx == 0 and dy == 0:
            dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
        moved = np.zeros_like(image)  # Fashion-MNIST's background is 0
        h, w = image.shape
        moved[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
            max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
        ]
        picture, params = Image.fromarray(moved), {"dx": dx, "dy": dy}
    elif kind == "crop":
        left, top, right, bottom = (int(v) for v in rng.integers(0, 3, size=4))
        if left + top + right + bottom == 0:
            left = 1
        box = (left, top, size[0] - right, size[1] - bottom)
        picture, params = picture.crop(box).resize(size, Image.BICUBIC), {"box": box}
    else:  # brightness
        factor = float(rng.choice([-1, 1]) * rng.uniform(0.05, 0.15) + 1.0)
        picture, params = ImageEnhance.Brightness(picture).enhance(factor), {"factor": round(factor, 3)}
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue(), ".png", params


def paraphrase(caption: str, label: str, rng: np.random.Generator) -> str:
    """Another wording of a Fashion-MNIST caption, with the same class word."""
    choices = [p.format(label) for p in PARAPHRASES if p.format(label) != caption]
    return choices[int(rng.integers(len(choices)))]


def timed(command: list, log: Path, check: bool = True) -> dict:
    """Run one mmcl command (stdout and stderr to `log`), single-threaded; its wall and CPU time and the
    rest of the machine's use meanwhile (cores). A failure stops the bench, or with check=False is returned
    as "error": the log's last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    busy, children, started = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    with open(log, "w") as handle:
        done = subprocess.run(list(map(str, command)), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, **QUIET_ENV})  # fmt: skip
    wall = time.time() - started
    if done.returncode and check:
        raise SystemExit(f"failed: {' '.join(map(str, command))}\n{log.read_text()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "others_cores": round(max(0.0, busy_cpu_seconds() - busy - cpu) / wall, 2),
        "loadavg": round(os.getloadavg()[0], 2),
        **({"error": (log.read_text().strip().splitlines() or ["?"])[-1]} if done.returncode else {}),
    }


def planted_set(args: argparse.Namespace, folder: Path) -> dict:
    """The originals, the planted copies and their manifest (rows in a seeded random order), sharded;
    truth.json: every copy's file, its original's, how it was made and both captions."""
    from PIL import Image

    from pipelines.demo_data import build_fashion_mnist

    truth_path = folder / "truth.json"
    if not truth_path.exists():
        root = Path(args.work_dir) / f"fashion-mnist-{args.originals}-d{args.data_seed}"
        root = build_fashion_mnist(root, args.originals, 0, seed=args.data_seed)["train"].parent
        with open(root / "train.csv", newline="") as handle:
            originals = [dict(row, path=str(root / row["path"])) for row in csv.DictReader(handle)]
        rng = np.random.default_rng(args.seed)
        chosen = rng.choice(len(originals), size=args.copies, replace=False)
        (folder / "copies").mkdir(parents=True, exist_ok=True)
        rows, copies = list(originals), []
        for n, index in enumerate(chosen.tolist()):
            source = originals[index]
            kind = PLANT_KINDS[n % len(PLANT_KINDS)]
            data, suffix, params = plant_copy(np.asarray(Image.open(source["path"])), kind, rng)
            path = folder / "copies" / f"copy-{n:04d}-of-{Path(source['path']).stem}{suffix}"
            path.write_bytes(data)
            caption = paraphrase(source["caption"], source["label"], rng)
            rows.append({"path": str(path), "caption": caption, "label": source["label"]})
            copies.append({"copy": str(path), "original": source["path"], "kind": kind, "params": params,
                           "caption": caption, "original_caption": source["caption"]})  # fmt: skip
        order = rng.permutation(len(rows))
        with open(folder / "manifest.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "caption", "label"])
            writer.writeheader()
            writer.writerows(rows[i] for i in order)
        truth_path.write_text(json.dumps({"originals": len(originals), "copies": copies}, indent=1) + "\n")
    shards = folder / "shards"
    if not (shards / "manifest.json").exists():
        timed([sys.executable, "-m", "mmcl", "shard", "image-text", "--input", folder / "manifest.csv",
               "--output", shards, "--label-column", "label", "--image-format", "png", "--shard-size", 100,
               "--workers", 1, "--allow-outside-root", "--quiet"], folder / "logs" / "shard.log")  # fmt: skip
    return json.loads(truth_path.read_text())


def shard_sources(shards: Path) -> dict[tuple[str, str], str]:
    """(shard file name, key) -> the file the pair's media came from (each sample's .json "source")."""
    sources = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as handle:
            for member in handle:
                if member.name.endswith(".json"):
                    meta = json.load(handle.extractfile(member))
                    sources[(tar.name, meta["key"])] = str(Path(meta["source"]).resolve())
    return sources


def checkpoint_for(args: argparse.Namespace, folder: Path, shards: Path) -> Path:
    """--checkpoint, else the curation bench's clean large run when it exists (a micro ResNet trained on 6,000
    Fashion-MNIST pairs), else a micro ResNet trained here on the planted set for --train-steps."""
    if args.checkpoint is not None:
        return args.checkpoint
    if CURATION_RUN.is_dir() and any((CURATION_RUN / "checkpoints").glob("step-*")) and not args.train:
        return CURATION_RUN
    import yaml

    run_dir = folder / "runs" / f"micro-resnet-{args.train_steps}"
    if not (run_dir / "checkpoints" / f"step-{args.train_steps:08d}").exists():
        config = yaml.safe_load(MICRO_RESNET.read_text())
        config["run"] = {"output_dir": str(run_dir), "seed": args.seed}
        config["data"].update({"sources": [{"urls": str(shards)}], "workers": 1, "seed": args.seed})
        steps = args.train_steps
        config["train"].update({"steps": steps, "checkpoint_every": steps, "resume": "never"})
        config["optim"]["warmup_steps"] = max(1, steps // 10)
        path = folder / "runs" / f"micro-resnet-{steps}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        print(f"training a micro ResNet for {steps} steps: {run_dir}", flush=True)
        timed([sys.executable, "-m", "mmcl", "train", "--config", path], folder / "logs" / "train.log")
    return run_dir


def pair_cosines(scores: Path, sources: dict, pairs: list[tuple[str, str]], embedding: str) -> dict:
    """In `embedding` (dedup's `unit_rows`): the cosine similarity of each (copy, original) pair, and in how
    many pairs the copy's nearest other pair of the whole set is its original (ranking, whatever the
    threshold), and the cosine of the copy's nearest pair that is not its original."""
    from shards_tools.dedup import unit_rows
    from shards_tools.scores import embeddings_path, read_sidecar, scored_shards, sidecar_path

    vectors = {}
    for name in scored_shards(scores):
        keys = [row["key"] for row in read_sidecar(sidecar_path(scores, name))]
        units = unit_rows(np.load(embeddings_path(scores, name)), embedding)
        vectors.update({sources[(name, key)]: units[i] for i, key in enumerate(keys)})
    names = list(vectors)
    index = {name: i for i, name in enumerate(names)}
    matrix = np.stack([vectors[name] for name in names])
    cosines, nearest, rival = [], 0, []
    for a, b in pairs:
        sims = matrix @ vectors[a]
        sims[index[a]] = -np.inf
        cosines.append(float(sims[index[b]]))
        nearest += int(np.argmax(sims)) == index[b]
        sims[index[b]] = -np.inf
        rival.append(float(sims.max()))
    return {"cosines": np.array(cosines), "nearest_is_original": nearest, "rival": np.array(rival)}


def pixel_scores(scores: Path, folder: Path, sources: dict, pixels: dict) -> Path:
    """A control: a scores folder like `scores` (the same sidecars) whose embeddings are each image's pixels
    minus the set's mean image (both halves): what dedup does with an instance-level embedding."""
    from shards_tools.scores import embeddings_path, read_sidecar, scored_shards, sidecar_path

    folder.mkdir(parents=True, exist_ok=True)
    mean = np.mean([image.reshape(-1) for image in pixels.values()], axis=0, dtype=np.float64)
    for name in scored_shards(scores):
        shutil.copyfile(sidecar_path(scores, name), sidecar_path(folder, name))
        keys = [row["key"] for row in read_sidecar(sidecar_path(scores, name))]
        media = np.stack([pixels[sources[(name, key)]].reshape(-1) - mean for key in keys])
        media /= np.linalg.norm(media, axis=1, keepdims=True)
        np.save(embeddings_path(folder, name), np.stack([media, media], axis=1).astype(np.float16))
    return folder


def pixel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 images, in grey levels (0-255)."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def judge(removed_rows: list[dict], sources: dict, truth: dict, pixels: dict, labels: dict) -> dict:
    """Recall of the planted pairs and false drops in one dedup's removed.jsonl (see planted_main)."""
    partner = {}
    for copy in truth["copies"]:
        partner[copy["copy"]], partner[copy["original"]] = copy["original"], copy["copy"]
    removed = {}
    for row in removed_rows:
        if row["reason"] == "duplicate":
            removed[sources[(row["shard"], row["key"])]] = sources[(row["of_shard"], row["of"])]
    found_by_kind: dict[str, list[int]] = {kind: [0, 0] for kind in PLANT_KINDS}
    both = found = elsewhere = either = 0
    for copy in truth["copies"]:
        a, b = copy["copy"], copy["original"]
        hit = removed.get(a) == b or removed.get(b) == a
        found += hit
        found_by_kind[copy["kind"]][0] += hit
        found_by_kind[copy["kind"]][1] += 1
        both += a in removed and b in removed
        either += a in removed or b in removed
        elsewhere += (a in removed and removed[a] != b) + (b in removed and removed[b] != a)
    outside = [(a, b) for a, b in removed.items() if a not in partner]
    diffs = [pixel_diff(pixels[a], pixels[b]) for a, b in outside]
    kept_worthy = truth["originals"]  # each planted pair should keep one member: as many as the originals
    return {
        "removed": len(removed),
        "found": found,
        "recall": round(found / len(truth["copies"]), 4),
        "recall_by_kind": {kind: f"{hit}/{total}" for kind, (hit, total) in found_by_kind.items()},
        "either_removed": either,
        "planted_member_removed_as_other_duplicate": elsewhere,
        "false_drops": len(outside) + both,
        "false_drop_rate": round((len(outside) + both) / kept_worthy, 4),
        "outside_drops": len(outside),
        "pairs_lost_both": both,
        "outside_pixel_diff_mean": round(float(np.mean(diffs)), 2) if diffs else None,
        "outside_pixel_diff_median": round(float(np.median(diffs)), 2) if diffs else None,
        "outside_same_class": sum(labels[a] == labels[b] for a, b in outside),
        "outside_examples": [
            [Path(a).name, Path(b).name, round(d, 1)] for (a, b), d in zip(outside[:10], diffs, strict=False)
        ],
    }


def pixel_context(truth: dict, pixels: dict, labels: dict, seed: int) -> dict:
    """Mean absolute pixel differences (grey levels) that put the false drops' in context: planted copy to
    original (per kind), each original to its nearest other original (the data's own look-alikes), and
    random pairs of originals of the same class."""
    copies = {c["copy"] for c in truth["copies"]}
    names = sorted(p for p in pixels if p not in copies)
    x = np.stack([pixels[p].reshape(-1) for p in names]).astype(np.int16)
    nearest = np.empty(len(x))
    for start in range(0, len(x), 50):
        d = np.abs(x[start : start + 50, None, :] - x[None, :, :]).mean(axis=2)
        d[np.arange(len(d)), start + np.arange(len(d))] = np.inf
        nearest[start : start + 50] = d.min(axis=1)
    rng = np.random.default_rng(seed)
    same = []
    while len(same) < 1000:
        a, b = rng.choice(len(names), size=2, replace=False)
        if labels[names[a]] == labels[names[b]]:
            same.append(pixel_diff(pixels[names[a]], pixels[names[b]]))
    by_kind = {kind: [pixel_diff(pixels[c["copy"]], pixels[c["original"]]) for c in truth["copies"]
                      if c["kind"] == kind] for kind in PLANT_KINDS}  # fmt: skip
    median_copy = float(np.median([d for v in by_kind.values() for d in v]))
    return {
        "planted_copy_by_kind_mean": {k: round(float(np.mean(v)), 2) for k, v in by_kind.items() if v},
        "planted_copy_median": round(median_copy, 2),
        "original_nearest_original_median": round(float(np.median(nearest)), 2),
        "original_nearest_original_p05": round(float(np.percentile(nearest, 5)), 2),
        "originals_nearest_within_planted_median": int((nearest <= median_copy).sum()),
        "random_same_class_median": round(float(np.median(same)), 2),
    }


def planted_main(args: argparse.Namespace) -> int:
    """--planted: the whole measurement (see the module docstring)."""
    from PIL import Image

    if args.smoke:
        args.originals, args.copies, args.train_steps = 200, 20, 20
    work = Path(args.work_dir or REPO / "bench" / "out" / "dedup-planted").resolve()
    out = args.out or REPO / "bench" / "out" / f"dedup-planted{'-smoke' if args.smoke else ''}.json"
    args.work_dir = work
    print(machine_line(), flush=True)
    folder = work / f"o{args.originals}-c{args.copies}-s{args.seed}-d{args.data_seed}"
    truth = planted_set(args, folder)
    shards = folder / "shards"
    sources = shard_sources(shards)
    expected = truth["originals"] + len(truth["copies"])
    if len(sources) != expected:
        raise SystemExit(f"{shards}: {len(sources)} pairs, expected {expected}")
    checkpoint = checkpoint_for(args, folder, shards)
    seen = None  # originals the default checkpoint was trained on (the curation bench's images)
    curation_images = REPO / "bench" / "out" / "curation" / "data" / "fashion-mnist-6000" / "train"
    if Path(checkpoint) == CURATION_RUN and curation_images.is_dir():
        trained = {p.name for p in curation_images.glob("*.png")}
        seen = sum(Path(p).name in trained for p in set(sources.values()) if "/copies/" not in p)
    scores = folder / f"scores-{Path(checkpoint).name}"
    score_time = None
    if not (scores / "scores.json").exists():
        command = [sys.executable, "-m", "mmcl", "shard", "score", shards, "--checkpoint", checkpoint,
                   "--output", scores, "--embeddings", "--workers", args.workers, "--quiet"]  # fmt: skip
        score_time = timed(command, folder / "logs" / f"score-{scores.name}.log")
        print(f"scored {len(sources):,} pairs in {score_time['wall_s']:.0f} s: {scores}", flush=True)
    pixels = {path: np.asarray(Image.open(path).convert("L")) for path in sources.values()}
    with open(folder / "manifest.csv", newline="") as handle:
        labels = {row["path"]: row["label"] for row in csv.DictReader(handle)}
    context = pixel_context(truth, pixels, labels, args.seed)
    planted_pairs = [(c["copy"], c["original"]) for c in truth["copies"]]

    results = []
    print(f"\n{truth['originals']:,} Fashion-MNIST originals + {len(truth['copies'])} planted near-copies "
          f"({', '.join(PLANT_KINDS)}; captions paraphrased), embedded by {checkpoint}"
          + ("" if seen is None else f" (trained on {seen} of these originals)") + "\n")  # fmt: skip
    print("| embedding | T | recall | found (jpeg/resize/shift/crop/bright) | either | exact >= T | "
          "false drops | false-drop rate | same class | pixel diff | time s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    views = [(embedding, scores, embedding) for embedding in args.embeddings]
    if not args.no_pixel_control:
        views.append(("pixels", pixel_scores(scores, folder / "scores-pixels", sources, pixels), "media"))
    for name, view_scores, embedding in views:
        view = pair_cosines(view_scores, sources, planted_pairs, embedding)
        cosines = view["cosines"]
        for threshold in args.thresholds:
            target = folder / "dedup" / f"{name}-t{threshold:g}"
            shutil.rmtree(target, ignore_errors=True)
            load = timed([sys.executable, "-m", "mmcl", "shard", "dedup", shards, "--scores", view_scores,
                          "--output", target, "--threshold", threshold, "--embedding", embedding,
                          "--seed", args.seed, "--dry-run", "--quiet"],
                         folder / "logs" / f"dedup-{target.name}.log", check=False)  # fmt: skip
            if "error" in load:
                results.append({"embedding": name, "threshold": threshold, "error": load.pop("error"),
                                "load": load})  # fmt: skip
                print(f"| {name} | {threshold:g} | dedup failed: {results[-1]['error'][:60]} "
                      f"(log: {target.name}) ||||||||| {load['wall_s']:.1f} |", flush=True)  # fmt: skip
                continue
            rows = [json.loads(line) for line in (target / "removed.jsonl").read_text().splitlines()]
            row = {"embedding": name, "threshold": threshold,
                   "exact": int((cosines >= threshold).sum()), **judge(rows, sources, truth, pixels, labels),
                   "load": load}  # fmt: skip
            results.append(row)
            kinds = "/".join(v.split("/")[0] for v in row["recall_by_kind"].values())
            diff = "-" if row["outside_pixel_diff_mean"] is None else f"{row['outside_pixel_diff_mean']:.1f}"
            print(f"| {name} | {threshold:g} | {row['recall']:.2f} | {row['found']} ({kinds}) | "
                  f"{row['either_removed']} | {row['exact']} | {row['false_drops']} | "
                  f"{100 * row['false_drop_rate']:.1f} % | "
                  f"{row['outside_same_class']}/{row['outside_drops']} | {diff} | {load['wall_s']:.1f} |",
                  flush=True)  # fmt: skip
        results.append({
            "embedding": name,
            "planted_cosine_min_p05_median": np.percentile(cosines, [0, 5, 50]).round(4).tolist(),
            "nearest_is_original": view["nearest_is_original"],
            "rival_cosine_min_p05_median": np.percentile(view["rival"], [0, 5, 50]).round(4).tolist(),
        })  # fmt: skip
    for r in results:
        if "nearest_is_original" in r:
            print(f"\n{r['embedding']}: planted copy to its original, cosine min / 5th percentile / median "
                  f"{r['planted_cosine_min_p05_median']}; the copy to its nearest other pair "
                  f"{r['rival_cosine_min_p05_median']}; the copy's nearest pair is its original in "
                  f"{r['nearest_is_original']}/{len(planted_pairs)}", end="")  # fmt: skip
    print()
    print(f"pixel differences (mean |a - b|, grey levels): planted copies by kind "
          f"{context['planted_copy_by_kind_mean']} (median {context['planted_copy_median']}); each original "
          f"to its nearest other original: median {context['original_nearest_original_median']}, 5th "
          f"percentile {context['original_nearest_original_p05']} "
          f"({context['originals_nearest_within_planted_median']} originals are as close to another original "
          f"as the median planted copy to its own); random same-class pairs: median "
          f"{context['random_same_class_median']}")  # fmt: skip
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}
    report = {
        "settings": {**settings, "checkpoint": str(checkpoint)},
        "host": host_facts(),
        "machine": machine_line(),
        "data": str(folder),
        "score_time": score_time,
        "originals_in_checkpoint_training": seen,
        "pixel_context": context,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shard-rows", type=int, default=10_000, help="rows per .emb.npy file")
    parser.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    parser.add_argument("--topics", type=int, help="clustered: centres (default pairs / 100)")
    parser.add_argument("--spread", type=float, default=1.0, help="clustered: distance from the centre")
    parser.add_argument("--planted", type=float, default=0.05, help="share of rows that are near-copies")
    parser.add_argument("--copy-cosine", type=float, default=0.99, help="cosine of a copy to its original")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--margins", type=float, nargs="+", default=[0.02], help="dedup --margin values")
    parser.add_argument("--clusters", type=int, help="k-means clusters (default: dedup's round(sqrt(n)))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="default bench/out/dedup (real: dedup-planted)")
    parser.add_argument("--out", type=Path, help="default bench/out/dedup.json (real: dedup-planted.json)")
    parser.add_argument("--smoke", action="store_true", help="20k pairs, 64-d (real: 200 + 20 images)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    planted = parser.add_argument_group("real images: mmcl shard score + dedup end to end")
    planted.add_argument("--planted-images", dest="planted_mode", action="store_true",
                         help="Fashion-MNIST with planted near-copies instead of the simulation")  # fmt: skip
    planted.add_argument("--originals", type=int, default=1000, help="Fashion-MNIST training images")
    planted.add_argument("--data-seed", type=int, default=1, help="build_fashion_mnist's seed: 1 shares 107 "
                         "of 1,000 images with the curation bench's 6,000 (its seed, 0, 994)")  # fmt: skip
    planted.add_argument("--copies", type=int, default=100, help="planted near-copies of distinct originals")
    planted.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99, 0.995, 0.999])
    planted.add_argument("--embeddings", nargs="+", choices=EMBEDDING_CHOICES, default=["media", "both"])
    planted.add_argument("--checkpoint", type=Path, help="the model that embeds (default: the curation "
                         "bench's large-s0-clean run if present, else one trained here)")  # fmt: skip
    planted.add_argument("--train", action="store_true", help="train the model here even if that run exists")
    planted.add_argument("--train-steps", type=int, default=300)
    planted.add_argument("--workers", type=int, default=1, help="mmcl shard score --workers")
    planted.add_argument("--no-pixel-control", action="store_true",
                         help="skip the control: dedup on mean-centred pixels, not the model")  # fmt: skip
    args = parser.parse_args(argv)
    if args.planted_mode:
        return planted_main(args)
    args.work_dir = args.work_dir or REPO / "bench" / "out" / "dedup"
    args.out = args.out or REPO / "bench" / "out" / "dedup.json"
    if args.child is not None:
        for margin in args.margins:
            print(json.dumps(child(args.child, args.threshold, margin, args.seed, args.clusters)), flush=True)
        return 0
    if args.smoke:
        args.pairs, args.dim, args.shard_rows = 20_000, 64, 2_000
    print(machine_line(), flush=True)
    folder = data_dir(args)
    generate(args, folder)
    results = []
    columns = [("margin", 6), ("time s", 7), ("kmeans", 7), ("assign", 7), ("clusters", 8), ("traced MB", 9),
               ("maxrss MB", 9), ("recall", 7), ("missed", 6), ("false", 5), ("K", 5), ("largest", 7),
               ("2nd", 7)]  # fmt: skip
    print(" ".join(f"{name:>{width}}" for name, width in columns))
    for margin in args.margins:  # one child each: ru_maxrss is per process
        command = [sys.executable, __file__, "--child", str(folder), "--threshold", str(args.threshold),
                   "--margins", str(margin), "--seed", str(args.seed)]  # fmt: skip
        if args.clusters:
            command += ["--clusters", str(args.clusters)]
        result, load = measured(command)
        row = {**result, "load": load}
        results.append(row)
        split = row["split"]
        print(f"{margin:>6g} {row['seconds']:>7.1f} {split['kmeans']:>7.1f} {split['assign']:>7.1f} "
              f"{split['clusters']:>8.1f} {row['traced_peak_mb']:>9.0f} {row['maxrss_mb']:>9.0f} "
              f"{row['recall']:>7.4f} {row['missed']:>6} {row['false_drops']:>5} {row['clusters']:>5} "
              f"{row['largest_cluster']:>7} {row['boundary_rows']:>7}", flush=True)  # fmt: skip
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}
    report = {
        "settings": {**settings, "topics": topics(args)},
        "host": host_facts(),
        "machine": machine_line(),
        "data": str(folder),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for row in results:
        load = row["load"]
        print(f"margin {row['margin']:g}: the dedup used {load['child_cores']} cores, the rest of the box "
              f"{load['others_cores']} (load average {load['loadavg'][0]})")  # fmt: skip
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
