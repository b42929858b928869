"""The training benchmarks' --smoke runs: bench/gpu_bench.py (mmcl vs open_clip_train on a GPU) and
bench/step_bench.py (per-step cost against a bare loop) each run whole on the CPU with the micro model for a
few steps, as commands (tests never import bench/), so that they cannot rot between the runs on a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import LAUNCH_HANG_GUARD_S, REPO

WDS_OLD = REPO / ".venv" / "wds-0.2.86"


def run_smoke(script: str, work: Path) -> dict:
    """Run `bench/SCRIPT --smoke` in WORK; return its results file."""
    if not WDS_OLD.exists():
        pytest.fail("missing .venv/wds-0.2.86 (open_clip's trainer needs it): run `make install`")
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--smoke", "--work-dir", str(work)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=LAUNCH_HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((work / "results-smoke.json").read_text())


def finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_gpu_bench_smoke_reports_both_tools(tmp_path: Path) -> None:
    results = run_smoke("gpu_bench.py", tmp_path)
    assert finite(results["flops_per_sample"])
    runs = {run["tool"]: run for run in results["runs"]}
    assert set(runs) == {"mmcl", "open_clip"}
    for tool, run in runs.items():
        assert run["returncode"] == 0 and run["compile"] == "off" and run["data"] == "synthetic", tool
        assert finite(run["samples_per_s"]) and finite(run["step_ms"]), (tool, run)
        assert 0 <= run["data_wait_fraction"] <= 1, (tool, run)
        assert run["device_name"] == "cpu"
        # no GPU: no peak memory, no card peak, so no MFU; the fields are there
        assert run["peak_memory_mib"] is None and run["mfu"] is None, (tool, run)


def test_step_bench_smoke_reports_every_side_and_the_profile(tmp_path: Path) -> None:
    results = run_smoke("step_bench.py", tmp_path)
    image = results["rounds"]["1"]["image"]
    for side in ("bare", "mmcl"):
        assert finite(image["steps"][side]["cpu_ms"]) and finite(image["steps"][side]["wall_ms"]), side
    assert set(image["e2e"]) == {"mmcl train", "open_clip_train", "mmcl train, malloc as is"}
    for name, run in image["e2e"].items():
        assert run["returncode"] == 0 and finite(run["tool_step_ms"]), (name, run)
        assert run["main_page_faults"] >= 0 and run["main_system_ms"] >= 0, (name, run)
    profile = image["profile"]
    assert {"forward", "backward", "optimizer"} <= set(profile["op_classes_ms"]["mmcl"])
    assert profile["python_mmcl_only_ms"] and "candidates_ms" in profile
