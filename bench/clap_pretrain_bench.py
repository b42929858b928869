"""Pretrained audio towers, measured: does an audio tower that mmcl pretrained on one offline corpus start a
small, *different* real audio-text set better than training from scratch, for the same steps?

1. Pretrain a tiny CLAP-shaped model, a random transformers ClapModel (HTSAT audio tower, RoBERTa text
   tower, 16 kHz, 1 s windows; tests/hf_models.py), with `mmcl train` (`model.hf_clap`,
   `hf_clap_pretrained: false`) on the pretraining corpus: by default 2,000 sounds that sox synthesizes
   (tones, plucks, noises; short, long or swelling; steady, rising or falling; once or repeated; dry, with
   reverb or echo, distorted or wobbling), each captioned by what it is made of (bench/sound_corpora.py).
   Save it in the transformers format: `mmcl export --format hf` -> a ClapModel folder.
2. On the target, Sonic Pi's samples (133 clips in 10 categories read off their names; 88 training clips,
   each with 4 caption phrasings, and 45 test clips; bench/sound_corpora.py), train for the same steps, per
   seed and for each start (`--arms`):
     scratch    the same architecture with fresh weights
     unfrozen   from the pretrained tower, every weight trained
     frozen     from the pretrained tower, locked (`model.freeze_media`): only what is new trains
   and for each of two models (`--towers`):
     audio      the audio tower alone (`model.audio.tower: hf`, `hf_model: EXPORTED`, or `hf_model: null`
                with its config for scratch), a new projection, and mmcl's micro open_clip text tower from
                scratch: the comparison issue 40 asks for
     clap       the whole CLAP model (`model.hf_clap: EXPORTED`; scratch: `hf_clap_pretrained: false`), its
                text tower pretrained too (on the corpus' captions, which never name a Sonic Pi category)
3. Score zero-shot top-1 on the 45 test clips (`mmcl eval zero-shot --format class-folder`) with prompts in
   the captions' phrasings ("the sound of a kick drum.", ...). Chance: 1/10; always the largest class
   (tabla): 9/45.

Each run is cached as JSON under --work-dir (default bench/out/clap_pretrain/); an interrupted bench goes on
where it stopped. Results: a table on stdout and WORK_DIR/summary.json.

    .venv/bin/python bench/clap_pretrain_bench.py                                  # 3 seeds, ~70 min
    .venv/bin/python bench/clap_pretrain_bench.py --seeds 0 --steps 100 --pretrain-steps 200   # a pilot
    .venv/bin/python bench/clap_pretrain_bench.py --towers audio --corpus speech   # espeak-ng's words

`--corpus speech` pretrains on the demo's 640 spoken words (pipelines/demo_data.py) instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

import hf_models  # noqa: E402
from noise_bench import run  # noqa: E402
from sound_corpora import RATE, build_drum_kits, build_sonic_pi, build_synth_sounds  # noqa: E402

from mmcl.models.hf_audio_settings import CONFIG_FILE, read_features, read_hf_json  # noqa: E402
from pipelines.demo_data import build_spoken_words  # noqa: E402

TOWERS = ("audio", "clap")
ARMS = ("scratch", "frozen", "unfrozen")
# the tiny ClapModel's feature extractor: 16 kHz, 1 s windows (HTSAT resizes every mel to its 256 x 256
# input, so the window's length hardly changes the cost)
EXTRACTOR = {"sampling_rate": RATE, "hop_length": 160, "fft_window_size": 512, "max_length_s": 1,
             "frequency_max": 8000}  # fmt: skip


@dataclass(frozen=True)
class Options:
    """What the bench runs; every run's cache name carries what sets it apart."""

    work: Path
    corpus: str
    corpus_size: int
    width: int
    pretrain_steps: int
    steps: int
    lr: float
    batch: int
    seeds: tuple[int, ...]
    towers: tuple[str, ...]
    arms: tuple[str, ...]

    @property
    def pretrain_name(self) -> str:
        return f"{self.corpus}{self.corpus_size}-w{self.width}-n{self.pretrain_steps}"

    def run_name(self, tower: str, arm: str, seed: int) -> str:
        start = f"{arm}-{self.pretrain_name}"
        if (
            arm == "scratch"
        ):  # CLAP's scratch keeps the corpus' tokenizer; the audio tower's is the corpus' own
            start = f"scratch-{self.corpus}{self.corpus_size}" if tower == "clap" else "scratch"
        return f"{tower}-{start}-w{self.width}-lr{self.lr:g}-b{self.batch}-n{self.steps}-s{seed}"


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus",
        choices=["mix", "drums", "synth", "speech"],
        default="mix",
        help="pretraining corpus: Hydrogen's drum kits and sox-synthesized sounds (mix), either alone, or "
        "espeak-ng's spoken words",
    )
    parser.add_argument(
        "--corpus-size",
        type=int,
        default=2000,
        help="synth sounds (mix, synth; drums: ignored), or clips per word and voice (speech: 8 voices, 10 "
        "words)",
    )
    parser.add_argument(
        "--width", type=int, default=16, help="HTSAT's first-stage channels (doubled each of its 4 stages)"
    )
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=400, help="training steps of every target run")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every target run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--towers", nargs="+", choices=TOWERS, default=list(TOWERS))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "out" / "clap_pretrain")
    args = parser.parse_args(argv)  # fmt: skip
    if args.corpus == "speech" and args.corpus_size > 100:
        parser.error("--corpus speech: --corpus-size is clips per word and voice (8 gives 640 clips)")
    return Options(args.work_dir.resolve(), args.corpus, args.corpus_size, args.width, args.pretrain_steps,
                   args.steps, args.lr, args.batch, tuple(args.seeds), tuple(args.towers),
                   tuple(args.arms))  # fmt: skip


