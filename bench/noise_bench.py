"""Noise-aware weighting, measured: zero-shot top-1 on held-out data vs injected caption noise.

For each modality, noise rate, weighting method and seed: shard the training pairs with
`mmcl shard --noise-rate R --seed S`, train a micro model with `mmcl train` (same steps, data, schedule and
seed for every method), evaluate zero-shot top-1 on held-out items (1,000 Fashion-MNIST test images; 600 clips
of 12 espeak-ng voices no training clip has), and read the detection AUROC, the noise-rate estimate and
samples/s from the run's metrics.jsonl. Results are cached per run (JSON in the work folder), so an
interrupted bench continues where it stopped.

    .venv/bin/python bench/noise_bench.py --modality image      # 32 runs, ~110 min on 2 idle cores
    .venv/bin/python bench/noise_bench.py --modality audio      # 32 runs, ~45 min
    .venv/bin/python bench/noise_bench.py --modality image --rates 0.2 0.5 0.8 --methods oracle
    .venv/bin/python bench/noise_bench.py --modality image --rates 0 0.5 --seeds 0
    .venv/bin/python bench/noise_bench.py --modality image --rates 0 0.5 --methods local_fdr --seeds 0 \
        --steps 3000
    .venv/bin/python bench/noise_bench.py --modality audio --rates 0.5 0 --methods loss_mixture_unlearn \
        --seeds 0 1 2 3

Fewer passes over more pairs (closer to a stream; cached under their own names, e.g. image30000-...):

    .venv/bin/python bench/noise_bench.py --modality image --image-pairs 30000 --steps 2400 --rates 0 0.5
    .venv/bin/python bench/noise_bench.py --modality audio --audio-repeats 40 --rates 0 0.5     # 3,200 clips

More training speakers (the demo's 8 voices, then espeak-ng's named variants; the test voices stay unseen),
e.g. 32 voices x 10 clips per word = 3,200 clips, cached as audio3200v32-...; another audio recipe:

    .venv/bin/python bench/noise_bench.py --modality audio --audio-voices 32 --audio-repeats 10 --rates 0 0.5
    .venv/bin/python bench/noise_bench.py --modality audio --audio-recipe my_audio.yaml --rates 0 0.5

Image runs scored on all 10,000 Fashion-MNIST test images instead of the 1,000 (a run's top-1 on 1,000 images
has a standard error of ~1 point, as large as the gaps the targets ask about; cached per test set, and a run
already trained is only scored again):

    .venv/bin/python bench/noise_bench.py --modality image --image-pairs 30000 --steps 2400 --rates 0 0.5 \
        --image-test full

Twice the steps (10 passes; ~13-15 min a run):

    .venv/bin/python bench/noise_bench.py --modality image --image-pairs 30000 --steps 4800 --rates 0 0.5 \
        --methods local_fdr none oracle --image-test full

Another learning rate for every run (cached as image-micro_resnet-lr0.0005-...): the image recipe's 2e-3
collapses at 80% noise (the loss stays at log 64), a quarter of it learns there:

    .venv/bin/python bench/noise_bench.py --modality image --lr 5e-4 --rates 0.8 0.5 0 \
        --methods none local_fdr oracle --image-test full

Another noise.floor (cached as ...-f0.1-...; no pair weighs less than it; the library's default is 0):

    .venv/bin/python bench/noise_bench.py --modality image --floor 0.1 --rates 0.5 --methods local_fdr \
        --image-test full

Another noise.window (cached as ...-w4096-...; the bench's 2,048 p-values or losses are 32 steps, the
library's default is 4,096):

    .venv/bin/python bench/noise_bench.py --modality image --image-pairs 30000 --lr 5e-4 --steps 2400 \
        --window 4096 --rates 0.8 --methods local_fdr none --image-test full
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.demo_data import (  # noqa: E402
    AUDIO_TEST_SETTINGS,
    AUDIO_TEST_VOICES,
    EXTRA_TRAIN_VOICES,
    TRAIN_VOICES,
    WORDS,
    build_fashion_mnist,
    build_held_out_speech,
    build_spoken_words,
    write_caption_prompts,
)

IMAGE_PAIRS = 6000  # Fashion-MNIST training pairs
AUDIO_REPEATS = 8  # clips per word and training voice: 640 clips, as `mmcl demo`
IMAGE_TEST_PER_CLASS = 100  # the bench's 1,000 test images; --image-test full: all 10,000 (1,000 per class)
FULL_TEST_PER_CLASS = 1000
STEPS = {"image": 1200, "audio": 250}  # image: 12.8 epochs of 6,000 pairs; audio: 25 epochs of 640 clips
# uniform weights for the first steps, then blended in (noise.warmup_steps, noise.ramp_steps); the same for
# every method
WEIGHTING_SCHEDULE = {"image": (150, 60), "audio": (62, 25)}
WINDOW = 2048  # noise.window: the per-pair signals each estimate is fitted on (32 steps of 64 pairs)
# image: the micro ResNet learns these pairs to 88-89% zero-shot at 1,200 steps (the micro ViT of micro.yaml:
# ~75%)
RECIPES = {"image": "image_text/micro_resnet.yaml", "audio": "audio_text/micro.yaml"}
METHODS = ["none", "local_fdr", "loss_mixture", "teacher"]
# further settings of a method, run with --methods NAME: the teacher with soft targets
# (noise.soft_target_alpha); loss_mixture with negative learning on the pairs it doubts (noise.unlearn_weight)
VARIANTS = {
    "teacher_soft": {"method": "teacher", "soft_target_alpha": 0.3},
    "loss_mixture_unlearn": {"method": "loss_mixture", "unlearn_weight": 1.0},
    "local_fdr_unlearn": {"method": "local_fdr", "unlearn_weight": 1.0},
}
FULL_TEST_TAG = "-test10000"
CAPTION_PROMPTS_TAG = "-captions"
# result-file suffixes: the default test sets and prompts, all 10,000 Fashion-MNIST test images, the audio
# runs scored with prompts in their training captions' wording
TEST_TAGS = ["", FULL_TEST_TAG, CAPTION_PROMPTS_TAG]
# zero-shot prompts: a built-in set of `mmcl eval`, or "captions": the training captions' phrasings, each a
# template
PROMPTS = {"image": "short", "audio": "captions"}
CAPTION_PROMPTS_FILE = "caption-prompts.txt"  # under the work folder's data/: AUDIO_CAPTIONS, one per line
# not an estimator: the weights every estimator aims at (1 clean, 0 noisy), the ceiling of weighting
ORACLE = "oracle"


def oracle_shards(shards: Path, out: Path) -> Path:
    """A copy of `shards` whose .json carry alignment_score = 0 for noisy pairs, 1 for clean ones, so that
    `noise.method: alignment_score` trains with the true weights: the reference no estimator can beat."""
    if (out / "sizes.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as source, tarfile.open(out / f"{shard.name}.tmp", "w") as copy:
            for member in source:
                data = source.extractfile(member).read()
                if member.name.endswith(".json"):
                    meta = json.loads(data)
                    meta["alignment_score"] = 0.0 if meta["noisy"] else 1.0
                    data = json.dumps(meta).encode()
                member.size = len(data)
                copy.addfile(member, io.BytesIO(data))
        (out / f"{shard.name}.tmp").rename(out / shard.name)
    (out / "sizes.json").write_text((shards / "sizes.json").read_text())
    return out


def run(command: list, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        result = subprocess.run(
            list(map(str, command)),
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"},
        )
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(map(str, command))}\n{log.read_text()[-2000:]}")


def label_of_test_set(data: dict) -> str:
    """How a result names what it was scored on: the test set's data folder and the class folders' parent, and
    the prompts when they are the training captions' (a label without prompts: a built-in set of
    `mmcl eval`)."""
    label = f"{data['test'].parent.name}/{data['test'].name}"
    return f"{label}, caption prompts" if data["prompts"] == "captions" else label


def zero_shot(work: Path, name: str, run_dir: Path, data: dict) -> dict:
    """Zero-shot top-1 of the run's final checkpoint on the held-out class folders `data["test"]`, with the
    prompts `data["templates"]` (a built-in set or a file); report in eval/NAME, NAME tagged by test set and
    prompts."""
    eval_dir = work / "eval" / name
    run(
        [
            sys.executable,
            "-m",
            "mmcl",
            "eval",
            "zero-shot",
            "--checkpoint",
            run_dir,
            "--data",
            data["test"],
            "--format",
            "class-folder",
            "--templates",
            data["templates"],
            "--output",
            eval_dir,
            "--quiet",
            "--workers",
            "0",
        ],
        work / "logs" / f"eval-{name}.log",
    )
    results = json.loads((eval_dir / "results.json").read_text())
    return {"acc1": results["metrics"]["acc1"], "test_set": label_of_test_set(data)}


@dataclass(frozen=True)
class Setting:
    """One cell of the grid: what a training run is given. `dataset` names the training set in the run's and
    shards' names (the modality, plus the number of pairs when it is not the default set); `lr` replaces the
    recipe's learning rate, `window` the bench's noise.window and `floor` noise.floor (0), each named in the
    run's name when given."""

    modality: str
    recipe: Path
    dataset: str
    rate: float
    method: str
    seed: int
    steps: int
    lr: float | None = None
    window: int | None = None
    floor: float | None = None

    @property
    def name(self) -> str:
        lr_tag = "" if self.lr is None else f"-lr{self.lr:g}"
        window_tag = "" if self.window is None else f"-w{self.window}"
        floor_tag = "" if self.floor is None else f"-f{self.floor:g}"
        return (
            f"{self.dataset}-{self.recipe.stem}{lr_tag}{window_tag}{floor_tag}-r{self.rate:g}-{self.method}"
            f"-s{self.seed}-n{self.steps}"
        )


