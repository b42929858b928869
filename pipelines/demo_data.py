"""Small real datasets for the demo, built offline from Debian packages (installed by `make demo`):

- images: Fashion-MNIST (package dataset-fashion-mnist), 10 clothing classes; train pairs get captions
  from varied templates, held-out test images are written as class folders for zero-shot evaluation.
- audio: words spoken by espeak-ng (package espeak-ng) in several voices; held-out *voices* are kept
  for evaluation, so the audio model must generalise to speakers it never heard.

Everything is written under a work folder and reused on the next run.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from mmcl.errors import UsageError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
IMAGE_CAPTIONS = [
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "a black and white photo of a {}.",
    "a product photo of a {}.",
    "a small {}.",
    "an image of a {}.",
]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
AUDIO_CAPTIONS = ["a person saying {}.", "the spoken word {}.", "someone says {}.", "a voice saying {}."]
TRAIN_VOICES = ["en+m1", "en+m3", "en+f1", "en+f3", "en-us+m2", "en-us+f2", "en+m5", "en+f4"]
HELD_OUT_VOICES = ["en-us+m4", "en+f2", "en+m7"]
# more training speakers (espeak-ng's named variants; none is a test voice of the demo or the noise bench)
EXTRA_TRAIN_VOICES = [
    f"en+{name}"
    for name in [
        "adam",
        "anika",
        "announcer",
        "aunty",
        "belinda",
        "benjamin",
        "boris",
        "caleb",
        "david",
        "edward",
        "grandma",
        "grandpa",
        "iven",
        "john",
        "linda",
        "max",
        "michel",
        "norbert",
        "paul",
        "pedro",
        "quincy",
        "rob",
        "steph",
        "travis",
    ]
]
HELD_OUT_SETTINGS = [(140, 40), (175, 60)]  # (words per minute, pitch) of each held-out clip
# the audio test set of the demo and the noise bench: the 3 held-out voices and 9 more that no training clip
# has (5 of them other accents), each at 5 speeds and pitches: 600 clips (the 60 of the 3 voices at
# HELD_OUT_SETTINGS alone saturate at ~100%)
AUDIO_TEST_VOICES = [
    *HELD_OUT_VOICES,
    "en+m2",
    "en+m6",
    "en+f5",
    "en-us+m6",
    "en-gb-scotland+m4",
    "en-029+f1",
    "en-us-nyc+m2",
    "en-gb-x-rp+f2",
    "en-gb-x-gbclan+m7",
]
AUDIO_TEST_SETTINGS = sorted({*HELD_OUT_SETTINGS, (120, 30), (160, 50), (200, 70)})


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX array (the MNIST/Fashion-MNIST file format) as a uint8 NumPy array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _done(folder: Path, params: dict) -> bool:
    """Whether `folder` was completely built with exactly these parameters (other sizes are rebuilt)."""
    try:
        return json.loads((folder / ".complete").read_text()) == params
    except (OSError, ValueError):
        return False


def _mark_done(folder: Path, params: dict) -> None:
    (folder / ".complete").write_text(json.dumps(params) + "\n")


def build_fashion_mnist(root: Path, train_count: int, test_per_class: int, seed: int = 0) -> dict[str, Path]:
    """Write train images + a CSV manifest and held-out test images as class folders."""
    root = Path(root)
    params = {"train_count": train_count, "test_per_class": test_per_class, "seed": seed}
    if not _done(root, params):
        if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
            raise UsageError(
                f"Fashion-MNIST not found in {FASHION_DIR}: "
                "apt-get install dataset-fashion-mnist (make sysdeps)"
            )
        shutil.rmtree(root, ignore_errors=True)
        rng = random.Random(seed)
        images = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
        (root / "train").mkdir(parents=True)
        rows = []
        for i in sorted(rng.sample(range(len(images)), train_count)):
            name = FASHION_CLASSES[labels[i]]
            Image.fromarray(images[i]).save(root / "train" / f"{i:05d}.png")
            rows.append(
                {
                    "path": f"train/{i:05d}.png",
                    "caption": rng.choice(IMAGE_CAPTIONS).format(name),
                    "label": name,
                }
            )
        with open(root / "train.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "caption", "label"])
            writer.writeheader()
            writer.writerows(rows)
        test_images = read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
        test_labels = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
        counts = dict.fromkeys(range(10), 0)
        for i, label in enumerate(test_labels):
            if counts[int(label)] < test_per_class:
                folder = root / "test" / FASHION_CLASSES[label].replace(" ", "_")
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(test_images[i]).save(folder / f"{i:05d}.png")
                counts[int(label)] += 1
        _mark_done(root, params)
    return {"train": root / "train.csv", "test": root / "test"}


def _require_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        raise UsageError("espeak-ng not found: apt-get install espeak-ng (make sysdeps)")


def _speak(text: str, voice: str, speed: int, pitch: int, path: Path) -> None:
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
        check=True,
        capture_output=True,
    )


def write_caption_prompts(path: Path) -> Path:
    """AUDIO_CAPTIONS as a zero-shot templates file (one per line) at `path`: a text tower trained from
    scratch on these captions knows only their words, so its zero-shot prompts must use their phrasing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{caption}\n" for caption in AUDIO_CAPTIONS))
    return path


def write_held_out_speech(folder: Path, voices: list[str], settings: list[tuple[int, int]]) -> None:
    """Every word of WORDS spoken by each voice at each (speed, pitch), as class folders
    (`folder/WORD/*.wav`): a zero-shot test set of speakers the training clips never had."""
    for word in WORDS:
        (folder / word).mkdir(parents=True, exist_ok=True)
        for voice in voices:
            for r, (speed, pitch) in enumerate(settings):
                _speak(word, voice, speed, pitch, folder / word / f"{voice.replace('+', '_')}-{r}.wav")


def build_held_out_speech(root: Path, voices: list[str], settings: list[tuple[int, int]]) -> Path:
    """`write_held_out_speech` into `root` once (reused while voices and settings stay the same); returns
    `root`."""
    root = Path(root)
    params = {"voices": voices, "settings": [list(s) for s in settings]}
    if not _done(root, params):
        _require_espeak()
        shutil.rmtree(root, ignore_errors=True)
        write_held_out_speech(root, voices, settings)
        _mark_done(root, params)
    return root


def build_spoken_words(root: Path, repeats: int, seed: int = 0, voices: list[str] | None = None) -> Path:
    """Train clips (`voices`, default TRAIN_VOICES, at varied speed/pitch) with captions; returns the manifest
    `root/train.csv`. The held-out clips come from `build_held_out_speech`."""
    root = Path(root)
    params = {"repeats": repeats, "seed": seed, **({"voices": voices} if voices else {})}
    voices = voices or TRAIN_VOICES
    if not _done(root, params):
        _require_espeak()
        shutil.rmtree(root, ignore_errors=True)
        rng = random.Random(seed)
        (root / "train").mkdir(parents=True)
        rows = []
        for word in WORDS:
            for voice in voices:
                for r in range(repeats):
                    name = f"{word}-{voice.replace('+', '_')}-{r}.wav"
                    _speak(word, voice, rng.randint(120, 200), rng.randint(30, 70), root / "train" / name)
                    rows.append(
                        {
                            "path": f"train/{name}",
                            "caption": rng.choice(AUDIO_CAPTIONS).format(word),
                            "label": word,
                        }
                    )
        rng.shuffle(rows)
        with open(root / "train.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "caption", "label"])
            writer.writeheader()
            writer.writerows(rows)
        _mark_done(root, params)
    return root / "train.csv"
