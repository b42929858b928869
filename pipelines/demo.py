"""`mmcl demo`: the whole pipeline on small real data, on a CPU, in minutes.

For each modality: build a real dataset offline (Fashion-MNIST images, espeak-ng spoken words), shard it
with injected caption noise, train a micro dual encoder with noise-aware weighting (2 processes through
accelerate), evaluate zero-shot classification and retrieval on held-out items (held-out voices for
audio), and write a report (Markdown + PNG plots). Each stage calls the same commands a user would run,
and each is reused when its output is already complete, so a re-run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmcl.errors import UsageError
from pipelines.demo_data import (
    AUDIO_TEST_SETTINGS,
    AUDIO_TEST_VOICES,
    build_fashion_mnist,
    build_held_out_speech,
    build_spoken_words,
    write_caption_prompts,
)

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CPU = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
PROGRESS_POLL_S = 0.5  # how often the console's training line is refreshed


@dataclass(frozen=True)
class DemoSize:
    images: int  # training pairs
    test_per_class: int  # held-out images per class
    spoken_repeats: int  # clips per (word, voice)
    image_steps: int
    audio_steps: int


SIZES = {
    "tiny": DemoSize(images=640, test_per_class=20, spoken_repeats=1, image_steps=40, audio_steps=40),
    "small": DemoSize(images=6000, test_per_class=100, spoken_repeats=8, image_steps=500, audio_steps=250),
    "medium": DemoSize(
        images=20000, test_per_class=300, spoken_repeats=6, image_steps=2000, audio_steps=1000
    ),
}

DEMO_EXAMPLE = (
    "example:\n"
    "  mmcl demo                                   "
    "# both modalities, small size, 30% caption noise (~5 min on 2 cores)\n"
    "  mmcl demo --modality audio --noise-rate 0.5 --noise-method teacher\n"
    "  mmcl demo --modality image --noise-rate 0.5 --noise-method local_fdr\n"
    "  mmcl demo --size tiny --processes 1         # a quick smoke run\n"
    "  mmcl demo --size medium --output runs/demo-medium\n"
)


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    from shards_tools.cli import HelpfulFormatter

    p = subparsers.add_parser(
        "demo",
        help="shard, train and evaluate small real datasets end to end",
        formatter_class=HelpfulFormatter,
        description="Run the whole pipeline (shard -> train -> eval -> report) on real data built offline:\n"
        "Fashion-MNIST images and words spoken by espeak-ng, with injected caption noise.\n\n" + DEMO_EXAMPLE,
    )
    p.add_argument("--modality", choices=["both", "image", "audio"], default="both")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="dataset size and training steps")
    p.add_argument(
        "--noise-rate", type=float, default=0.3, help="fraction of pairs whose captions are swapped"
    )
    p.add_argument(
        "--noise-method",
        choices=["loss_mixture", "local_fdr", "teacher", "none"],
        default="loss_mixture",
        help="noise-aware weighting (none: the plain contrastive loss)",
    )
    p.add_argument("--processes", type=int, choices=[1, 2], default=2, help="training processes (accelerate)")
    p.add_argument("--output", type=Path, default=Path("demo_out"), help="work folder and report")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_demo, prog_name="mmcl demo")


DERIVED_FOLDERS = ("shards", "runs", "report")


class StageFailed(Exception):
    """A stage's process failed; its log says why (the message holds the log's end)."""


def _say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run(
    command: list[str], log: Path, env: dict | None = None, progress: TrainingProgress | None = None
) -> None:
    """Run one stage as its own process, streaming its output into `log` (and failing loudly); with
    `progress`, its console line is refreshed while the process runs and finished when it ends."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(log, "w") as handle,
        subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env) as process,
    ):
        try:
            while True:
                try:
                    returncode = process.wait(timeout=PROGRESS_POLL_S if progress else None)
                    break
                except subprocess.TimeoutExpired:
                    progress.poll()
        except BaseException:  # as subprocess.run does (KeyboardInterrupt included): no orphan left behind
            process.kill()
            raise
        finally:
            if progress:
                progress.close()
    if returncode != 0:
        tail = log.read_text()[-2500:]
        raise StageFailed(f"{' '.join(command[:6])} ... failed (exit {returncode}); log: {log}\n{tail}")