def one_run(work: Path, setting: Setting, data: dict) -> dict:
    """One training run and its zero-shot eval (cached: one result per run and test set). A cached run
    measured on another test set is evaluated again from its checkpoint (retrained if that is gone)."""
    name, own_tag = setting.name, data.get("test_tag", "")
    result_file = work / "results" / f"{name}{own_tag}.json"
    run_dir = work / "runs" / name
    cached = cached_result(work, name, own_tag, run_dir, data)
    if cached is not None:
        return cached
    shards = noisy_shards(work, setting, data)
    config = training_config(setting, shards, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun's metrics and checkpoints are this run's alone
    config_path = work / "configs" / f"{name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    run([sys.executable, "-m", "mmcl", "train", "--config", config_path], work / "logs" / f"train-{name}.log")
    train_seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    steady = [r["samples_per_s"] for r in train_rows[len(train_rows) // 4 :]]
    result = {
        "modality": setting.modality,
        "dataset": setting.dataset,
        "recipe": setting.recipe.stem,
        "lr": config["optim"]["lr"],
        "window": config["noise"]["window"],
        "floor": config["noise"]["floor"],
        "rate": setting.rate,
        "method": setting.method,
        "seed": setting.seed,
        "steps": setting.steps,
        **zero_shot(work, f"{name}{own_tag}", run_dir, data),
        "train_seconds": round(train_seconds, 1),
        "samples_per_s": statistics.median(steady),
        "auroc": train_rows[-1].get("noise_auroc"),
        "signal_auroc": train_rows[-1].get(
            "noise_signal_auroc"
        ),  # the estimator's signal itself, gate open or shut
        "noise_rate_estimate": train_rows[-1].get("noise_rate_estimate"),
        # the first logged step at which weighting was in use (the mixture found two modes), None if never
        "weighting_from_step": next(
            (r["step"] for r in train_rows if r.get("noise_mean_weight", 1.0) < 1.0), None
        ),
    }
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result))
    return result


def cached_result(work: Path, name: str, own_tag: str, run_dir: Path, data: dict) -> dict | None:
    """The run's result on this test set if one is cached; else one cached for another test set, scored
    again on this one from the run's checkpoint (and cached) while that exists; else None."""
    result_file = work / "results" / f"{name}{own_tag}.json"
    others = (work / "results" / f"{name}{tag}.json" for tag in TEST_TAGS if tag != own_tag)
    for scored in [result_file, *others]:
        if not scored.exists():
            continue
        result = json.loads(scored.read_text())
        if result.get("test_set") == label_of_test_set(data):
            return result
        if (run_dir / "checkpoints").exists():
            result.update(zero_shot(work, f"{name}{own_tag}", run_dir, data))
            result_file.write_text(json.dumps(result))
            return result
    return None


def noisy_shards(work: Path, setting: Setting, data: dict) -> Path:
    """The training pairs sharded with the setting's noise rate and seed (the oracle's copy for `oracle`)."""
    shards = work / "shards" / f"{setting.dataset}-r{setting.rate:g}-s{setting.seed}"
    pairs = sum(1 for _ in open(data["train"])) - 1
    media = (
        ["--sample-rate", "16000", "--max-seconds", "1.5"]
        if setting.modality == "audio"
        else ["--image-format", "png"]
    )
    run(
        [
            sys.executable,
            "-m",
            "mmcl",
            "shard",
            f"{setting.modality}-text",
            "--input",
            data["train"],
            "--output",
            shards,
            "--shard-size",
            max(8, pairs // 16),
            "--shuffle",
            "--seed",
            setting.seed,
            "--noise-rate",
            setting.rate,
            "--label-column",
            "label",
            "--quiet",
            *media,
        ],
        work / "logs" / f"shard-{shards.name}.log",
    )
    if setting.method == ORACLE:
        shards = oracle_shards(shards, work / "shards" / f"{shards.name}-oracle")
    return shards


def training_config(setting: Setting, shards: Path, run_dir: Path) -> dict:
    """The recipe with the bench's data, steps, schedule and weighting (the same for every method)."""
    config = yaml.safe_load(setting.recipe.read_text())
    steps = setting.steps
    config["run"] = {"output_dir": str(run_dir), "seed": setting.seed}
    config["data"].update({"sources": [{"urls": str(shards)}], "workers": 1, "seed": setting.seed})
    config["train"].update({"steps": steps, "log_every": 20, "checkpoint_every": steps, "resume": "never"})
    config["optim"]["warmup_steps"] = steps // 10
    if setting.lr is not None:
        config["optim"]["lr"] = setting.lr
    warmup, ramp = WEIGHTING_SCHEDULE[setting.modality]
    config["noise"] = {"method": setting.method, "warmup_steps": warmup, "ramp_steps": ramp,
                       "window": setting.window or WINDOW, "floor": setting.floor or 0.0}  # fmt: skip
    config["noise"].update(VARIANTS.get(setting.method, {}))
    if setting.method == ORACLE:
        config["noise"].update(method="alignment_score", score_range=[0.0, 1.0])
    return config


def same_seed_pairs(runs: list[dict], others: list[dict]) -> list[tuple[float, float]]:
    """(top-1 of a run, top-1 of the other run with its seed) for every seed both have. A seed's clean
    accuracy on held-out voices can be 10 points off another's, more than 50% noise costs, so means and
    differences are taken over the same seeds."""
    other = {r["seed"]: r["acc1"] for r in others}
    return [(r["acc1"], other[r["seed"]]) for r in runs if r["seed"] in other]


def kept_of_clean(runs: list[dict], clean_runs: list[dict]) -> str:
    """Mean top-1 as a share of the mean clean top-1, both over the seeds that have a 0%-noise run."""
    paired = same_seed_pairs(runs, clean_runs)
    if not paired:
        return ""
    return f"{100 * statistics.mean(a for a, _ in paired) / statistics.mean(c for _, c in paired):.1f}%"


def paired_with_off(runs: list[dict], off_runs: list[dict]) -> str:
    """Top-1 minus weighting off's at the same noise rate and seed, in points: the mean, with the range."""
    diffs = [100 * (a - off) for a, off in same_seed_pairs(runs, off_runs)]
    if not diffs:
        return ""
    return f"{statistics.mean(diffs):+.1f} ({min(diffs):+.1f}..{max(diffs):+.1f}, {len(diffs)} seeds)"


def table(results: list[dict]) -> str:
    lines = [
        "| modality | noise | method | top-1 (mean of seeds) | seeds | kept vs 0% | vs off, same seed | "
        "detection AUROC | noise rate estimate | weighting from step | samples/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r.get("dataset", r["modality"]), r["rate"], r["method"]), []).append(r)
    for (modality, rate, method), runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        acc = statistics.mean(r["acc1"] for r in runs)
        clean = groups.get((modality, 0.0, method)) or groups.get(
            (modality, 0.0, "none")
        )  # oracle at 0% = off
        kept = kept_of_clean(runs, clean or [])
        aurocs = [r["auroc"] for r in runs if r["auroc"] is not None]
        auroc = f"{statistics.mean(aurocs):.3f}" if aurocs and rate > 0 else ""
        estimates = [r["noise_rate_estimate"] for r in runs if r.get("noise_rate_estimate") is not None]
        estimate = ", ".join(f"{e:.2f}" for e in estimates)
        seeds = ", ".join(f"{100 * r['acc1']:.1f}" for r in runs)
        speed = statistics.mean(r["samples_per_s"] for r in runs)
        started = ", ".join(str(r.get("weighting_from_step") or "never") for r in runs)
        started = "" if method == "none" else started
        paired = "" if method == "none" else paired_with_off(runs, groups.get((modality, rate, "none"), []))
        lines.append(
            f"| {modality} | {rate:.0%} | {method} | {100 * acc:.1f}% | {seeds} | {kept} | {paired} | "
            f"{auroc} | {estimate} | {started} | {speed:.0f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modality", nargs="+", default=["image", "audio"], choices=["image", "audio"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.2, 0.5, 0.8])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=METHODS,
        choices=[*METHODS, *VARIANTS, ORACLE],
        help=f"{ORACLE}: train with the true weights (the ceiling of any weighting; not an estimator)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument(
        "--image-recipe",
        type=Path,
        default=REPO / "configs" / RECIPES["image"],
        help="training recipe of the image runs (its model; steps, data and weighting are the bench's)",
    )
    parser.add_argument(
        "--audio-recipe",
        type=Path,
        default=REPO / "configs" / RECIPES["audio"],
        help="training recipe of the audio runs (its model; steps, data and weighting are the bench's)",
    )
    parser.add_argument("--steps", type=int, help=f"training steps of every run (default: {STEPS})")
    parser.add_argument(
        "--lr",
        type=float,
        help="learning rate of every run (default: the recipe's; the image recipe's "
        "2e-3 collapses at 80%% noise, 5e-4 learns there)",
    )
    parser.add_argument(
        "--window",
        type=int,
        help=f"noise.window of every run (default: {WINDOW}; the library's default is 4,096)",
    )
    parser.add_argument(
        "--floor", type=float, help="noise.floor of every run: no pair weighs less (default: 0)"
    )
    parser.add_argument(
        "--image-pairs",
        type=int,
        default=IMAGE_PAIRS,
        help="Fashion-MNIST training pairs of the image runs (more pairs: fewer passes over each)",
    )
    parser.add_argument(
        "--audio-repeats",
        type=int,
        default=AUDIO_REPEATS,
        help="spoken clips per word and training voice of the audio runs (8: 640 clips)",
    )
    parser.add_argument(
        "--audio-voices",
        type=int,
        default=len(TRAIN_VOICES),
        help=f"training voices of the audio runs: the demo's {len(TRAIN_VOICES)}, then more from "
        f"espeak-ng's variants (at most {len(TRAIN_VOICES) + len(EXTRA_TRAIN_VOICES)}; never a test voice)",
    )
    parser.add_argument(
        "--image-test",
        choices=["1000", "full"],
        default="1000",
        help="score image runs on the bench's 1,000 test images (100 per class) or on all 10,000; "
        "a trained run is scored on the other from its checkpoint",
    )
    parser.add_argument(
        "--audio-prompts",
        choices=["captions", "audio"],
        default=PROMPTS["audio"],
        help="zero-shot prompts of the audio runs: the training captions' phrasings ('a person saying "
        "{}.', ...), or mmcl's CLAP-style sound prompts ('This is a sound of {}.', ...: words the "
        "bench's text tower, trained from scratch on the captions, never saw)",
    )
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "out" / "noise")
    return parser  # fmt: skip


def image_data(work: Path, pairs: int, test: str) -> tuple[dict, str]:
    """The Fashion-MNIST training pairs and test images (`test` "full": all 10,000), and the set's name."""
    default = pairs == IMAGE_PAIRS
    suffix = "" if default else f"-{pairs}"
    data = build_fashion_mnist(work / "data" / f"fashion-mnist{suffix}", pairs, IMAGE_TEST_PER_CLASS)
    data.update(prompts=PROMPTS["image"], templates=PROMPTS["image"])
    if test == "full":  # the same training pairs, scored on the whole test split
        full = build_fashion_mnist(work / "data" / "fashion-mnist-test10000", 0, FULL_TEST_PER_CLASS)
        data.update(test=full["test"], test_tag=FULL_TEST_TAG)
    return data, "image" if default else f"image{pairs}"


def audio_data(work: Path, repeats: int, voice_count: int, prompts: str) -> tuple[dict, str]:
    """The spoken words of `voice_count` training voices, `repeats` clips per word and voice, the held-out
    voices' clips and the prompts, and the set's name."""
    voices = [*TRAIN_VOICES, *EXTRA_TRAIN_VOICES][:voice_count]
    more_voices = len(voices) > len(TRAIN_VOICES)
    templates = prompts
    if prompts == "captions":  # written once, read by every audio run's eval
        templates = write_caption_prompts(work / "data" / CAPTION_PROMPTS_FILE)
    default = repeats == AUDIO_REPEATS and not more_voices
    suffix = "" if default else f"-{repeats}" + (f"-v{len(voices)}" if more_voices else "")
    data = {"train": build_spoken_words(work / "data" / f"spoken-words{suffix}", repeats,
                                        voices=voices if more_voices else None),
            "test": build_held_out_speech(work / "data" / "spoken-words-test600" / "test", AUDIO_TEST_VOICES,
                                          AUDIO_TEST_SETTINGS),
            "prompts": prompts, "templates": templates,
            "test_tag": CAPTION_PROMPTS_TAG if prompts == "captions" else ""}  # fmt: skip
    name = (
        "audio"
        if default
        else f"audio{len(WORDS) * len(voices) * repeats}" + (f"v{len(voices)}" if more_voices else "")
    )
    return data, name


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    work = args.work_dir.resolve()
    data, datasets = {}, {}  # per modality: the built set, and its name in run and shard names
    if "image" in args.modality:
        data["image"], datasets["image"] = image_data(work, args.image_pairs, args.image_test)
    if "audio" in args.modality:
        if not len(TRAIN_VOICES) <= args.audio_voices <= len(TRAIN_VOICES) + len(EXTRA_TRAIN_VOICES):
            parser.error(
                f"--audio-voices must be {len(TRAIN_VOICES)}..{len(TRAIN_VOICES) + len(EXTRA_TRAIN_VOICES)}"
            )
        data["audio"], datasets["audio"] = audio_data(
            work, args.audio_repeats, args.audio_voices, args.audio_prompts
        )
    results = []
    for seed in args.seeds:  # seed outermost: a cut-short bench still has every cell of the grid once
        for modality in args.modality:
            for rate in args.rates:
                for method in args.methods:
                    if method == ORACLE and rate == 0:
                        continue  # the true weights of clean data are all 1: weighting off's run
                    recipe = args.image_recipe if modality == "image" else args.audio_recipe
                    setting = Setting(
                        modality,
                        recipe.resolve(),
                        datasets[modality],
                        rate,
                        method,
                        seed,
                        args.steps or STEPS[modality],
                        args.lr,
                        args.window,
                        args.floor,
                    )
                    r = one_run(work, setting, data[modality])
                    print(json.dumps(r), flush=True)
                    results.append(r)
    print(table(results))
    (work / "summary.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