def mmcl(*args) -> list:
    return [sys.executable, "-m", "mmcl", *args]


def shard(work: Path, manifest: Path, name: str, labelled: bool) -> Path:
    """The manifest's clips as mmcl shards (16 kHz, shuffled), once."""
    out = work / "shards" / name
    if not (out / "manifest.json").exists():
        label = ["--label-column", "label"] if labelled else []
        run(mmcl("shard", "audio-text", "--input", manifest, "--output", out, "--sample-rate", RATE,
                 "--shard-size", 64, "--shuffle", "--seed", 0, "--quiet", *label),
            work / "logs" / f"shard-{name}.log")  # fmt: skip
    return out


def corpus(opts: Options) -> tuple[Path, list[str]]:
    """The pretraining corpus' shards and captions."""
    if opts.corpus == "speech":
        manifest = build_spoken_words(
            opts.work / "data" / f"spoken-words-{opts.corpus_size}", opts.corpus_size
        )
        with open(manifest, newline="") as handle:
            captions = [row["caption"] for row in csv.DictReader(handle)]
    else:
        parts = []
        if opts.corpus in ("mix", "drums"):
            parts.append(build_drum_kits(opts.work / "data" / "drums"))
        if opts.corpus in ("mix", "synth"):
            parts.append(
                build_synth_sounds(opts.work / "data" / f"synth-{opts.corpus_size}", opts.corpus_size)
            )
        manifest = opts.work / "data" / f"{opts.corpus}-{opts.corpus_size}.csv"  # paths relative to data/
        with open(manifest, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["path", "caption"])
            for part in parts:
                with open(part["train"], newline="") as handle:
                    folder = part["train"].parent.name
                    writer.writerows([f"{folder}/{r['path']}", r["caption"]] for r in csv.DictReader(handle))
        captions = [c for part in parts for c in part["captions"]]
    return shard(opts.work, manifest, f"{opts.corpus}{opts.corpus_size}", labelled=False), captions


