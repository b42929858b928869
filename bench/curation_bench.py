"""The curation loop, measured: score with an early checkpoint, then filter or weight, against weighting in
training alone, at the same total compute.

On pairs with half of the captions swapped (`mmcl shard --noise-rate 0.5`), per set and seed:

  clean   no noise, weighting off: the reference accuracy
  a       noisy, weighting off
  b       noisy, in-training weighting (noise.method local_fdr; audio: loss_mixture)
  early   noisy, weighting off, EARLY_FRACTION of the steps: the early checkpoint ("early learning": it has
          not memorized the swapped pairs yet). `mmcl shard score --checkpoint early` scores every pair.
  c       `mmcl shard filter --keep-fraction KEEP` on those scores, then a fresh run on the kept pairs
  d       a fresh run on all pairs with noise.method alignment_score reading the sidecars
          (data.sources[0].scores), scores mapped to weights over their 25th..75th percentile
  e       d's scores combined with b's estimate (noise.combine_scores: the product)

c, d and e train for the steps left after the early run, so each variant costs the same training steps;
scoring costs one forward pass over the set (reported). Zero-shot top-1 on 1,000 held-out Fashion-MNIST test
images (`mmcl eval zero-shot`), "kept of clean" = top-1 / the same seed's clean top-1. The filter's precision
and recall come from the shards' ground truth (`noisy` in each .json). Two sets:

  large   6,000 pairs, 600 steps of 64 (6.4 passes)
  small   785 pairs, 600 steps (49 passes): a small set seen many times, where in-training weighting finds
          nothing to weigh (the model memorizes the swapped pairs during the weighting's warm-up)
  audio   the demo's 640 spoken words (8 voices), 250 steps (25 passes), zero-shot on 600 clips of 12 unseen
          voices; in-training weighting is loss_mixture there (audio's best estimator in noise_bench)

    .venv/bin/python bench/curation_bench.py                       # large and small, seeds 0 1: ~45 min
    .venv/bin/python bench/curation_bench.py --sets audio --seeds 0 1                       # ~20 min
    .venv/bin/python bench/curation_bench.py --sets small --seeds 0

Results are cached per run under --work-dir (default bench/out/curation), so an interrupted bench continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from noise_bench import (  # noqa: E402
    AUDIO_REPEATS,
    IMAGE_TEST_PER_CLASS,
    PROMPTS,
    WEIGHTING_SCHEDULE,
    audio_data,
    run,
    zero_shot,
)

from pipelines.demo_data import TRAIN_VOICES, build_fashion_mnist  # noqa: E402
from shards_tools.scores import all_rows  # noqa: E402

# set: (modality, pairs); image sets are Fashion-MNIST pairs, audio the demo's 640 spoken words
SETS = {"large": ("image", 6000), "small": ("image", 785), "audio": ("audio", 640)}
RECIPES = {"image": "image_text/micro_resnet.yaml", "audio": "audio_text/micro.yaml"}
STEPS = {"image": 600, "audio": 250}
IN_TRAINING = {"image": "local_fdr", "audio": "loss_mixture"}  # each modality's best estimator (noise_bench)
MEDIA_FLAGS = {
    "image": ["--image-format", "png"],
    "audio": ["--sample-rate", "16000", "--max-seconds", "1.5"],
}
EARLY_FRACTION = 0.15
KEEP = 0.5
RATE = 0.5
VARIANTS = ["clean", "a", "b", "early", "d", "e", "c"]  # the run order
DISPLAY_ORDER = ["clean", "a", "b", "early", "c", "d", "e"]


def shard(work: Path, data: dict, name: str, rate: float, seed: int) -> Path:
    out = work / "shards" / f"{name}-r{rate:g}-s{seed}"
    modality, pairs = SETS[name]
    if not (out / "manifest.json").exists():
        run(
            [sys.executable, "-m", "mmcl", "shard", f"{modality}-text", "--input", data["train"], "--output",
             out, "--shard-size", max(8, pairs // 16), "--shuffle", "--seed", seed, "--noise-rate", rate,
             "--label-column", "label", "--quiet", *MEDIA_FLAGS[modality]],
            work / "logs" / f"shard-{out.name}.log",
        )  # fmt: skip
    return out


def train(
    work: Path,
    run_name: str,
    shards: Path,
    seed: int,
    steps: int,
    noise: dict,
    scores: Path | None,
    modality: str = "image",
) -> Path:
    run_dir = work / "runs" / run_name
    if (run_dir / "checkpoints" / f"step-{steps:08d}").exists():
        return run_dir
    config = yaml.safe_load((REPO / "configs" / RECIPES[modality]).read_text())
    config["run"] = {"output_dir": str(run_dir), "seed": seed}
    source = {"urls": str(shards), **({"scores": str(scores)} if scores else {})}
    config["data"].update({"sources": [source], "workers": 1, "seed": seed})
    config["train"].update({"steps": steps, "log_every": 20, "checkpoint_every": steps, "resume": "never"})
    config["optim"]["warmup_steps"] = max(1, steps // 10)
    warmup, ramp = WEIGHTING_SCHEDULE[modality]
    config["noise"] = {"warmup_steps": warmup, "ramp_steps": ramp, "window": 2048, **noise}
    path = work / "configs" / f"{run_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    run([sys.executable, "-m", "mmcl", "train", "--config", path], work / "logs" / f"train-{run_name}.log")
    return run_dir


def filter_quality(filtered: Path, scores: Path) -> dict:
    """Precision and recall of the pairs the filter removed, as detections of the swapped ones."""
    noisy = {row["key"]: row["noisy"] for _, row in all_rows(scores)}
    removed = [json.loads(line)["key"] for line in (filtered / "removed.jsonl").read_text().splitlines()]
    hits = sum(noisy.get(key, False) for key in removed)
    return {
        "filter_precision": hits / len(removed) if removed else float("nan"),
        "filter_recall": hits / max(1, sum(noisy.values())),
        "kept_pairs": len(noisy) - len(removed),
    }


def one_seed(work: Path, data: dict, name: str, seed: int) -> list[dict]:
    """Every variant for one set and seed; each result cached as JSON."""
    results = []
    modality = SETS[name][0]
    steps = STEPS[modality]
    early_steps = round(steps * EARLY_FRACTION)
    rest = steps - early_steps
    noisy = shard(work, data, name, RATE, seed)
    scores = work / "scores" / f"{name}-s{seed}"
    for variant in VARIANTS:
        tag = f"{name}-s{seed}-{variant}"
        cached = work / "results" / f"{tag}.json"
        if cached.exists():
            results.append(json.loads(cached.read_text()))
            continue
        started = time.perf_counter()
        extra: dict = {}
        if variant == "clean":
            clean = shard(work, data, name, 0.0, seed)
            run_dir = train(work, tag, clean, seed, steps, {"method": "none"}, None, modality)
        elif variant in ("a", "b"):
            method = "none" if variant == "a" else IN_TRAINING[modality]
            run_dir = train(work, tag, noisy, seed, steps, {"method": method}, None, modality)
        elif variant == "early":
            run_dir = train(work, tag, noisy, seed, early_steps, {"method": "none"}, None, modality)
            t0 = time.perf_counter()
            run([sys.executable, "-m", "mmcl", "shard", "score", noisy, "--checkpoint", run_dir,
                 "--output", scores, "--p-values", "--workers", "1", "--quiet"],
                work / "logs" / f"score-{tag}.log")  # fmt: skip
            summary = json.loads((scores / "scores.json").read_text())
            extra = {"score_seconds": round(time.perf_counter() - t0, 1),
                     "score_auroc": summary["fields"]["score"].get("noisy_auroc"),
                     "p_value_auroc": summary["fields"]["p_value"].get("noisy_auroc")}  # fmt: skip
        elif variant == "c":
            filtered = work / "shards" / f"{tag}-filtered"
            if not (filtered / "manifest.json").exists():
                run([sys.executable, "-m", "mmcl", "shard", "filter", noisy, "--scores", scores,
                     "--output", filtered, "--keep-fraction", KEEP, "--quiet"],
                    work / "logs" / f"filter-{tag}.log")  # fmt: skip
            extra = filter_quality(filtered, scores)
            run_dir = train(work, tag, filtered, seed, rest, {"method": "none"}, None, modality)
        else:
            values = np.array([row["score"] for _, row in all_rows(scores)])
            score_range = [
                round(float(np.quantile(values, 0.25)), 4),
                round(float(np.quantile(values, 0.75)), 4),
            ]
            if variant == "d":
                noise = {
                    "method": "alignment_score",
                    "score_range": score_range,
                    "warmup_steps": 0,
                    "ramp_steps": 0,
                }
            else:
                noise = {"method": IN_TRAINING[modality], "combine_scores": True, "score_range": score_range}
            run_dir = train(work, tag, noisy, seed, rest, noise, scores, modality)
            extra = {"score_range": score_range}
        seconds = time.perf_counter() - started
        result = {"set": name, "seed": seed, "variant": variant, "seconds": round(seconds, 1), **extra}
        if variant != "early":
            result.update(zero_shot(work, tag, run_dir, data))
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            result["noise_rate_estimate"] = rows[-1].get("noise_rate_estimate")
            result["weighting_used"] = any(r.get("noise_mean_weight", 1.0) < 0.999 for r in rows)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(result))
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def table(results: list[dict]) -> str:
    """Per set and variant: top-1 (mean, then per seed), kept of clean (per seed, then mean), the in-training
    noise-rate estimate at the end (b, e), the filter's precision/recall (c) and the early scores' AUROC."""
    lines = ["| set | variant | top-1: mean (per seed) | kept of clean | noise estimate at the end | "
             "filter precision / recall | early scores: noisy-pair AUROC |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in SETS:
        clean = {r["seed"]: r["acc1"] for r in results if r["set"] == name and r["variant"] == "clean"}
        for variant in DISPLAY_ORDER:
            runs = [r for r in results if r["set"] == name and r["variant"] == variant]
            if not runs:
                continue
            cells = ["", "", "", "", ""]
            if variant == "early":
                cells[4] = ", ".join(f"{r['score_auroc']:.3f}" for r in runs)
            else:
                accs = ", ".join(f"{r['acc1']:.3f}" for r in runs)
                cells[0] = f"{statistics.mean(r['acc1'] for r in runs):.3f} ({accs})"
                kept = [r["acc1"] / clean[r["seed"]] for r in runs if r["seed"] in clean]
                cells[1] = f"{statistics.mean(kept):.1%}" if kept else ""
                estimates = [
                    r["noise_rate_estimate"] for r in runs if r.get("noise_rate_estimate") is not None
                ]
                cells[2] = ", ".join(f"{e:.3f}" for e in estimates)
            if variant == "c":
                cells[3] = ", ".join(f"{r['filter_precision']:.3f} / {r['filter_recall']:.3f}" for r in runs)
            lines.append(f"| {name} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=["large", "small"])
    parser.add_argument("--table", action="store_true", help="only print the table of the cached results")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "out" / "curation")
    args = parser.parse_args()
    work = args.work_dir.resolve()
    results = []
    if args.table:
        results = [json.loads(p.read_text()) for p in sorted((work / "results").glob("*.json"))]
        print(table([r for r in results if r["set"] in args.sets and r["seed"] in args.seeds]))
        return
    for seed in args.seeds:
        for name in args.sets:
            modality, pairs = SETS[name]
            if modality == "audio":
                data, _ = audio_data(work, AUDIO_REPEATS, len(TRAIN_VOICES), PROMPTS["audio"])
            else:
                data = build_fashion_mnist(
                    work / "data" / f"fashion-mnist-{pairs}", pairs, IMAGE_TEST_PER_CLASS
                )
                data.update(prompts=PROMPTS["image"], templates=PROMPTS["image"])
            results += one_seed(work, data, name, seed)
    text = table(results)
    print(text)
    (work / "summary.json").write_text(json.dumps(results, indent=1))
    (work / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
