"""Step-time overhead of each noise-weighting method vs weighting off, measured in one process.

Builds one Trainer per method on the same shards, model recipe and seed (weighting active from the first
step: no warm-up), then runs them in alternation, a block of steps each, round after round. It reports the
trainer process's CPU time per step (what the rest of a shared machine disturbs least; DataLoader workers
are other processes and not counted) and the wall time per step, as medians over the rounds, and each
method's ratio to `none` measured in the same rounds.

    .venv/bin/python bench/noise_overhead.py --shards bench/out/noise/shards/image-r0.5-s0
    .venv/bin/python bench/noise_overhead.py --shards bench/out/noise/shards/audio-r0.5-s0 \\
        --recipe configs/audio_text/micro.yaml

Besides the methods, the noise bench's variants run too
(e.g. `--methods none loss_mixture loss_mixture_unlearn`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
METHODS = ["none", "local_fdr", "loss_mixture", "teacher"]


def build_trainer(recipe: Path, shards: Path, noise: dict, output: Path):
    """A trainer with the `noise:` settings `noise` (method and options), weighting from the first step."""
    from mmcl.config import load_train_config
    from mmcl.train.trainer import Trainer

    overrides = [
        f"run.output_dir={output}",
        f"data.sources=[{{urls: '{shards}'}}]",
        "data.workers=1",
        *(f"noise.{key}={value}" for key, value in noise.items()),
        "noise.warmup_steps=0",
        "noise.ramp_steps=0",
        "noise.window=2048",
        "train.steps=100000",
        "train.resume=never",
    ]
    trainer = Trainer(load_train_config(recipe, overrides))
    trainer.setup()
    trainer.model.train()
    trainer.batches = iter(trainer.loader)
    return trainer


def run_block(trainer, steps: int) -> tuple[float, float]:
    """`steps` updates through the training loop's own step; returns (CPU s, wall s) of this process."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        trainer._optimizer_step([next(trainer.batches)])
        trainer.state.step += 1
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=Path, required=True, help="a folder of training shards (with noise)")
    parser.add_argument("--recipe", type=Path, default=REPO / "configs" / "image_text" / "micro_resnet.yaml")
    from noise_bench import VARIANTS  # bench/noise_bench.py

    parser.add_argument("--methods", nargs="+", default=METHODS, choices=[*METHODS, *VARIANTS])
    parser.add_argument(
        "--warmup", type=int, default=40, help="steps per method before timing (fills the window)"
    )
    parser.add_argument("--block", type=int, default=20, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from host import host_facts  # bench/host.py

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            m: build_trainer(
                args.recipe, args.shards.resolve(), {"method": m, **VARIANTS.get(m, {})}, Path(tmp) / m
            )
            for m in args.methods
        }
        for trainer in trainers.values():
            run_block(trainer, args.warmup)
        per_round: dict[str, list[tuple[float, float]]] = {m: [] for m in args.methods}
        for r in range(args.rounds):
            order = args.methods if r % 2 == 0 else args.methods[::-1]
            for method in order:
                cpu, wall = run_block(trainers[method], args.block)
                per_round[method].append((cpu / args.block, wall / args.block))
    rows = {}
    for method, samples in per_round.items():
        cpu_ratio = (
            [c / b[0] for (c, _), b in zip(samples, per_round["none"], strict=True)]
            if "none" in per_round
            else []
        )
        wall_ratio = (
            [w / b[1] for (_, w), b in zip(samples, per_round["none"], strict=True)]
            if "none" in per_round
            else []
        )
        rows[method] = {
            "cpu_ms_per_step": 1000 * statistics.median(c for c, _ in samples),
            "wall_ms_per_step": 1000 * statistics.median(w for _, w in samples),
            "cpu_vs_none": statistics.median(cpu_ratio) if cpu_ratio else None,
            "wall_vs_none": statistics.median(wall_ratio) if wall_ratio else None,
        }
    print(f"{'method':<22} {'CPU ms/step':>12} {'wall ms/step':>13} {'CPU vs none':>12} {'wall vs none':>13}")
    for method, row in rows.items():
        ratios = [f"{row[k]:.3f}" if row[k] is not None else "" for k in ("cpu_vs_none", "wall_vs_none")]
        print(
            f"{method:<22} {row['cpu_ms_per_step']:12.1f} {row['wall_ms_per_step']:13.1f} {ratios[0]:>12} "
            f"{ratios[1]:>13}"
        )
    result = {
        "host": host_facts(),
        "argv": sys.argv,
        "load_at_end": os.getloadavg(),
        "rows": rows,
        "rounds": {m: [list(s) for s in v] for m, v in per_round.items()},
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
