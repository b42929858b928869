"""Shared fixtures: small real datasets written in tmp folders (real JPEG/PNG/WAV files), and an environment
without proxies. The helpers behind them are plain modules that bench/ uses too: media_files.py (media and
manifests), processes.py (running, waiting for and watching processes), localhost.py (servers on
127.0.0.1)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from localhost import clear_proxies
from media_files import COLOURS, make_image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def image_csv(tmp_path: Path) -> Path:
    """A CSV manifest of 40 real images (JPEG and PNG) with captions naming their colour."""
    root = tmp_path / "images_in"
    rows = []
    for i in range(40):
        colour = COLOURS[i % len(COLOURS)]
        ext = "jpg" if i % 3 else "png"
        make_image(root / "img" / f"{i:03d}.{ext}", colour, size=(64 + i, 48 + i), seed=i)
        rows.append({"filepath": f"img/{i:03d}.{ext}", "caption": f"a {colour} square number {i}"})
    manifest = root / "pairs.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["filepath", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.fixture
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_proxies(monkeypatch)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on 2 shared cores: a second OpenMP thread only adds contention (several times slower).
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`; the setting is
    restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