def init_model(opts: Options, captions: list[str]) -> Path:
    """The random tiny ClapModel every run starts from (its weights, or its architecture): HTSAT `width`
    channels wide, a 2-layer RoBERTa of width 64, a byte-level BPE trained on the corpus' captions."""
    folder = opts.work / "models" / f"init-{opts.corpus}{opts.corpus_size}-w{opts.width}"
    if not (folder / "model.safetensors").exists():
        htsat = {
            **hf_models.TINY_HTSAT,
            "patch_embeds_hidden_size": opts.width,
            "hidden_size": opts.width * 8,
        }
        text = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
        hf_models.tiny_clap(folder, captions, extractor=EXTRACTOR, htsat=htsat, text=text, projection_dim=64,
                            vocab_size=1000)  # fmt: skip
    return folder


def train(opts: Options, name: str, model: dict, shards: Path, steps: int, seed: int) -> dict:
    """`mmcl train` of `model` on `shards`; the run's folder, wall time and steady data-wait share."""
    run_dir = opts.work / "runs" / name
    config = {
        "run": {"output_dir": str(run_dir), "seed": seed},
        "model": model,
        "data": {"sources": [{"urls": str(shards)}], "batch_size": opts.batch, "workers": 1,
                 "shuffle_buffer": 500, "seed": seed},
        "optim": {"lr": opts.lr, "warmup_steps": steps // 10},
        "train": {"steps": steps, "log_every": 20, "checkpoint_every": steps, "resume": "never"},
    }  # fmt: skip
    path = opts.work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    run(mmcl("train", "--config", path), opts.work / "logs" / f"train-{name}.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"run_dir": run_dir, "train_seconds": round(time.perf_counter() - started, 1),
            "final_loss": round(statistics.mean(losses[-3:]), 4)}  # fmt: skip


def pretrain(opts: Options, init: Path, shards: Path) -> Path:
    """The pretrained model in the transformers format (`mmcl export --format hf`), trained once."""
    exported = opts.work / "models" / f"pretrained-{opts.pretrain_name}"
    if not (exported / "model.safetensors").exists():
        model = {"hf_clap": str(init), "hf_clap_pretrained": False}
        done = train(opts, f"pretrain-{opts.pretrain_name}", model, shards, opts.pretrain_steps, seed=0)
        run(mmcl("export", "--format", "hf", done["run_dir"], exported),
            opts.work / "logs" / f"export-{opts.pretrain_name}.log")  # fmt: skip
        (exported / "pretraining.json").write_text(json.dumps({**done, "run_dir": str(done["run_dir"])}))
    return exported


def zero_shot(opts: Options, name: str, model_args: list, target: dict) -> dict:
    """Zero-shot top-1 and mean per-class recall on the target's test clips, prompts in the captions'
    phrasings."""
    out = opts.work / "eval" / name
    run(mmcl("eval", "zero-shot", *model_args, "--data", target["test"], "--format", "class-folder",
             "--templates", target["templates"], "--output", out, "--quiet", "--workers", "0"),
        opts.work / "logs" / f"eval-{name}.log")  # fmt: skip
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    return {"acc1": metrics["acc1"], "mean_per_class_recall": metrics["mean_per_class_recall"]}


def target_model(tower: str, arm: str, init: Path, exported: Path) -> dict:
    """The model section of a target run."""
    pretrained = arm != "scratch"
    if tower == "clap":
        model = {"hf_clap": str(exported if pretrained else init), "hf_clap_pretrained": pretrained}
    else:
        audio = {"tower": "hf", "hf_model": str(exported)}
        if not pretrained:  # the same encoder, fresh weights (seeded by run.seed)
            audio = {"tower": "hf", "hf_model": None, "hf_config": read_hf_json(str(init), CONFIG_FILE),
                     "hf_features": read_features(str(init))}  # fmt: skip
        model = {"modality": "audio", "open_clip_name": "mmcl-micro-vit", "audio": audio}
    return {**model, "freeze_media": arm == "frozen"}


def one_run(opts: Options, tower: str, arm: str, seed: int, models: dict, data: dict) -> dict:
    """One target run and its zero-shot score (cached)."""
    name = opts.run_name(tower, arm, seed)
    result_file = opts.work / "results" / f"{name}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    model = target_model(tower, arm, models["init"], models["pretrained"])
    done = train(opts, name, model, data["shards"], opts.steps, seed)
    result = {"tower": tower, "arm": arm, "seed": seed, "steps": opts.steps, "lr": opts.lr,
              "pretrained": None if arm == "scratch" else opts.pretrain_name,
              **zero_shot(opts, name, ["--checkpoint", done["run_dir"]], data["target"]),
              "train_seconds": done["train_seconds"], "final_loss": done["final_loss"]}  # fmt: skip
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result))
    return result