def _mmcl(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmcl", *map(str, args)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ADDRESS_IN_USE = ("eaddrinuse", "address already in use")
LAUNCH_ATTEMPTS = 5


def _address_in_use(log: Path) -> bool:
    """Whether a failed launch failed because its rendezvous port was taken (the log's text says so)."""
    text = log.read_text(errors="replace").lower()
    return any(sign in text for sign in ADDRESS_IN_USE)


class TrainingProgress:
    """The console's view of a training run: one line on stderr with the steps done, steps/s, the latest loss
    and held-out accuracy, read from the rows the run appends to its metrics.jsonl (its own progress bar goes
    to the log file). On a terminal the line is redrawn in place; elsewhere (a pipe, a file) each new row
    prints a line of its own."""

    def __init__(self, label: str, metrics: Path, total: int, stream=None):
        self.label, self.metrics, self.total = label, metrics, total
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.offset = 0  # bytes of metrics.jsonl already read (complete lines only)
        self.started = time.perf_counter()
        self.first: tuple[int, float] | None = None  # (step, time) of the first row seen: steps/s from there
        self.step, self.rate, self.loss, self.acc = 0, None, None, None
        self.drawn = ""

    def _read_rows(self) -> list[dict]:
        try:
            with open(self.metrics, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        rows = []
        for line in complete.decode(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows

    def line(self, accuracy: bool = True) -> str:
        """The run's state: steps done, steps/s (since the first row), latest loss, and with `accuracy` the
        latest held-out zero-shot top-1."""
        elapsed = f"({time.perf_counter() - self.started:.0f} s)"
        if self.loss is None:
            return f"  {self.label}: starting {elapsed}"
        text = f"  {self.label}: {self.step}/{self.total} steps"
        if self.rate:
            text += f", {self.rate:.2f} steps/s"
        text += f", loss {self.loss:.3f}"
        if accuracy and self.acc is not None:
            text += f", held-out {100 * self.acc:.1f}%"
        return f"{text} {elapsed}"

    def poll(self) -> None:
        """Take in the rows added since the last call; redraw the line, or print a line per row."""
        for row in self._read_rows():
            if "loss" in row:
                now = time.perf_counter()
                self.step, self.loss = row["step"], row["loss"]
                if self.first is None:
                    self.first = (self.step, now)
                elif now > self.first[1]:
                    self.rate = (self.step - self.first[0]) / (now - self.first[1])
                self._print(self.line(accuracy=False))
            if "eval/heldout/acc1" in row:
                self.acc = row["eval/heldout/acc1"]
                elapsed = time.perf_counter() - self.started
                self._print(f"  {self.label}: {row['step']}/{self.total} steps, held-out zero-shot top-1 "
                            f"{100 * self.acc:.1f}% ({elapsed:.0f} s)")  # fmt: skip
        if self.interactive:
            width = shutil.get_terminal_size().columns - 1
            self.drawn = self.line()[:width]
            self.stream.write("\r" + self.drawn + "\x1b[K")
            self.stream.flush()

    def _print(self, line: str) -> None:
        if not self.interactive:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Read the last rows and end the line (on a terminal the final state stays on screen)."""
        self.poll()
        if self.interactive and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = ""


def _shard(modality: str, manifest: Path, out: Path, noise_rate: float, seed: int, logs: Path) -> dict:
    """Shard the training pairs with injected noise (resumes, and is a no-op when already complete).
    At least 16 shards, so that every process and loader worker gets its own."""
    pairs = sum(1 for _ in open(manifest)) - 1
    command = _mmcl(
        "shard",
        f"{modality}-text",
        "--input",
        manifest,
        "--output",
        out,
        "--shard-size",
        max(8, pairs // 16),
        "--shuffle",
        "--seed",
        seed,
        "--noise-rate",
        noise_rate,
        "--label-column",
        "label",
        "--quiet",
    )
    command += (
        ["--sample-rate", "16000", "--max-seconds", "1.5"]
        if modality == "audio"
        else ["--image-format", "png"]
    )
    _run(command, logs / f"shard-{modality}.log")
    return json.loads((out / "manifest.json").read_text())


def _zero_shot_prompts(modality: str, data_dir: Path) -> str:
    """The prompts zero-shot scores with: for images the built-in `short` set, which shares "a photo of a {}."
    with the captions; for audio a file of the captions' own phrasings, since the text tower trained from
    scratch knows only its captions' words (the CLAP-style "This is a sound of {}." would bring in words whose
    embeddings are still random)."""
    if modality == "image":
        return "short"
    return str(write_caption_prompts(data_dir / "audio-caption-prompts.txt"))


def _train_config(
    modality: str,
    shards: Path,
    test: Path,
    run_dir: Path,
    steps: int,
    method: str,
    seed: int,
    processes: int,
    prompts: str,
) -> dict:
    recipe = REPO / "configs" / ("image_text/micro.yaml" if modality == "image" else "audio_text/micro.yaml")
    config = yaml.safe_load(recipe.read_text())
    config["run"] = {"output_dir": str(run_dir), "seed": seed}
    config["data"]["sources"] = [{"urls": str(shards)}]
    config["data"]["batch_size"] = 64 // processes  # the same global batch for 1 or 2 processes
    config["data"]["workers"] = 1
    config["train"].update({"steps": steps, "log_every": max(1, steps // 25), "checkpoint_every": steps})
    config["optim"]["warmup_steps"] = max(1, steps // 10)
    config["noise"] = {
        "method": method,
        "warmup_steps": steps // 4,
        "ramp_steps": steps // 10,
        "window": 2048,
    }
    config["eval"] = {
        "every_steps": max(1, steps // 5),
        "zero_shot": [{"name": "heldout", "data": str(test), "format": "class-folder", "templates": prompts}],
        "max_samples": None,  # every held-out item: the curve's last point is the headline's model on its set
    }
    return config


def _train(config: dict, config_path: Path, processes: int, logs: Path, modality: str) -> None:
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = logs / f"train-{modality}.log"
    metrics = Path(config["run"]["output_dir"]) / "metrics.jsonl"
    steps = config["train"]["steps"]
    if processes == 1:
        _run(
            _mmcl("train", "--config", config_path),
            log,
            env,
            TrainingProgress(f"{modality}-text", metrics, steps),
        )
        return
    # accelerate takes the rendezvous port as a number and torchrun's store binds it later, so a port found
    # free a moment ago may be taken by then (another launch on this machine; accelerate itself only sidesteps
    # a port that already answers): the store then fails with EADDRINUSE before any worker starts, and exactly
    # that failure is retried on a fresh port, as the tests' accelerate_launch does
    for attempt in range(1, LAUNCH_ATTEMPTS + 1):
        port = _free_port()
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ACCELERATE_CPU),
            "--main_process_port",
            str(port),
            "-m",
            "mmcl",
            "train",
            "--config",
            str(config_path),
        ]
        try:
            _run(command, log, env, TrainingProgress(f"{modality}-text", metrics, steps))
            return
        except StageFailed:
            if attempt == LAUNCH_ATTEMPTS or not _address_in_use(log):
                raise
            _say(f"port {port} was taken before the launch could use it: retrying on another")


def _evaluate(
    modality: str, run_dir: Path, test: Path, prompts: str, retrieval_shards: Path, out: Path, logs: Path
) -> dict:
    _run(
        _mmcl(
            "eval",
            "zero-shot",
            "--checkpoint",
            run_dir,
            "--data",
            test,
            "--format",
            "class-folder",
            "--templates",
            prompts,
            "--output",
            out / "zero-shot",
            "--quiet",
        ),
        logs / f"eval-zs-{modality}.log",
    )
    _run(
        _mmcl(
            "eval",
            "retrieval",
            "--checkpoint",
            run_dir,
            "--data",
            retrieval_shards,
            "--output",
            out / "retrieval",
            "--quiet",
        ),
        logs / f"eval-ret-{modality}.log",
    )
    return {
        "zero_shot": json.loads((out / "zero-shot" / "results.json").read_text()),
        "retrieval": json.loads((out / "retrieval" / "results.json").read_text()),
    }


def _plot_training(metrics_file: Path, path: Path, title: str, held_out: int) -> None:
    """Loss and held-out zero-shot accuracy over steps, from the run's metrics.jsonl; the accuracy is scored
    on all `held_out` items, the set of the report's headline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/heldout/acc1" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="#4477aa")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("weighted contrastive loss")
    ax_loss.set_title("training loss")
    ax_acc.plot(
        [r["step"] for r in evals], [100 * r["eval/heldout/acc1"] for r in evals], "o-", color="#228833"
    )
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("zero-shot top-1 (%)")
    ax_acc.set_title(f"held-out zero-shot accuracy (all {held_out} items)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _demo_modality(modality: str, args: argparse.Namespace, size: DemoSize, root: Path) -> dict:
    logs = root / "logs"
    data_dir = root / "data"
    if modality == "image":
        _say(f"building Fashion-MNIST pairs ({size.images} train, {size.test_per_class}/class held out)")
        data = build_fashion_mnist(data_dir / "fashion-mnist", size.images, size.test_per_class, args.seed)
        steps = size.image_steps
    else:
        _say(
            f"speaking words with espeak-ng ({size.spoken_repeats} clips per word and training voice; "
            f"{len(AUDIO_TEST_VOICES)} held-out voices at {len(AUDIO_TEST_SETTINGS)} speeds and pitches)"
        )
        data = {
            "train": build_spoken_words(data_dir / "spoken-words", size.spoken_repeats, args.seed),
            "test": build_held_out_speech(
                data_dir / "spoken-words-test600" / "test", AUDIO_TEST_VOICES, AUDIO_TEST_SETTINGS
            ),
        }
        steps = size.audio_steps
    shards = root / "shards" / f"{modality}-train"
    _say(f"sharding {modality}-text pairs with {args.noise_rate:.0%} caption noise -> {shards}")
    manifest = _shard(modality, data["train"], shards, args.noise_rate, args.seed, logs)
    retrieval = root / "shards" / f"{modality}-heldout"
    template = "a photo of a {label}." if modality == "image" else "a person saying {label}."
    _run(
        _mmcl(
            "shard",
            f"{modality}-text",
            "--input",
            data["test"],
            "--format",
            "class-folder",
            "--output",
            retrieval,
            "--template",
            template,
            "--quiet",
            *(["--sample-rate", "16000"] if modality == "audio" else []),
        ),
        logs / f"shard-{modality}-heldout.log",
    )

    run_dir = root / "runs" / modality
    prompts = _zero_shot_prompts(modality, data_dir)
    if not (run_dir / "checkpoints" / f"step-{steps:08d}" / "COMPLETE").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        _say(
            f"training a micro {modality}-text model: {steps} steps, {args.processes} process(es), "
            f"noise weighting: {args.noise_method} (log: {logs / f'train-{modality}.log'})"
        )
        config = _train_config(
            modality,
            shards,
            data["test"],
            run_dir,
            steps,
            args.noise_method,
            args.seed,
            args.processes,
            prompts,
        )
        started = time.perf_counter()
        _train(config, root / f"train-{modality}.yaml", args.processes, logs, modality)
        _say(f"trained in {time.perf_counter() - started:.0f} s")
    _say(f"evaluating on held-out {modality} data")
    report_dir = root / "report" / modality
    results = _evaluate(modality, run_dir, data["test"], prompts, retrieval, report_dir, logs)
    held_out = results["zero_shot"]["num_samples"]
    _plot_training(run_dir / "metrics.jsonl", report_dir / "training.png", f"{modality}-text", held_out)
    if (run_dir / "noise_weights.png").exists():
        shutil.copy(run_dir / "noise_weights.png", report_dir / "noise_weights.png")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in rows if "loss" in r][-1]
    return {
        "modality": modality,
        "train_pairs": manifest["totals"]["samples"],
        "noisy_pairs": manifest["noise"]["noisy_pairs"] if manifest["noise"] else 0,
        "classes": len(results["zero_shot"]["class_names"]),
        "held_out": held_out,
        "steps": steps,
        "prompts": "the built-in `short` set"
        if prompts == "short"
        else f"the training captions' phrasings ({prompts})",
        "zero_shot": results["zero_shot"]["metrics"],
        "retrieval": results["retrieval"]["metrics"],
        "noise": {k: v for k, v in last_train.items() if k.startswith("noise_")},
        "report_dir": report_dir,
    }


def _write_report(root: Path, summaries: list[dict], args: argparse.Namespace) -> Path:
    lines = [
        "# mmcl demo report",
        "",
        f"Size `{args.size}`, caption noise {args.noise_rate:.0%}, weighting `{args.noise_method}`, "
        f"{args.processes} training process(es), seed {args.seed}. Re-run with `mmcl demo --help` options.",
        "",
    ]
    for s in summaries:
        zs, ret, noise = s["zero_shot"], s["retrieval"], s["noise"]
        media = "image" if s["modality"] == "image" else "audio"
        lines += [
            f"## {s['modality']}-text",
            "",
            f"{s['train_pairs']} training pairs ({s['noisy_pairs']} with swapped captions), {s['steps']} "
            f"steps; evaluated on held-out {'images' if media == 'image' else 'voices'} ({s['classes']} "
            f"classes, chance {100 / s['classes']:.0f}%), zero-shot prompts: {s['prompts']}.",
            "",
            "| metric | value |",
            "| --- | --- |",
            f"| zero-shot top-1 | {100 * zs['acc1']:.1f}% |",
            *([f"| zero-shot top-5 | {100 * zs['acc5']:.1f}% |"] if "acc5" in zs else []),
            f"| mean per-class recall | {100 * zs['mean_per_class_recall']:.1f}% |",
            f"| {media} retrieval R@1 / R@5 (text -> {media}) | "
            f"{100 * ret[f'{media}_retrieval_recall@1']:.1f}% / "
            f"{100 * ret[f'{media}_retrieval_recall@5']:.1f}% |",
            f"| text retrieval R@1 / R@5 ({media} -> text) | {100 * ret['text_retrieval_recall@1']:.1f}% / "
            f"{100 * ret['text_retrieval_recall@5']:.1f}% |",
        ]
        if "noise_auroc" in noise:
            lines.append(f"| noisy-pair detection AUROC | {noise['noise_auroc']:.3f} |")
            lines.append(
                f"| mean weight clean / noisy pairs | {noise['noise_mean_weight_clean']:.2f} / "
                f"{noise['noise_mean_weight_noisy']:.2f} |"
            )
        lines += [
            "",
            f"![training]({s['modality']}/training.png)",
            "",
            f"The accuracy curve scores the same {s['held_out']} held-out items as the table, during "
            "training; its last point is the final model.",
            "",
        ]
        if (s["report_dir"] / "noise_weights.png").exists():
            lines += [f"![weights]({s['modality']}/noise_weights.png)", ""]
        lines += [f"![confusion]({s['modality']}/zero-shot/confusion_matrix.png)", ""]
        lines += [
            "Retrieval captions of the held-out set come from one template per class, so many captions are "
            "identical and recall is bounded well below 100%; zero-shot accuracy is the headline.",
            "",
        ]
    path = root / "report" / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def _keep_one_configuration(root: Path, args: argparse.Namespace) -> None:
    """A work folder holds the shards, runs and report of one configuration: a re-run with the same settings
    resumes, one with other settings starts them afresh (the data folders check their own parameters).
    Without this a finished run of other settings would be evaluated as if it were this one's."""
    # noise_by_label: noisy pairs get another label's caption (folders from before, other text, start afresh)
    settings = {"size": args.size, "noise_rate": args.noise_rate, "noise_method": args.noise_method,
                "processes": args.processes, "seed": args.seed, "noise_by_label": True}  # fmt: skip
    marker = root / "settings.json"
    try:
        previous = json.loads(marker.read_text())
    except (OSError, ValueError):
        previous = None
    if previous != settings:
        if previous is not None or any((root / name).exists() for name in DERIVED_FOLDERS):
            _say(
                "settings differ from the last run in this folder: "
                f"starting {', '.join(DERIVED_FOLDERS)} afresh"
            )
        for name in DERIVED_FOLDERS:
            shutil.rmtree(root / name, ignore_errors=True)
        marker.write_text(json.dumps(settings) + "\n")


def run_demo(args: argparse.Namespace) -> int:
    """The `mmcl demo` command."""
    if not 0 <= args.noise_rate < 1:
        raise UsageError(f"--noise-rate must be in [0, 1), got {args.noise_rate}")
    size = SIZES[args.size]
    root = args.output.resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _say(f"work folder: {root}")
    _keep_one_configuration(root, args)
    modalities = ["image", "audio"] if args.modality == "both" else [args.modality]
    try:
        summaries = [_demo_modality(m, args, size, root) for m in modalities]
    except StageFailed as err:
        print(f"mmcl demo: {err}", file=sys.stderr)
        return 1
    report = _write_report(root, summaries, args)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; report: {report}")
    for s in summaries:
        zs = s["zero_shot"]
        detection = (
            f", noisy-pair AUROC {s['noise']['noise_auroc']:.3f}" if "noise_auroc" in s["noise"] else ""
        )
        print(
            f"  {s['modality']}-text: zero-shot top-1 {100 * zs['acc1']:.1f}% on held-out data "
            f"({s['classes']} classes, chance {100 / s['classes']:.0f}%){detection}"
        )
    return 0
