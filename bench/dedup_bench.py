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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
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
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "out" / "dedup")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "dedup.json")
    parser.add_argument("--smoke", action="store_true", help="20k pairs, 64-d: a quick check that it runs")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