def table(results: list[dict], reference: dict, test_clips: int) -> str:
    """Per model and start: top-1 per seed, the mean, and the gain over scratch at the same seed."""
    lines = [
        "| model | start | top-1 per seed | mean top-1 | vs scratch, same seed | mean per-class recall |",
        "| --- | --- | --- | ---: | --- | ---: |",
    ]
    for tower in TOWERS:
        scratch = {r["seed"]: r["acc1"] for r in results if r["tower"] == tower and r["arm"] == "scratch"}
        for arm in ARMS:
            runs = sorted(
                (r for r in results if r["tower"] == tower and r["arm"] == arm), key=lambda r: r["seed"]
            )
            if not runs:
                continue
            diffs = [100 * (r["acc1"] - scratch[r["seed"]]) for r in runs if r["seed"] in scratch]
            gain = (
                f"{statistics.mean(diffs):+.1f} ({min(diffs):+.1f}..{max(diffs):+.1f})"
                if arm != "scratch" and diffs
                else ""
            )
            per_seed = ", ".join(f"{100 * r['acc1']:.1f}" for r in runs)
            recall = statistics.mean(r["mean_per_class_recall"] for r in runs)
            mean = 100 * statistics.mean(r["acc1"] for r in runs)
            lines.append(f"| {tower} | {arm} | {per_seed} | {mean:.1f} "
                         f"| {gain} | {100 * recall:.1f} |")  # fmt: skip
    lines.append(f"| clap | pretrained, no target training | {100 * reference['acc1']:.1f} | | | "
                 f"{100 * reference['mean_per_class_recall']:.1f} |")  # fmt: skip
    lines.append(
        f"| chance | | {100 / 10:.1f} (largest class always: {100 * 9 / test_clips:.1f}) | | | 10.0 |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    target = build_sonic_pi(opts.work / "data" / "sonic-pi")
    data = {"target": target, "shards": shard(opts.work, target["train"], "sonic-pi", labelled=True)}
    shards, captions = corpus(opts)
    init = init_model(opts, captions)
    models = {"init": init, "pretrained": pretrain(opts, init, shards)}
    reference = zero_shot(
        opts, f"pretrained-{opts.pretrain_name}", ["--hf-clap", models["pretrained"]], target
    )
    results = []
    for seed in opts.seeds:  # seed outermost: a cut-short bench still has every cell once
        for tower in opts.towers:
            for arm in opts.arms:
                results.append(one_run(opts, tower, arm, seed, models, data))
                print(json.dumps(results[-1]), flush=True)
    test_clips = sum(len(v["test"]) for v in target["split"].values())
    print(table(results, reference, test_clips))
    pretraining = json.loads((models["pretrained"] / "pretraining.json").read_text())
    (opts.work / "summary.json").write_text(json.dumps(
        {"pretraining": {"name": opts.pretrain_name, **pretraining}, "pretrained_zero_shot": reference,
         "test_clips": test_clips, "runs": results}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
