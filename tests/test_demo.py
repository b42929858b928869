"""`mmcl demo` end to end on its tiny size: a re-run with the same settings reuses the finished work, a re-run
with other settings in the same folder starts it afresh instead of reporting the old run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.demo_data import FASHION_DIR

pytestmark = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="needs dataset-fashion-mnist (make sysdeps)",
)


def demo(output: Path, noise_rate: float) -> str:
    command = [
        sys.executable,
        "-m",
        "mmcl",
        "demo",
        "--size",
        "tiny",
        "--modality",
        "image",
        "--processes",
        "1",
        "--noise-rate",
        str(noise_rate),
        "--output",
        str(output),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def noisy_pairs(output: Path) -> int:
    return json.loads((output / "shards" / "image-train" / "manifest.json").read_text())["noise"][
        "noisy_pairs"
    ]


def test_demo_reuses_its_work_and_restarts_for_other_settings(tmp_path):
    out = tmp_path / "demo"
    first = demo(out, 0.3)
    assert "training a micro image-text model" in first and "zero-shot top-1" in first
    assert noisy_pairs(out) == 192  # 30% of 640
    assert (out / "report" / "REPORT.md").exists()

    again = demo(out, 0.3)
    assert "training a micro image-text model" not in again and "zero-shot top-1" in again

    other = demo(out, 0.5)
    assert "settings differ from the last run" in other and "training a micro image-text model" in other
    assert noisy_pairs(out) == 320
    assert json.loads((out / "settings.json").read_text())["noise_rate"] == 0.5
    shutil.rmtree(out)
