"""GPU training throughput, `mmcl train` vs `open_clip_train.main` side by side: samples/s, MFU, peak memory
and data wait, with torch.compile off and on.

Run from the repository root with the project venv, on a machine with one GPU:

    .venv/bin/python bench/gpu_bench.py                        # ViT-B-32, bf16, batch 256, compile off,on
    .venv/bin/python bench/gpu_bench.py --compile off --tools mmcl   # one run
    .venv/bin/python bench/gpu_bench.py --real-shards /data/cc3m-256  # also real shards
    .venv/bin/python bench/gpu_bench.py --smoke                # the whole bench on the CPU, tiny: it runs

Both tools train the same open_clip architecture (--model, 224 px) from scratch on the same shards with the
same settings (train_bench's side-by-side settings: AdamW lr 5e-4, 10 warm-up steps, weight decay 0.1,
clipping at 1.0), --batch per GPU, --workers loader workers, bf16 autocast (open_clip --precision amp_bf16,
mmcl train.mixed_precision bf16), the local loss (open_clip --local-loss --gather-with-grad, mmcl
loss.gather + loss.local_loss: the same on one GPU, where nothing is gathered) and, for --compile on,
torch.compile of the model (open_clip --torchcompile, mmcl train.compile). mmcl runs its defaults otherwise
(on a GPU: data.image_on_device, the resize and normalisation batched on the GPU). Each run is one process
(`mmcl train`; open_clip's trainer with webdataset 0.2.86 first on PYTHONPATH, as train_bench runs it), in
alternating order.

  samples/s    from each tool's own log over the steady state (log windows after --warmup steps, which hold
               the compilation): mmcl's metrics.jsonl samples_per_s, open_clip's `Batch (t)` window means;
               beside it the bench's own clock (log lines as they appear)
  MFU          samples/s x the model's FLOPs per sample / the card's peak: FLOPs of one forward + backward
               counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention) on the
               CPU; the peak from PEAK_TFLOPS by torch.cuda.get_device_name (bf16 dense), or --peak-tflops;
               null when neither applies (the CPU)
  peak memory  torch.cuda.max_memory_allocated (and _reserved) of the trainer process, at its exit
  data wait    mmcl's data_wait_fraction (time blocked in next(loader) / window time), open_clip's
               `Data (t)` / `Batch (t)`, over the steady state

Data: `synthetic` = bench/shard_bench.py's photo-like pictures at 256 px (1,024 distinct ones repeated),
sharded by `mmcl shard image-text` (step_bench.photo_shards) into at least 4 shards per loader worker;
`real` = --real-shards: a folder of `mmcl shard image-text` shards (e.g. CC3M at 256 px), or
`fashion-mnist` for Debian's dataset-fashion-mnist pictures (train_bench's, 64 px; `apt-get install
dataset-fashion-mnist`). Cached under --work-dir (default bench/out/gpu/, git-ignored); runs and logs in
WORK_DIR/runs/. Results: a table on stdout and WORK_DIR/results.json (results-smoke.json with --smoke).

--smoke runs all of it on the CPU with configs/models/mmcl-micro-vit at 64 px, batch 4, 3 steps after 1,
fp32, compile off, 1 loader worker and 1 torch thread, so that the script cannot rot without a GPU
(tests/test_gpu_bench_smoke.py runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from host import host_facts, wait_for_quiet  # noqa: E402
from step_bench import fmt, fresh, image_model_section, photo_shards  # noqa: E402
from train_bench import (  # noqa: E402
    MMCL_PROGRESS,
    OPEN_CLIP_PROGRESS,
    PEAK_LINE,
    VENV,
    WDS_OLD,
    bench_clock,
    last_step,
    make_images,
    make_shards,
    mmcl_train_config,
    mmcl_windows,
    open_clip_command,
    open_clip_train_args,
    open_clip_windows,
    print_device_peak,
    run_process,
    shard_pattern,
    summarize,
    thread_env,
)

# bf16 dense tensor-core peaks, TFLOP/s, by a piece of torch.cuda.get_device_name(); the first match counts
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]
UNIQUE_PICTURES = 1024


def mmcl_child(config: str) -> int:
    """`gpu_bench.py _mmcl CONFIG`: `mmcl train --config CONFIG` in this process, then the device's peak
    memory (train_bench.print_device_peak)."""
    from mmcl.cli import main as mmcl_main

    try:
        return mmcl_main(["train", "--config", config])
    finally:
        print_device_peak()


def peak_tflops(device_name: str | None, given: float | None) -> float | None:
    """--peak-tflops, else the table's entry for the device, else None (a CPU, an unknown card)."""
    if given is not None:
        return given
    return next((peak for key, peak in PEAK_TFLOPS if device_name and key in device_name), None)


