"""CPU inference with and without mmcl's allocator setting: the forward passes `mmcl eval` and
`mmcl shard score` run, at a real model size.

    .venv/bin/python bench/eval_memory_bench.py                 # ViT-B-32, 224 px, batch 128, 1 thread
    .venv/bin/python bench/eval_memory_bench.py --smoke         # mmcl-micro-vit, 64 px, batch 8: it runs

Each side is a fresh process that does what the two commands do before loading a model
(mmcl.eval.cli.check_run_flags with --device cpu), builds the model (open_clip, random weights, no
download), and encodes --batches batches of random images under torch.no_grad after one warm-up batch,
as the evaluators do:

  mmcl      check_run_flags keeps freed memory in the heap (mmcl.host_memory)
  as is     the same with glibc's allocator at its defaults (a tunable at its default value: a setting of
            the user's, so mmcl leaves the allocator alone)

The sides take turns (--rounds of each) so that the machine's drift is shared. Per batch: wall seconds,
the process's system CPU seconds and minor page faults (pages the kernel mapped in again). Results: a
table on stdout and bench/out/eval_memory/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from host import host_facts  # noqa: E402
from processes import MALLOC_AS_IS  # noqa: E402

CHILD = """
import argparse, json, resource, sys, time
import open_clip, torch
from mmcl.eval.cli import check_run_flags
model_name, size, batch, batches, threads = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
torch.set_num_threads(threads)
check_run_flags(argparse.Namespace(batch_size=batch, workers=0, max_samples=None, device="cpu"))
if model_name.startswith("mmcl-"):
    open_clip.add_model_config(f"configs/models/{model_name}.json")
model = open_clip.create_model(model_name).eval()
images = torch.randn(batch, 3, size, size)
rows = []
with torch.no_grad():
    for index in range(batches + 1):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        model.encode_image(images)
        after = resource.getrusage(resource.RUSAGE_SELF)
        if index:  # the first batch warms up
            rows.append({"wall_s": time.perf_counter() - start, "system_s": after.ru_stime - before.ru_stime,
                         "page_faults": after.ru_minflt - before.ru_minflt})
print(json.dumps(rows))
"""


def run_side(args: argparse.Namespace, extra_env: dict[str, str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env.update(extra_env, OMP_NUM_THREADS=str(args.threads), CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    command = [sys.executable, "-c", CHILD, args.model, str(args.size), str(args.batch), str(args.batches),
               str(args.threads)]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=3, help="timed batches a round, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="processes of each side, taking turns")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="mmcl-micro-vit, 64 px, batch 8, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.size, args.batch, args.batches, args.rounds = "mmcl-micro-vit", 64, 8, 2, 1
    sides = {"mmcl": {}, "as is": MALLOC_AS_IS}
    rows: dict[str, list[dict]] = {name: [] for name in sides}
    for round_index in range(args.rounds):
        for name, extra_env in sides.items():
            print(f"round {round_index + 1}/{args.rounds}: {name} ...", flush=True)
            rows[name] += run_side(args, extra_env)
    keys = ("wall_s", "system_s", "page_faults")
    summary = {
        name: {key: statistics.median(row[key] for row in rows[name]) for key in keys} for name in sides
    }
    print(f"{args.model}, {args.size} px, batch {args.batch}, {args.threads} thread(s): medians a batch")
    print(f"  {'side':<8} {'wall s':>8} {'system s':>9} {'page faults':>12}")
    for name, s in summary.items():
        print(f"  {name:<8} {s['wall_s']:8.2f} {s['system_s']:9.2f} {s['page_faults']:12,.0f}")
    print(f"  as is / mmcl, wall: {summary['as is']['wall_s'] / summary['mmcl']['wall_s']:.2f}x")
    out = REPO / "bench" / "out" / "eval_memory"
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "host": host_facts(), "summary": summary, "batches": rows}
    (out / ("results-smoke.json" if args.smoke else "results.json")).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
