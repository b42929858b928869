"""Small real media files for tests and benchmarks: coloured pictures, tones, shapes and their manifests.

Plain functions (no pytest), so that bench/ can use them too: bench scripts put tests/ on sys.path and
import this module; tests/conftest.py builds its fixtures from it.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

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
SHAPES = ["square", "circle", "triangle", "cross"]


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


def make_shape(path: Path, colour: str, shape: str, seed: int, size: int = 48) -> Path:
    """A real picture of a coloured shape on a grey textured background, slightly jittered."""
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


def png_header_only(width: int, height: int) -> bytes:
    """A valid, tiny PNG that claims width x height pixels: a decompression bomb's header."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
