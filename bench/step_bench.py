"""Per-step CPU cost of mmcl's trainer against a bare training loop and open_clip's trainer (fp32, CPU).

Run from the repository root with the project venv:

    .venv/bin/python bench/step_bench.py                  # ViT-B-32, 224 px, batch 32, --threads 1,2
    .venv/bin/python bench/step_bench.py --threads 1 --audio   # also the hf HTSAT audio tower (10 s, 48 kHz)
    .venv/bin/python bench/step_bench.py --smoke          # mmcl-micro-vit, 64 px, batch 4, 3 steps: it runs

For every --threads value (OMP/MKL threads = torch intra-op threads of every side), five sides:

  bare loop         the same model as mmcl's (mmcl.models.build_model, same seed), open_clip's ClipLoss,
                    plain AdamW (open_clip_train's parameter groups) and gradient clipping on one fixed
                    batch: the compute limit (train_bench.bare_step)
  mmcl step         mmcl's Trainer on that same fixed batch: `Trainer.train()` itself, whose loader is
                    replaced by one that hands over the batch, so every step runs the whole loop body (lr,
                    data state, forward, loss, accelerator.backward, the finite check's accelerator.reduce,
                    clipping, Accelerate's optimizer wrapper, state updates, metrics, the stop flag's
                    reduce) and nothing of the loader. The bare and mmcl steps alternate in one process
                    (one bare step between two of the trainer's), so the machine's load hits both alike;
                    a trainer step is timed from one hand-over to the next
  mmcl train        `mmcl train` end to end on the shards (--workers loader workers)
  ... malloc as is  the same with glibc's allocator left at its defaults (a user setting for it, here a
                    tunable at its default value, makes mmcl leave it: mmcl.host_memory), so the
                    page faults it saves show
  open_clip         `python -m open_clip_train.main` end to end on the same shards and settings
                    (train_bench's open_clip runner: webdataset 0.2.86 first on PYTHONPATH)

Figures per step after --warmup steps: CPU time of the process (all its threads) and wall time; for the
end-to-end runs the trainer process's CPU (main), that of its whole tree (with the loader workers), wall
time, and the trainer process's system CPU and minor page faults (memory the kernel had to map in again),
read at each log line (both tools log every step, --log-every) by train_bench's process
monitor. Then the mmcl-vs-bare difference is profiled over --profile-steps more steps of each side:
torch.profiler (self CPU time of every op, split into the model's forward, its backward, the optimizer's
step and zero_grad, and everything else) and cProfile (Python self time outside the model's code, with the
trainer's candidate costs: accelerator.reduce, Accelerate's optimizer wrapper, state updates, metrics, the
loss). cProfile slows Python code down, so its figures overstate Python overhead; read them as shares.

--audio adds the audio tower at its real recipe size: mmcl's `hf` tower on a transformers ClapAudioModel
with ClapAudioConfig's defaults (HTSAT, random weights, no download) and ClapFeatureExtractor's (48 kHz,
10 s clips), the micro text tower, batch --audio-batch (8): bare loop vs mmcl step, with the profile's
forward / backward split.

Data: bench/shard_bench.py's photo-like pictures at 256 px (JPEG q95) sharded by `mmcl shard image-text
--image-size 256` (train_bench.make_shards; names webdataset's brace patterns take); audio: shard_bench's
tone + noise WAVs sharded at 48 kHz. Everything is cached under --work-dir (default bench/out/step/,
git-ignored); runs and logs in WORK_DIR/runs/. Results: a table on stdout and WORK_DIR/results.json
(results-smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing
import os
import pstats
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from host import host_facts, wait_for_quiet  # noqa: E402
from processes import MALLOC_AS_IS  # noqa: E402
from shard_bench import _write_image, _write_wav, write_manifest  # noqa: E402
from train_bench import (  # noqa: E402
    MMCL_PROGRESS,
    OPEN_CLIP_PROGRESS,
    VENV,
    WDS_OLD,
    bare_step,
    bench_clock,
    last_step,
    make_shards,
    mmcl_train_config,
    mmcl_windows,
    open_clip_adamw,
    open_clip_command,
    open_clip_train_args,
    open_clip_windows,
    run_process,
    summarize,
    thread_env,
)

PHOTO_SIZE = 256
AUDIO_RATE = 48000
FORWARD_LABEL = "step_bench.forward"  # a profiler range around each side's model forward
BACKWARD_PREFIX = "autograd::engine::evaluate_function"
OPTIMIZER_PREFIXES = ("Optimizer.step#", "Optimizer.zero_grad#")
# code that is the model's forward (or backward), not the trainer's
MODEL_CODE = ("/torch/nn/modules/", "/torch/nn/functional.py", "/open_clip/", "/mmcl/models/",
              "/transformers/")  # fmt: skip
MODEL_BUILTINS = ("run_backward",)  # the whole backward pass, called by torch.autograd
# (label, a piece of the file's path, function names): their cumulative time per step, both sides
CANDIDATES = [
    ("mmcl: Trainer._optimizer_step (the update)", "mmcl/train/trainer.py", ("_optimizer_step",)),
    ("mmcl: Trainer._train_step (forward+loss+backward)", "mmcl/train/trainer.py", ("_train_step",)),
    ("accelerator.reduce (finite check, stop flag, _log)", "accelerate/accelerator.py", ("reduce",)),
    ("accelerator.backward", "accelerate/accelerator.py", ("backward",)),
    ("torch Tensor.backward", "torch/_tensor.py", ("backward",)),
    ("accelerator.clip_grad_norm_", "accelerate/accelerator.py", ("clip_grad_norm_",)),
    ("torch clip_grad_norm_", "torch/nn/utils/clip_grad.py", ("clip_grad_norm_",)),
    ("Accelerate optimizer wrapper: step", "accelerate/optimizer.py", ("step",)),
    ("torch AdamW step", "torch/optim/adam.py", ("step",)),
    ("Accelerate optimizer wrapper: zero_grad", "accelerate/optimizer.py", ("zero_grad",)),
    ("torch Optimizer.zero_grad", "torch/optim/optimizer.py", ("zero_grad",)),
    ("loss: mmcl contrastive_loss", "mmcl/losses/contrastive.py", ("contrastive_loss",)),
    ("loss: open_clip ClipLoss.forward", "open_clip/loss.py", ("forward",)),
    ("noise weighting (weigh, after_update)", "mmcl/noise/weighting.py", ("weigh", "after_update")),
    ("metrics: Trainer._log", "mmcl/train/trainer.py", ("_log",)),
    ("data state update", "mmcl/data/pipeline.py", ("update",)),
    ("lr schedule (lr_at, set_lr)", "mmcl/train/optim.py", ("lr_at", "set_lr")),
    ("batch_to_model_input", "mmcl/data/device_transform.py", ("batch_to_model_input",)),
    ("progress bar (tqdm.update)", "tqdm/std.py", ("update",)),
]


# ------------------------------------------------------------------------------------------ the child
class Interleaved:
    """Stands in for the Trainer's loader: every next() hands over the same batch and, between two of the
    trainer's steps, runs one bare step. So a trainer step is the time from one hand-over to the next call
    (the whole loop body, no loader). `phases` says what each step pair is for: warmup, timed, ops (under
    torch.profiler) or python (under cProfile)."""

    def __init__(self, batch: dict, bare, phases: list[str]) -> None:
        self.batch, self.bare, self.phases = batch, bare, phases
        self.index = 0
        self.started = (0.0, 0.0)
        self.times: dict = {side: {"cpu_s": [], "wall_s": []} for side in ("bare", "mmcl")}
        self.ops: dict = {side: {"steps": 0, "classes_ms": {}, "outside_ms": {}} for side in ("bare", "mmcl")}
        self.python = {"bare": cProfile.Profile(), "mmcl": cProfile.Profile()}
        self.profiler = None

    def __iter__(self) -> Interleaved:
        return self

    def __next__(self) -> dict:
        ended = (time.process_time(), time.perf_counter())
        if self.index > 0:
            self._finish("mmcl", self.phases[self.index - 1], ended)
        if self.index < len(self.phases):
            phase = self.phases[self.index]
            self._start("bare", phase)
            self.bare()
            self._finish("bare", phase, (time.process_time(), time.perf_counter()))
            self._start("mmcl", phase)
        self.index += 1
        return self.batch

    def _start(self, side: str, phase: str) -> None:
        import torch

        if phase == "ops":
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.start()
        elif phase == "python":
            self.python[side].enable()
        self.started = (time.process_time(), time.perf_counter())

    def _finish(self, side: str, phase: str, ended: tuple[float, float]) -> None:
        if phase == "timed":
            self.times[side]["cpu_s"].append(ended[0] - self.started[0])
            self.times[side]["wall_s"].append(ended[1] - self.started[1])
        elif phase == "ops":
            self.profiler.stop()
            add_op_profile(self.ops[side], self.profiler.events())
            self.profiler = None
        elif phase == "python":
            self.python[side].disable()


def add_op_profile(totals: dict, events) -> None:
    """Add one profiled step's ops to `totals`: self CPU ms per class (forward, backward, optimizer, other)
    and, for everything outside the forward and backward, per op name."""
    totals["steps"] += 1
    for event in events:
        kind = op_class(event)
        ms = event.self_cpu_time_total / 1000
        totals["classes_ms"][kind] = totals["classes_ms"].get(kind, 0.0) + ms
        if kind in ("optimizer", "other"):
            totals["outside_ms"][event.name] = totals["outside_ms"].get(event.name, 0.0) + ms


def op_class(event) -> str:
    """forward (under FORWARD_LABEL), backward (under an autograd engine node), optimizer (under
    Optimizer.step / zero_grad) or other: the innermost such range around the op decides."""
    node = event
    while node is not None:
        if node.name == FORWARD_LABEL:
            return "forward"
        if node.name.startswith(BACKWARD_PREFIX):
            return "backward"
        if node.name.startswith(OPTIMIZER_PREFIXES):
            return "optimizer"
        node = node.cpu_parent
    return "other"


def trainer_side(file: str) -> bool:
    """Whether a function's file is code that runs around the model (trainer, loss, optimizer, Accelerate),
    not the model's own or this bench's."""
    if file == "~" or file.endswith("step_bench.py"):
        return False
    return "/open_clip/loss.py" in file or not any(part in file for part in MODEL_CODE)


def short(file: str) -> str:
    parts = Path(file).parts
    return "/".join(parts[-2:])


def python_profile(profiler: cProfile.Profile, steps: int) -> dict:
    """Per step: Python self time of every trainer-side function (a builtin's, i.e. a torch op's or
    .item()'s, is charged to its trainer-side callers), and the cumulative time of each CANDIDATES entry."""
    if steps == 0:
        return {"steps": 0, "self_ms": {}, "candidates_ms": {}}
    stats = pstats.Stats(profiler).stats
    self_ms: dict[str, list[float]] = {}
    for (file, line, func), (_, calls, tottime, _, callers) in stats.items():
        if file == "~":
            if any(name in func for name in MODEL_BUILTINS):
                continue
            for (caller_file, _, caller_func), (caller_calls, _, caller_time, _) in callers.items():
                if trainer_side(caller_file):
                    key = f"{func} <- {short(caller_file)}:{caller_func}"
                    entry = self_ms.setdefault(key, [0.0, 0.0])
                    entry[0] += 1000 * caller_time / steps
                    entry[1] += caller_calls / steps
        elif trainer_side(file):
            self_ms[f"{short(file)}:{line}({func})"] = [1000 * tottime / steps, calls / steps]
    candidates: dict[str, float] = {}
    for label, path, names in CANDIDATES:
        found = [ct for (file, _, func), (_, _, _, ct, _) in stats.items() if path in file and func in names]
        if found:
            candidates[label] = 1000 * sum(found) / steps
    return {"steps": steps, "self_ms": self_ms, "candidates_ms": candidates}


def steps_child(spec_file: Path) -> None:
    """`step_bench.py _steps SPEC.json`: the bare loop and mmcl's Trainer on one fixed batch, alternating in
    this process; writes the per-step times and both profiles to the spec's "out" file."""
    import open_clip
    import torch

    from mmcl.config import load_train_config
    from mmcl.data.device_transform import batch_to_model_input
    from mmcl.models import build_model
    from mmcl.train.trainer import Trainer

    spec = json.loads(spec_file.read_text())
    config = load_train_config(Path(spec["config"]))
    phases = (
        ["warmup"] * spec["warmup"]
        + ["timed"] * spec["steps"]
        + ["ops"] * spec["profile_steps"]
        + ["python"] * spec["profile_steps"]
    )
    if config.train.steps != len(phases) + 1:
        raise SystemExit(f"train.steps must be {len(phases) + 1}: a last step closes the last timed one")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        torch.ones(1).add_(1)  # the profiler's one-off start-up, outside the profiled steps
    trainer = Trainer(config)
    trainer.setup()
    trainer.save_checkpoint = lambda: None  # the run's last step would write one: not part of a step
    batch = next(iter(trainer.loader))
    inputs = batch_to_model_input(batch, trainer.accelerator.device, trainer.device_images)
    torch.manual_seed(config.run.seed)
    model = build_model(config.model).to(trainer.accelerator.device).train()
    optimizer = open_clip_adamw(model, config.optim.lr, config.optim.weight_decay)
    loss_fn = open_clip.ClipLoss()
    parameters = [p for p in model.parameters() if p.requires_grad]

    def bare_forward() -> tuple:
        with torch.profiler.record_function(FORWARD_LABEL):
            out = model(inputs["media"], inputs["text"])
        return out["media_features"], out["text_features"], out["logit_scale"]

    trainer_forward = trainer.forward

    def labelled_forward(*args):
        with torch.profiler.record_function(FORWARD_LABEL):
            return trainer_forward(*args)

    trainer.forward = labelled_forward
    clip = config.optim.grad_clip
    loader = Interleaved(batch, lambda: bare_step(bare_forward, loss_fn, optimizer, parameters, clip), phases)
    trainer.loader = loader
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    result = {
        "torch_threads": torch.get_num_threads(),
        "batch": len(batch["keys"]),
        "media_shape": list(inputs["media"].shape),
        "parameters": sum(p.numel() for p in model.parameters()),
        "times": loader.times,
        "ops": loader.ops,
        "python": {
            side: python_profile(loader.python[side], spec["profile_steps"]) for side in ("bare", "mmcl")
        },
    }
    Path(spec["out"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ data
def photo_shards(
    work: Path, samples: int, shard_size: int, unique: int | None = None, workers: int = 2
) -> dict:
    """SAMPLES photo-like 256 px JPEGs (shard_bench's pictures; the first UNIQUE repeat when given) as mmcl
    shards of SHARD_SIZE (train_bench.make_shards, WORKERS sharding processes); cached in WORK. Returns the
    set's description."""
    unique = min(unique or samples, samples)
    folder = work / f"photos{PHOTO_SIZE}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.jpg" for i in range(unique)]
    todo = [(str(p), i, PHOTO_SIZE) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        print(f"writing {len(todo)} pictures to {folder} ...", flush=True)
        with multiprocessing.Pool(os.cpu_count()) as pool:
            pool.map(_write_image, todo, chunksize=16)
    sources = [str(paths[i % unique]) for i in range(samples)]
    manifest = write_manifest(work / f"photos-{samples}.csv", sources)
    name = f"photos{PHOTO_SIZE}-n{samples}-u{unique}-x{shard_size}"
    return make_shards(work, manifest, samples, shard_size, name, image_size=PHOTO_SIZE, workers=workers)


def audio_shards(work: Path, clips: int) -> Path:
    """CLIPS of shard_bench's 5 s tone + noise WAVs, sharded at 48 kHz (the loader repeats them to 10 s)."""
    out = work / "shards" / f"audio48k-n{clips}"
    if (out / "manifest.json").exists():
        return out
    folder = work / "wavs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:04d}.wav" for i in range(clips)]
    for i, path in enumerate(paths):
        if not path.exists():
            _write_wav((str(path), 10_000_000 + i))
    manifest = write_manifest(work / f"audio-{clips}.csv", [str(p) for p in paths])
    if out.exists():
        shutil.rmtree(out)
    subprocess.run(
        [str(VENV / "bin" / "mmcl"), "shard", "audio-text", "--input", str(manifest), "--output", str(out),
         "--sample-rate", str(AUDIO_RATE), "--shard-size", str(clips), "--workers", "1", "--quiet"],
        check=True,
        cwd=ROOT,
    )  # fmt: skip
    return out


def htsat_folder(work: Path, tiny: bool) -> Path:
    """A transformers ClapAudioModel (HTSAT) with random weights and ClapFeatureExtractor's defaults (48 kHz,
    10 s), saved as save_pretrained writes it: ClapAudioConfig's defaults, or tests/hf_models.TINY_HTSAT."""
    folder = work / ("htsat-tiny" if tiny else "htsat-full")
    if (folder / "preprocessor_config.json").exists():
        return folder
    import torch
    import transformers
    from hf_models import TINY_HTSAT

    torch.manual_seed(0)
    model = transformers.ClapAudioModel(transformers.ClapAudioConfig(**(TINY_HTSAT if tiny else {})))
    model.save_pretrained(folder)
    transformers.ClapFeatureExtractor(truncation="rand_trunc").save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Options:
    """The command line (parse_options); the "args" of the results file."""

    model: str
    image_size: int
    batch: int
    steps: int
    warmup: int
    threads: tuple[int, ...]
    workers: int
    log_every: int
    profile_steps: int
    top: int
    audio: bool
    audio_batch: int
    skip_image: bool
    skip_e2e: bool
    smoke: bool
    quiet_below: float
    max_wait: float
    timeout: float
    work_dir: Path
    json: Path | None

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def exclude(self) -> SimpleNamespace:
        """What train_bench.summarize reads: steady state after the warm-up."""
        return SimpleNamespace(exclude_steps=self.warmup, batch_size=self.batch)


def image_model_section(options: Options) -> dict:
    """mmcl's model section: the open_clip architecture, its image size changed (inline config) when
    --image-size is not its own."""
    import open_clip

    from mmcl.models.factory import register_model_configs

    register_model_configs()
    config = open_clip.get_model_config(options.model)
    if config is None:
        raise SystemExit(f"--model {options.model}: not an open_clip architecture")
    if config["vision_cfg"].get("image_size") == options.image_size:
        return {"modality": "image", "open_clip_name": options.model}
    vision = {**config["vision_cfg"], "image_size": options.image_size}
    return {"modality": "image", "open_clip_config": {**config, "vision_cfg": vision}}


def mmcl_config(options: Options, model: dict, shards: str, run_dir: Path, workers: int, steps: int) -> Path:
    """train_bench's side-by-side config for MODEL on SHARDS, logging every --log-every steps; returns the
    written file."""
    config = mmcl_train_config(run_dir, shards, options.batch, workers, steps, log_every=options.log_every)
    config["model"] = model
    config["optim"]["warmup_steps"] = min(config["optim"]["warmup_steps"], steps - 1)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def fresh(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)


def run_steps(options: Options, model: dict, shards: str, batch: int, threads: int, tag: str) -> dict:
    """The bare loop and mmcl's step on one fixed batch, alternating in a child process (steps_child)."""
    run_dir = options.work_dir / "runs" / tag
    fresh(run_dir)
    steps = options.warmup + options.steps + 2 * options.profile_steps + 1
    config = mmcl_config(replace(options, batch=batch), model, shards, run_dir, workers=0, steps=steps)
    spec = run_dir.parent / f"{tag}.spec.json"
    out = run_dir.parent / f"{tag}.result.json"
    out.unlink(missing_ok=True)
    spec.write_text(
        json.dumps(
            {
                "config": str(config),
                "warmup": options.warmup,
                "steps": options.steps,
                "profile_steps": options.profile_steps,
                "out": str(out),
            }
        )
    )
    cmd = [str(VENV / "bin" / "python"), str(Path(__file__).resolve()), "_steps", str(spec)]
    wait_for_quiet(options.quiet_below, options.max_wait)
    run = run_process(cmd, thread_env(threads), run_dir.parent / f"{tag}.log", options.timeout)
    if run["returncode"] != 0 or not out.exists():
        raise SystemExit(f"{tag} failed (exit {run['returncode']}): see {run_dir.parent / f'{tag}.log'}")
    result = json.loads(out.read_text())
    result["wall_s"] = run["wall_s"]
    result["peak_rss_mib"] = run["peak_main_rss_mib"]
    return result


def run_mmcl_e2e(
    options: Options, model: dict, shards: dict, threads: int, tag: str, extra_env: dict | None = None
) -> dict:
    """`mmcl train` on the shards; per-step CPU (main, tree) and wall after the warm-up, by the bench's
    clock at each metrics line. `extra_env` is added to the run's environment."""
    run_dir = options.work_dir / "runs" / tag
    fresh(run_dir)
    config = mmcl_config(options, model, shards["dir"], run_dir, options.workers, options.total_steps)
    cmd = [str(VENV / "bin" / "mmcl"), "train", "--config", str(config)]
    wait_for_quiet(options.quiet_below, options.max_wait)
    progress = last_step(run_dir / "metrics.jsonl", MMCL_PROGRESS)
    env = thread_env(threads) | (extra_env or {})
    result = run_process(cmd, env, run_dir.parent / f"{tag}.log", options.timeout, progress)
    windows = mmcl_windows(run_dir / "metrics.jsonl", options.batch)
    return e2e_figures(options, result, windows) | {"command": " ".join(cmd)}


def run_open_clip_e2e(options: Options, model: dict, shards: dict, threads: int, tag: str) -> dict:
    """`open_clip_train.main` on the same shards and settings, measured as run_mmcl_e2e."""
    logs = options.work_dir / "runs"
    fresh(logs / tag)
    oc_args = open_clip_train_args(
        shards["pattern"],
        options.total_steps * options.batch,
        options.batch,
        options.workers,
        logs,
        tag,
        model=options.model,
        log_every=options.log_every,
    )
    if "open_clip_config" in model:
        oc_args += ["--force-image-size", str(options.image_size)]
    cmd, extra_env = open_clip_command(oc_args)
    wait_for_quiet(options.quiet_below, options.max_wait)
    log = logs / f"{tag}.log"
    progress = last_step(log, OPEN_CLIP_PROGRESS, options.batch)
    result = run_process(cmd, thread_env(threads) | extra_env, log, options.timeout, progress)
    windows = open_clip_windows(log.read_text(), options.batch)
    command = f"PYTHONPATH={WDS_OLD} python -m open_clip_train.main " + " ".join(oc_args)
    return e2e_figures(options, result, windows) | {"command": command}


def e2e_figures(options: Options, run: dict, windows: list[dict]) -> dict:
    """Per-step figures of an end-to-end run after the warm-up: the bench's clock (CPU of the trainer process
    and of its tree, wall) and the tool's own log (step time, data wait)."""
    clock = bench_clock(run["events"], options.warmup, options.batch)
    samples_per_s = clock["bench_samples_per_s"]
    tool = summarize(windows, options.exclude)
    return {
        "returncode": run["returncode"],
        "wall_s": run["wall_s"],
        "steady_steps": clock.get("bench_steady_steps"),
        "main_cpu_ms": clock["bench_main_cpu_ms_per_step"],
        "tree_cpu_ms": clock["bench_tree_cpu_ms_per_step"],
        "main_system_ms": clock["bench_main_system_ms_per_step"],
        "main_page_faults": clock["bench_main_page_faults_per_step"],
        "wall_ms": 1000 * options.batch / samples_per_s if samples_per_s else None,
        "tool_step_ms": tool["steady_step_ms"],
        "tool_data_wait_fraction": tool["steady_data_wait_fraction"],
        "final_loss": tool["final_loss"],
        "peak_tree_rss_mib": run["peak_tree_rss_mib"],
        "others_cpu_cores": run["others_cpu_cores"],
    }


# ------------------------------------------------------------------------------------------- reporting
def median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def step_figures(result: dict) -> dict:
    """Median CPU and wall ms per step of each side, and the median of the per-pair CPU ratios."""
    times = result["times"]
    figures = {
        side: {
            "cpu_ms": 1000 * median(times[side]["cpu_s"]),
            "wall_ms": 1000 * median(times[side]["wall_s"]),
            "cpu_ms_mean": 1000 * sum(times[side]["cpu_s"]) / len(times[side]["cpu_s"]),
        }
        for side in ("bare", "mmcl")
    }
    pairs = zip(times["mmcl"]["cpu_s"], times["bare"]["cpu_s"], strict=True)
    figures["mmcl_over_bare_cpu"] = median([m / b for m, b in pairs if b > 0])
    figures["overhead_cpu_ms"] = figures["mmcl"]["cpu_ms"] - figures["bare"]["cpu_ms"]
    return figures


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_steps_table(title: str, figures: dict, e2e: dict) -> None:
    print(f"\n{title}")
    print(
        f"  {'side':45s} {'CPU ms/step':>12s} {'wall ms/step':>13s} {'tree CPU':>9s} {'vs bare CPU':>11s} "
        f"{'system ms':>10s} {'page faults':>12s}"
    )
    bare_cpu = figures["bare"]["cpu_ms"]
    rows = [
        ("bare loop (fixed batch)", figures["bare"]["cpu_ms"], figures["bare"]["wall_ms"], None, None, None),
        ("mmcl Trainer step (fixed batch)", figures["mmcl"]["cpu_ms"], figures["mmcl"]["wall_ms"], None, None,
         None),
    ]  # fmt: skip
    for name, run in e2e.items():
        rows.append((f"{name} (shards, end to end)", run["main_cpu_ms"], run["wall_ms"], run["tree_cpu_ms"],
                     run["main_system_ms"], run["main_page_faults"]))  # fmt: skip
    for name, cpu, wall, tree, system, faults in rows:
        ratio = cpu / bare_cpu if cpu is not None and bare_cpu else None
        print(
            f"  {name:45s} {fmt(cpu):>12s} {fmt(wall):>13s} {fmt(tree):>9s} {fmt(ratio, '.3f'):>11s} "
            f"{fmt(system):>10s} {fmt(faults, '.0f'):>12s}"
        )
    print(
        f"  mmcl step - bare: {fmt(figures['overhead_cpu_ms'])} ms CPU per step (median of per-pair ratios "
        f"{fmt(figures['mmcl_over_bare_cpu'], '.3f')})"
    )


def profile_report(result: dict, top: int) -> dict:
    """Where the mmcl step's extra time goes: per-step op classes and the largest ops outside the model's
    forward/backward (torch.profiler), the largest trainer-side Python self times and the candidates'
    cumulative times (cProfile), each beside the bare loop's."""
    report: dict = {}
    ops = result["ops"]
    if ops["mmcl"]["steps"]:
        per_step = {
            side: {k: v / ops[side]["steps"] for k, v in ops[side]["classes_ms"].items()} for side in ops
        }
        outside = {
            side: {k: v / ops[side]["steps"] for k, v in ops[side]["outside_ms"].items()} for side in ops
        }
        names = sorted(outside["mmcl"], key=lambda k: -(outside["mmcl"][k] - outside["bare"].get(k, 0.0)))
        report["op_classes_ms"] = per_step
        report["ops_outside_model_ms"] = [
            {"op": k, "mmcl": outside["mmcl"][k], "bare": outside["bare"].get(k, 0.0)} for k in names[:top]
        ]
        report["ops_outside_model_total_ms"] = {side: sum(outside[side].values()) for side in outside}
    python = result["python"]
    if python["mmcl"]["steps"]:
        mmcl_self, bare_self = python["mmcl"]["self_ms"], python["bare"]["self_ms"]
        own = sorted((k for k in mmcl_self if k not in bare_self), key=lambda k: -mmcl_self[k][0])
        report["python_mmcl_only_ms"] = [
            {"function": k, "ms": mmcl_self[k][0], "calls": mmcl_self[k][1]} for k in own[:top]
        ]
        report["python_self_total_ms"] = {
            "mmcl_only": sum(mmcl_self[k][0] for k in own),
            "shared_mmcl": sum(v[0] for k, v in mmcl_self.items() if k in bare_self),
            "shared_bare": sum(v[0] for k, v in bare_self.items() if k in mmcl_self),
            "bare_only": sum(v[0] for k, v in bare_self.items() if k not in mmcl_self),
        }
        report["candidates_ms"] = {
            label: {side: python[side]["candidates_ms"].get(label) for side in python}
            for label, _, _ in CANDIDATES
        }
    return report


def print_profile(report: dict) -> None:
    if "op_classes_ms" in report:
        classes = report["op_classes_ms"]
        print("  torch.profiler, self CPU ms per step by where the op ran:")
        for kind in ("forward", "backward", "optimizer", "other"):
            b, m = classes["bare"].get(kind, 0.0), classes["mmcl"].get(kind, 0.0)
            print(f"    {kind:10s} bare {b:9.2f}  mmcl {m:9.2f}  difference {m - b:+8.2f}")
        totals = report["ops_outside_model_total_ms"]
        print(
            f"  ops outside the model's forward/backward: bare {totals['bare']:.2f} ms, mmcl "
            f"{totals['mmcl']:.2f} ms per step; largest differences:"
        )
        for row in report["ops_outside_model_ms"]:
            print(f"    {row['op'][:60]:60s} mmcl {row['mmcl']:8.3f}  bare {row['bare']:8.3f}")
    if "python_mmcl_only_ms" in report:
        totals = report["python_self_total_ms"]
        print(
            "  cProfile, trainer-side self time per step (a builtin's, e.g. a torch op's, charged to its "
            f"caller): in functions both sides run, mmcl {totals['shared_mmcl']:.2f} ms vs bare "
            f"{totals['shared_bare']:.2f} ms; only the bare loop's {totals['bare_only']:.2f} ms; only mmcl's "
            f"{totals['mmcl_only']:.2f} ms, the largest:"
        )
        for row in report["python_mmcl_only_ms"]:
            print(f"    {row['function'][:80]:80s} {row['ms']:8.3f} ms  x{row['calls']:.0f}")
        print("  cumulative ms per step (cProfile) of the candidates:")
        for label, sides in report["candidates_ms"].items():
            if sides["mmcl"] is not None or sides["bare"] is not None:
                print(f"    {label:52s} mmcl {fmt(sides['mmcl'], '8.3f')}  bare {fmt(sides['bare'], '8.3f')}")


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (or configs/models stem)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, each a round")
    parser.add_argument("--workers", type=int, default=1, help="loader workers of the end-to-end runs")
    parser.add_argument("--log-every", type=int, default=1, help="both tools' log interval (the clock)")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps of each side under each profiler")
    parser.add_argument("--top", type=int, default=12, help="rows of each profile list")
    parser.add_argument("--audio", action="store_true", help="also the hf HTSAT audio tower at full size")
    parser.add_argument("--audio-batch", type=int, default=8)
    parser.add_argument("--skip-image", action="store_true", help="only the audio tower (with --audio)")
    parser.add_argument("--skip-e2e", action="store_true", help="no end-to-end runs: the fixed batch only")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="mmcl-micro-vit at 64 px, batch 4, 3 steps after 1, one profiled step, 1 thread, a tiny HTSAT: "
        "checks that everything runs",
    )
    parser.add_argument("--quiet-below", type=float, default=0.5, help="wait for fewer busy cores than this")
    parser.add_argument("--max-wait", type=float, default=30.0, help="... at most this many seconds per run")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "out" / "step")
    parser.add_argument("--json", type=Path, default=None, help="default WORK_DIR/results.json")
    args = parser.parse_args(argv)
    values = vars(args) | {
        "threads": tuple(int(t) for t in args.threads.split(",") if t.strip()),
        "work_dir": args.work_dir.resolve(),
    }
    if args.smoke:
        values |= {"model": "mmcl-micro-vit", "image_size": 64, "batch": 4, "steps": 3, "warmup": 1,
                   "threads": (1,), "profile_steps": 1, "audio_batch": 2, "max_wait": 0.0}  # fmt: skip
    options = Options(**values)
    if options.steps < 1 or options.warmup < 1 or not options.threads:
        parser.error("--steps and --warmup must be at least 1, --threads must name a thread count")
    if options.skip_image and not options.audio:
        parser.error("--skip-image leaves nothing to run without --audio")
    if not (options.skip_image or options.skip_e2e) and not WDS_OLD.exists():
        raise SystemExit(f"{WDS_OLD} missing: pip install --no-deps --target {WDS_OLD} webdataset==0.2.86")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    options.work_dir.mkdir(parents=True, exist_ok=True)
    import torch

    machine = host_facts() | {"torch": torch.__version__, "load_at_start": os.getloadavg()}
    print(f"machine: {machine}", flush=True)
    results: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}}
    results |= {"machine": machine, "rounds": {}}
    image_model, shards = None, None
    if not options.skip_image:
        image_model = image_model_section(options)
        samples = (options.total_steps + 2) * options.batch
        shards = photo_shards(options.work_dir, samples, -(-samples // (2 * max(1, options.workers))))
        results["shards"] = shards
    if options.audio:
        audio = {"tower": "hf", "hf_model": str(htsat_folder(options.work_dir, tiny=options.smoke))}
        audio_model = {"modality": "audio", "open_clip_name": "mmcl-micro-vit", "audio": audio}
        audio_data = str(audio_shards(options.work_dir, 2 * options.audio_batch))
    for threads in options.threads:
        round_results: dict = {}
        if image_model is not None:
            tag = f"{options.model}-t{threads}"
            steps = run_steps(options, image_model, shards["dir"], options.batch, threads, f"steps-{tag}")
            e2e = {}
            if not options.skip_e2e:
                e2e["mmcl train"] = run_mmcl_e2e(options, image_model, shards, threads, f"mmcl-{tag}")
                e2e["open_clip_train"] = run_open_clip_e2e(options, image_model, shards, threads, f"oc-{tag}")
                e2e["mmcl train, malloc as is"] = run_mmcl_e2e(
                    options, image_model, shards, threads, f"mmcl-malloc-as-is-{tag}", MALLOC_AS_IS
                )
            figures = step_figures(steps)
            report = profile_report(steps, options.top)
            print_steps_table(
                f"{options.model} at {options.image_size} px, batch {options.batch}, fp32, {threads} "
                f"thread(s): medians of {options.steps} steps after {options.warmup}",
                figures,
                e2e,
            )
            print_profile(report)
            round_results["image"] = {"steps": figures, "profile": report, "e2e": e2e, "raw": steps}
        if options.audio:
            tag = f"htsat-t{threads}"
            steps = run_steps(options, audio_model, audio_data, options.audio_batch, threads, f"steps-{tag}")
            figures = step_figures(steps)
            report = profile_report(steps, options.top)
            print_steps_table(
                f"hf HTSAT audio tower ({'tiny' if options.smoke else 'ClapAudioConfig defaults'}, "
                f"{steps['parameters'] / 1e6:.1f} M parameters with the micro text tower), 10 s at 48 kHz, "
                f"batch {options.audio_batch}, fp32, {threads} thread(s)",
                figures,
                {},
            )
            print_profile(report)
            round_results["audio"] = {"steps": figures, "profile": report, "raw": steps}
        results["rounds"][str(threads)] = round_results
    out = options.json or options.work_dir / ("results-smoke.json" if options.smoke else "results.json")
    out.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out}")
    failed = [
        name
        for round_results in results["rounds"].values()
        for name, run in round_results.get("image", {}).get("e2e", {}).items()
        if run["returncode"] != 0
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_steps"]:
        steps_child(Path(sys.argv[2]))
        raise SystemExit(0)
    raise SystemExit(main())
