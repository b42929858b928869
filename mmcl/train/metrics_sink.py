"""Where a run's records go: one JSON row per `log` in RUN/metrics.jsonl, and TensorBoard (RUN/tensorboard),
written by the main process only (another tracker, e.g. Accelerate's `log_with`, is one more call in `log`);
with train.log_sample_keys, RUN/sample_keys/rank-R.jsonl from every rank.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from shards_tools.writer import open_new

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
SAMPLE_KEYS = "sample_keys"


class MetricsSink:
    """`log(step, scalars)` appends {"step": step, **scalars} to metrics.jsonl and adds each finite scalar to
    TensorBoard. A name with a section ("eval/TASK/METRIC") is its own TensorBoard tag; a plain name is a
    training scalar, tagged "train/NAME"."""

    def __init__(self, output: Path, *, start_step: int, main_process: bool) -> None:
        """A run that starts at `start_step` (0, or the resumed checkpoint's step) keeps metrics.jsonl's rows
        up to it."""
        self.output = Path(output)
        self.tb = None
        if not main_process:
            return
        keep_rows_until(self.output / METRICS, start_step)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(self.output / TENSORBOARD)

    def log(
        self, step: int, scalars: dict[str, float], histograms: dict[str, np.ndarray] | None = None
    ) -> None:
        if self.tb is None:
            return
        with open(self.output / METRICS, "a") as handle:
            handle.write(json.dumps({"step": step, **scalars}) + "\n")
        for name, value in scalars.items():
            if math.isfinite(value):
                self.tb.add_scalar(name if "/" in name else f"train/{name}", value, step)
        for tag, values in (histograms or {}).items():
            self.tb.add_histogram(tag, values, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def keep_rows_until(path: Path, step: int) -> None:
    """Keep the complete rows of a JSON-lines log (metrics.jsonl, a sample key log) up to `step`, where this
    run starts: a run killed after its last checkpoint logged steps that are now redone, and may have left a
    torn last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    with open_new(tmp) as handle:  # never through a link planted in a shared run folder
        handle.write("".join(kept).encode("utf-8"))
    os.replace(tmp, path)


class SampleKeyLog:
    """RUN/sample_keys/rank-R.jsonl: per step, the samples this rank trained on, as
    {"step": s, "samples": [[epoch, key], ...]} and, with noise weighting on, "weights": each pair's weight
    (what `mmcl shard score --from-run` exports). With the resumed run's rows dropped past its checkpoint
    (`keep_sample_logs_until`, by the main process before any rank writes), the files of all ranks together
    list each trained sample once per time it was trained on, whatever layouts the run was resumed on."""

    def __init__(self, output: Path, rank: int) -> None:
        folder = Path(output) / SAMPLE_KEYS
        folder.mkdir(parents=True, exist_ok=True)
        self.handle = open(folder / f"rank-{rank}.jsonl", "a", encoding="utf-8")

    def write(self, step: int, batches: list[dict], weights=None) -> None:
        """One step's row; `weights`: the weighting's tensor for the batches' pairs, in order (or None)."""
        samples = [
            [int(epoch), key]
            for batch in batches
            for epoch, key in zip(
                batch["consumed"][: len(batch["keys"]), 0].tolist(), batch["keys"], strict=True
            )
        ]
        row: dict = {"step": step, "samples": samples}
        if weights is not None:
            row["weights"] = [round(w, 5) for w in weights.detach().float().flatten().cpu().tolist()]
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def keep_sample_logs_until(output: Path, step: int) -> None:
    """Drop every rank's sample key rows past `step` (the checkpoint a run resumes from)."""
    for path in sorted((Path(output) / SAMPLE_KEYS).glob("rank-*.jsonl")):
        keep_rows_until(path, step)