def flops_per_sample(model_section: dict, image_size: int, batch: int = 2) -> float:
    """FLOPs of one training step per sample: the model's forward and backward with ClipLoss, counted by
    FlopCounterMode on the CPU in fp32 (the same count as under bf16 autocast)."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmcl.models import build_model
    from mmcl.models.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(**model_section)).train()
    images = torch.randn(batch, 3, image_size, image_size)
    texts = model.tokenizer([f"a synthetic test picture number {i}" for i in range(batch)])
    with FlopCounterMode(display=False) as counter:
        out = model(images, texts)
        loss = open_clip.ClipLoss()(out["media_features"], out["text_features"], out["logit_scale"])
        loss.backward()
    return counter.get_total_flops() / batch


@dataclass(frozen=True)
class Options:
    """The command line (parse_options); the "args" of the results file."""

    model: str
    image_size: int
    batch: int
    steps: int
    warmup: int
    workers: int
    threads: int
    precision: str
    compile: tuple[str, ...]
    tools: tuple[str, ...]
    real_shards: str | None
    peak_tflops: float | None
    log_every: int
    device: str
    smoke: bool
    quiet_below: float
    max_wait: float
    timeout: float
    work_dir: Path
    json: Path | None

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


def data_sets(options: Options) -> dict[str, dict]:
    """The shard sets to train on: synthetic always, real with --real-shards; each {dir, pattern, ...}."""
    samples = math.ceil(1.25 * options.total_steps * options.batch)  # a margin: no worker runs dry
    shard_size = max(1, samples // (4 * options.workers))
    cores = os.cpu_count() or 1
    sets = {"synthetic": photo_shards(options.work_dir, samples, shard_size, UNIQUE_PICTURES, workers=cores)}
    if options.real_shards == "fashion-mnist":
        manifest, _ = make_images(options.work_dir, samples)
        sets["real"] = make_shards(
            options.work_dir, manifest, samples, shard_size, f"fmnist-n{samples}-x{shard_size}", workers=cores
        )
    elif options.real_shards:
        folder = Path(options.real_shards).resolve()
        pattern, shards = shard_pattern(folder)
        sets["real"] = {"name": folder.name, "dir": str(folder), "pattern": pattern, "shards": len(shards)}
    return sets


def run_mmcl(options: Options, model: dict, shards: dict, compiled: bool, tag: str) -> dict:
    """`mmcl train` (through mmcl_child) with the bench's settings; its log windows and peak memory."""
    run_dir = options.work_dir / "runs" / tag
    fresh(run_dir)
    steps, every = options.total_steps, options.log_every
    config = mmcl_train_config(run_dir, shards["dir"], options.batch, options.workers, steps, log_every=every)
    config["model"] = model
    config["optim"]["warmup_steps"] = min(config["optim"]["warmup_steps"], steps - 1)
    config["loss"] = {"kind": "clip", "gather": True, "local_loss": True}
    precision = "bf16" if options.precision == "bf16" else "no"
    config["train"] |= {"mixed_precision": precision, "compile": compiled}
    path = run_dir.parent / f"{tag}.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    cmd = [str(VENV / "bin" / "python"), str(Path(__file__).resolve()), "_mmcl", str(path)]
    log = run_dir.parent / f"{tag}.log"
    progress = last_step(run_dir / "metrics.jsonl", MMCL_PROGRESS)
    run = run_process(cmd, trainer_env(options), log, options.timeout, progress)
    windows = mmcl_windows(run_dir / "metrics.jsonl", options.batch)
    return figures(options, run, windows, log) | {"command": f"mmcl train --config {path}"}


