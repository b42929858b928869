"""Shared fixtures: small real datasets written in tmp folders (real JPEG/PNG/WAV files)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
RGB = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 160),
    "orange": (240, 140, 20),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_image(path: Path, colour: str, size: tuple[int, int] = (96, 80), seed: int = 0) -> Path:
    """A real image file: a coloured square with some texture so JPEG sizes vary."""
    rng = np.random.default_rng(seed)
    base = np.array(RGB[colour], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-20, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_tone(path: Path, freq: float, seconds: float = 0.5, rate: int = 22050, channels: int = 1) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, data, rate)
    return path


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


def run_mmcl(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "mmcl", *map(str, args)], capture_output=True, text=True, cwd=REPO, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mmcl {' '.join(map(str, args))} exited {result.returncode}\n{result.stderr}")
    return result


SHAPES = ["square", "circle", "triangle", "cross"]


def make_shape(path: Path, colour: str, shape: str, seed: int, size: int = 48) -> Path:
    """A real picture of a coloured shape on a grey textured background, slightly jittered."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    background = np.clip(128 + rng.integers(-25, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    c = size // 2 + int(rng.integers(-4, 5))
    r = size // 3 + int(rng.integers(-3, 4))
    fill = RGB[colour]
    if shape == "square":
        draw.rectangle([c - r, c - r, c + r, c + r], fill=fill)
    elif shape == "circle":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(c, c - r), (c - r, c + r), (c + r, c + r)], fill=fill)
    else:
        w = max(2, r // 3)
        draw.rectangle([c - r, c - w, c + r, c + w], fill=fill)
        draw.rectangle([c - w, c - r, c + w, c + r], fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_shapes_manifest(root: Path, count: int, seed: int = 0) -> Path:
    """`count` pictures of 8 colours x 4 shapes with captions naming both (32 distinct captions)."""
    rows = []
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        make_shape(root / f"{i:05d}.png", colour, shape, seed=seed * 100003 + i)
        rows.append(f"{i:05d}.png,a {colour} {shape}\n")
    manifest = root / "pairs.csv"
    manifest.write_text("path,caption\n" + "".join(rows))
    return manifest