def run_open_clip(options: Options, shards: dict, compiled: bool, tag: str) -> dict:
    """`open_clip_train.main` on the same shards and settings (train_bench's runner), local loss."""
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
        device=options.device,
        precision="amp_bf16" if options.precision == "bf16" else "fp32",
    )
    oc_args += ["--local-loss", "--gather-with-grad"] + (["--torchcompile"] if compiled else [])
    if options.image_size != native_image_size(options.model):
        oc_args += ["--force-image-size", str(options.image_size)]
    cmd, extra_env = open_clip_command(oc_args)
    log = logs / f"{tag}.log"
    progress = last_step(log, OPEN_CLIP_PROGRESS, options.batch)
    run = run_process(cmd, trainer_env(options) | extra_env, log, options.timeout, progress)
    windows = open_clip_windows(log.read_text(errors="replace"), options.batch)
    command = f"PYTHONPATH={WDS_OLD} python -m open_clip_train.main " + " ".join(oc_args)
    return figures(options, run, windows, log) | {"command": command}


def trainer_env(options: Options) -> dict:
    """A trainer's environment: --threads (train_bench.thread_env) and, on the CPU, no GPU to be seen (mmcl
    trains on one whenever there is one)."""
    env = thread_env(options.threads)
    if options.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def native_image_size(model: str) -> int | None:
    import open_clip

    config = open_clip.get_model_config(model)
    return config["vision_cfg"].get("image_size") if config else None


def figures(options: Options, run: dict, windows: list[dict], log: Path) -> dict:
    """A run's steady-state figures from its tool's log windows, the bench's clock and its peak line."""
    tool = summarize(windows, SimpleNamespace(exclude_steps=options.warmup, batch_size=options.batch))
    clock = bench_clock(run["events"], options.warmup, options.batch)
    peak_lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(PEAK_LINE)]
    peak = json.loads(peak_lines[-1][len(PEAK_LINE) :]) if peak_lines else {}
    return {
        "returncode": run["returncode"],
        "log": str(log),
        "wall_s": run["wall_s"],
        "steps_logged": tool["steps_logged"],
        "steady_steps": tool["steady_steps"],
        "samples_per_s": tool["steady_samples_per_s"],
        "bench_samples_per_s": clock["bench_samples_per_s"],
        "step_ms": tool["steady_step_ms"],
        "data_wait_fraction": tool["steady_data_wait_fraction"],
        "max_window_data_wait_fraction": tool["max_window_data_wait_fraction"],
        "final_loss": tool["final_loss"],
        "device_name": peak.get("device_name"),
        "peak_memory_mib": peak.get("max_memory_allocated_mib"),
        "peak_reserved_mib": peak.get("max_memory_reserved_mib"),
        "peak_main_rss_mib": run["peak_main_rss_mib"],
        "others_cpu_cores": run["others_cpu_cores"],
    }


def print_table(options: Options, runs: list[dict], flops: float) -> None:
    print(
        f"\n{options.model} at {options.image_size} px, batch {options.batch}, {options.precision}, "
        f"{options.workers} loader workers; {flops / 1e9:.2f} GFLOP per sample (forward + backward); "
        f"steady state = log windows after step {options.warmup}"
    )
    header = (
        f"{'data':10s} {'compile':7s} {'tool':10s} {'samples/s':>9s} {'(bench)':>8s} {'step ms':>8s} "
        f"{'MFU':>6s} {'peak GiB':>8s} {'data wait':>9s} {'wall s':>7s}  device"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        mfu = f"{100 * run['mfu']:.1f}%" if run["mfu"] is not None else "-"
        memory = run["peak_memory_mib"] / 1024 if run["peak_memory_mib"] is not None else None
        wait = run["data_wait_fraction"]
        print(
            f"{run['data']:10s} {run['compile']:7s} {run['tool']:10s} {fmt(run['samples_per_s']):>9s} "
            f"{fmt(run['bench_samples_per_s']):>8s} {fmt(run['step_ms']):>8s} {mfu:>6s} "
            f"{fmt(memory, '.2f'):>8s} {fmt(None if wait is None else 100 * wait) + '%':>9s} "
            f"{run['wall_s']:7.1f}  {run['device_name']}"
            + ("" if run["returncode"] == 0 else f"  FAILED (exit {run['returncode']}): {run['log']}")
        )


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (or configs/models stem)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256, help="per GPU")
    parser.add_argument("--steps", type=int, default=80, help="steady-state steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out: compilation, loader start")
    parser.add_argument("--workers", type=int, default=min(12, max(1, (os.cpu_count() or 1) - 2)))
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads of each trainer (0: unset, each tool's default)"
    )
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--compile", default="off,on", help="torch.compile settings to run: off, on or both")
    parser.add_argument("--tools", default="mmcl,open_clip")
    parser.add_argument(
        "--real-shards", default=None, help="a folder of mmcl shards, or fashion-mnist (Debian's package)"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's peak, for MFU")
    parser.add_argument("--log-every", type=int, default=10, help="both tools' log interval")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="on the CPU: mmcl-micro-vit at 64 px, batch 4, 3 steps after 1, fp32, compile off",
    )
    parser.add_argument("--quiet-below", type=float, default=1.0, help="wait for fewer busy cores than this")
    parser.add_argument("--max-wait", type=float, default=10.0, help="... at most this many seconds per run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "out" / "gpu")
    parser.add_argument("--json", type=Path, default=None, help="default WORK_DIR/results.json")
    args = parser.parse_args(argv)
    import torch

    values = vars(args) | {
        "compile": tuple(c.strip() for c in args.compile.split(",") if c.strip()),
        "tools": tuple(t.strip() for t in args.tools.split(",") if t.strip()),
        "work_dir": args.work_dir.resolve(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if args.smoke:
        values |= {"model": "mmcl-micro-vit", "image_size": 64, "batch": 4, "steps": 3, "warmup": 1,
                   "workers": 1, "threads": 1, "precision": "fp32", "compile": ("off",), "log_every": 1,
                   "device": "cpu", "max_wait": 0.0}  # fmt: skip
    options = Options(**values)
    if set(options.compile) - {"off", "on"} or set(options.tools) - {"mmcl", "open_clip"}:
        parser.error("--compile takes off and/or on, --tools mmcl and/or open_clip")
    if options.steps < options.log_every or options.warmup < 1:
        parser.error("--steps must hold a log window (--log-every steps), --warmup at least the first step")
    if "open_clip" in options.tools and not WDS_OLD.exists():
        raise SystemExit(f"{WDS_OLD} missing: pip install --no-deps --target {WDS_OLD} webdataset==0.2.86")
    if options.device == "cpu" and not options.smoke:
        print("no GPU: this runs on the CPU (use --smoke for a quick check)", flush=True)
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    options.work_dir.mkdir(parents=True, exist_ok=True)
    import open_clip
    import torch

    machine = host_facts() | {"torch": torch.__version__, "open_clip": open_clip.__version__}
    print(f"machine: {machine}", flush=True)
    model = image_model_section(options)
    sets = data_sets(options)
    flops = flops_per_sample(model, options.image_size)
    runs = []
    for data, shards in sets.items():
        for compile_mode in options.compile:
            tools = list(options.tools) if len(runs) % 2 == 0 else list(reversed(options.tools))
            for tool in tools:
                tag = f"{tool}-{data}-compile-{compile_mode}"
                wait_for_quiet(options.quiet_below, options.max_wait)
                compiled = compile_mode == "on"
                if tool == "mmcl":
                    run = run_mmcl(options, model, shards, compiled, tag)
                else:
                    run = run_open_clip(options, shards, compiled, tag)
                peak = peak_tflops(run["device_name"], options.peak_tflops)
                run |= {
                    "tool": tool,
                    "data": data,
                    "compile": compile_mode,
                    "peak_tflops": peak,
                    "mfu": run["samples_per_s"] * flops / (peak * 1e12)
                    if peak and run["samples_per_s"]
                    else None,
                }
                runs.append(run)
                print(
                    f"{tag}: exit {run['returncode']}, {fmt(run['samples_per_s'])} samples/s, wall "
                    f"{run['wall_s']:.0f} s",
                    flush=True,
                )
    print_table(options, runs, flops)
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "machine": machine,
        "flops_per_sample": flops,
        "data": sets,
        "runs": runs,
    }
    out = options.json or options.work_dir / ("results-smoke.json" if options.smoke else "results.json")
    out.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out}")
    return 0 if all(run["returncode"] == 0 for run in runs) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["_mmcl"]:
        raise SystemExit(mmcl_child(sys.argv[2]))
    raise SystemExit(main())
