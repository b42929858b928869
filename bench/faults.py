"""Fault-injection suite (issue 7): bad inputs, kill -9, damaged files and hostile configs, nothing lost.

Run from the repository root with the project venv:

    .venv/bin/python bench/faults.py                                   # 10 sharding + 5 training kill trials
    .venv/bin/python bench/faults.py --sharding-trials 3 --training-trials 1 --only sharding

Every scenario runs the real `mmcl` commands in subprocesses, as a user would, on inputs generated under
--work-dir (default bench/out/faults/, git-ignored; rebuilt each run):

  sharding  a corpus of bad inputs in three layouts (CSV manifest, COCO, audio folder): each bad item must be
            skipped with the expected reason in manifest.json's errors_by_reason and _errors.jsonl, and every
            good item must be in the shards (the `source` of every sample's .json is compared, as a multiset,
            with the good inputs). Then kill -9 at random points of a sharding run, re-run the same command:
            manifest.json, sizes.json, _errors.jsonl and every tar must equal an uninterrupted run's, byte for byte.
  training  a truncated and a corrupted shard in the stream (training completes, warnings, bad_samples counted,
            every readable good sample of the epoch trained on); kill -9 at random steps (and once while a
            checkpoint is being written) then resume: final model.safetensors equal to an uninterrupted run's
            (torch.equal, every tensor) and metrics.jsonl with each step once; SIGTERM: exit 0, saved, resumes
            identically; a damaged newest checkpoint (no COMPLETE, truncated weights, a pickle bomb as
            optimizer.pt, garbage state.json): the previous one is used and the result is still identical.
  loading   a pickle bomb is never executed (auto resume, train.resume, model.pretrained); pipe: shard URLs are
            refused unless data.allow_pipe, also when a shard *file name* starts with pipe: (folder listing).
  config    a matrix of invalid configs: exit code 2, one message per problem naming the key, no traceback.

Results: a table on stdout and WORK_DIR/results.json (every trial with where its kill landed). The exit status is
1 when any check failed. Training runs use OMP_NUM_THREADS=1 (CPU, deterministic, and fair to a shared machine).

The corpus builders and checkers here are also used by tests/test_faults.py (the cheap, deterministic parts).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from conftest import COLOURS, kill9, make_image, make_tone  # noqa: E402  (the test suite's helpers)

SHARD_OUTPUTS = ("manifest.json", "sizes.json", "_errors.jsonl")
IMAGE_EXTENSIONS = ("jpg", "png", "webp")
PWNED = "PWNED"  # a file that only a shell command injected through a URL or a pickle would create


# ================================================================================================ corpora


@dataclass
class Corpus:
    """One sharding input with its known answer: which items must be written, which skipped and why."""

    name: str
    modality: str
    input: Path
    good: Counter = field(default_factory=Counter)  # source -> how many samples must carry it
    bad: Counter = field(default_factory=Counter)  # (source, reason) -> how many times it must be skipped
    extra_args: tuple[str, ...] = ()

    @property
    def inputs(self) -> int:
        return sum(self.good.values()) + sum(self.bad.values())

    @property
    def faults(self) -> int:
        return sum(self.bad.values())

    def shard_args(self, output: Path, workers: int = 1) -> list[str]:
        return [
            "shard", f"{self.modality}-text", "--input", str(self.input), "--output", str(output),
            "--quiet", "--workers", str(workers), "--shard-size", "7", *self.extra_args,
        ]  # fmt: skip

    def shard_fields(self, output: Path) -> dict:
        """The same run as `shard_args` for shards_tools.config.build_config (in-process, tests)."""
        return {
            "input": {"modality": self.modality, "path": self.input},
            "output": output,
            "shard_size": 7,
            "workers": 1,
            "fetch": {"retries": 0, "timeout": 2},
        }


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


def _image_bytes(colour: str, fmt: str, size=(48, 40), seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(
        np.array(COLOURS.index(colour) * 30) + rng.integers(0, 60, (size[1], size[0], 3)), 0, 255
    )
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, fmt, **save)
    return out.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def build_image_corpus(root: Path, unanswered_url: str = "http://127.0.0.1:9/x.jpg") -> Corpus:
    """A CSV manifest mixing unusual-but-valid images with every kind of bad row the sharder must survive.
    `unanswered_url`: an http URL whose port nobody answers on (tests pass a port they hold, bound but not
    listening, so that no other process can be answering there)."""
    root = Path(os.path.abspath(root))
    img = root / "img"
    manifest = root / "pairs.csv"
    corpus = Corpus("image CSV manifest", "image", manifest, extra_args=("--retries", "0", "--timeout", "2"))
    outside = make_image(root.parent / f"{root.name}-outside.jpg", "red")  # exists, but outside the root

    # valid, if unusual: all must be written
    make_image(img / "plain.jpg", "red")
    make_image(img / "plain.png", "blue")
    _write(img / "png_named.jpg", _image_bytes("green", "PNG"))  # a PNG named .jpg still works
    Image.fromarray(np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30).save(img / "grey16.png")
    rgba = Image.new("RGBA", (30, 20), (200, 10, 10, 0))
    rgba.paste((10, 200, 10, 255), (5, 5, 25, 15))
    rgba.save(img / "alpha.png")
    Image.open(make_image(img / "pal_src.png", "yellow")).convert("P").save(img / "palette.gif")
    _write(img / "photo.webp", _image_bytes("purple", "WEBP", seed=2))
    Image.new("RGB", (1, 1), (1, 2, 3)).save(img / "one_pixel.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    _write(img / "rotated.jpg", _image_bytes("orange", "JPEG", size=(60, 30), exif=exif.tobytes()))
    Image.new("CMYK", (32, 24), (0, 100, 200, 10)).save(img / "cmyk.jpg")
    make_image(img / "name with spaces #1 ü.png", "white")
    good_rows = [
        ("img/plain.jpg", "a red square"),
        ("img/plain.png", "a blue square"),
        ("img/png_named.jpg", "a green square stored as PNG under a .jpg name"),
        ("img/grey16.png", "a 16-bit grey gradient"),
        ("img/alpha.png", "a green bar on a transparent background"),
        ("img/palette.gif", "a yellow square in a palette GIF"),
        ("img/photo.webp", "a purple WebP"),
        ("img/one_pixel.png", "one pixel"),
        ("img/rotated.jpg", "an EXIF-rotated orange picture"),
        ("img/cmyk.jpg", "a CMYK JPEG"),
        ("img/name with spaces #1 ü.png", "a file name with spaces, # and ü"),
        (str(img / "plain.png"), "an absolute path inside the root is fine"),
        ("img/sub/../plain.jpg", "a path with .. that stays inside the root"),
        ("img/plain.jpg", "the same file again: a manifest row is not an id, so both rows are kept"),
        ("img/plain.png", "unicode caption: 猫 🐈 — «ça va»"),
    ]

    # bad: (path cell, caption, expected reason)
    big = make_image(img / "big_src.jpg", "green", size=(200, 200)).read_bytes()
    _write(img / "truncated.jpg", big[: len(big) // 2])
    png = _image_bytes("blue", "PNG", size=(120, 90))
    _write(img / "truncated.png", png[: len(png) // 2])
    _write(img / "zero.jpg", b"")
    _write(img / "zero.png", b"")
    _write(img / "text.jpg", b"this is a text file, not an image\n" * 20)
    _write(img / "html.png", b"<html><body>404 Not Found</body></html>")
    _write(img / "bomb.png", png_header_only(100_000, 100_000))  # beyond Pillow's hard limit
    _write(img / "bomb_warn.png", png_header_only(10_000, 10_000))  # between Pillow's warning and error
    _write(img / "postscript.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(x) print\n")
    (img / "folder.jpg").mkdir()
    not_utf8 = b"caf\xe9 au lait \xff".decode("utf-8", "surrogateescape")
    bad_rows = [
        ("img/truncated.jpg", "a truncated JPEG", "decode_error"),
        ("img/truncated.png", "a truncated PNG", "decode_error"),
        ("img/zero.jpg", "a zero-byte .jpg", "empty_file"),
        ("img/zero.png", "a zero-byte .png", "empty_file"),
        ("img/text.jpg", "a text file named .jpg", "decode_error"),
        ("img/html.png", "an HTML error page named .png", "decode_error"),
        ("img/bomb.png", "a PNG header claiming 100000x100000", "decompression_bomb"),
        ("img/bomb_warn.png", "a PNG header claiming 10000x10000", "decompression_bomb"),
        ("img/postscript.jpg", "EPS (Pillow would run Ghostscript) named .jpg", "decode_error"),
        ("img/folder.jpg", "a folder named like an image", "missing_file"),
        ("img/missing.jpg", "a file that is not there", "missing_file"),
        ("img/plain.jpg", not_utf8, "caption_not_utf8"),
        ("img/plain.jpg", "", "empty_caption"),
        ("img/plain.jpg", "   \t ", "empty_caption"),
        (f"../{outside.name}", "escapes the root with ..", "path_escapes_root"),
        ("img/../../" + outside.name, "escapes the root after a detour", "path_escapes_root"),
        (str(outside), "an absolute path outside the root", "path_escapes_root"),
        (f"file://{img / 'plain.jpg'}", "a file:// URL", "unsupported_url"),
        ("ftp://example.invalid/x.jpg", "an ftp:// URL", "unsupported_url"),
        (f"pipe:touch {root / PWNED}", "a pipe: URL that would run a command", "unsupported_url"),
        ("s3://bucket/x.jpg", "an s3:// URL", "unsupported_url"),
        (unanswered_url, "an http URL nobody answers", "fetch_error"),
        ("", "an empty path cell", "missing_file"),
    ]
    lines = [("filepath", "caption")]
    for cell, caption in good_rows:
        lines.append((cell, caption))
        corpus.good[os.path.normpath(os.path.join(root, cell))] += 1
    for cell, caption, reason in bad_rows:
        line = len(lines) + 1  # 1-based, header included; no multi-line row before this one
        lines.append((cell, caption))
        if not cell:
            source = f"{manifest}:{line}"
        elif "://" in cell or cell.startswith("pipe:"):
            source = cell
        else:
            source = os.path.normpath(os.path.join(root, cell))
        corpus.bad[(source, reason)] += 1
    lines.append(("img/plain.png", "a caption\nover two lines, quoted"))  # last: shifts later line numbers
    corpus.good[str(img / "plain.png")] += 1
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(lines)
    manifest.write_bytes(text.getvalue().encode("utf-8", "surrogateescape"))
    return corpus


def build_coco_corpus(root: Path) -> Corpus:
    """COCO captions with a repeated image id, an escaping file_name, uncaptioned and broken images."""
    root = Path(os.path.abspath(root))
    images_dir = root / "val2017"
    annotations = root / "annotations" / "captions_val2017.json"
    corpus = Corpus("COCO (duplicate ids)", "image", annotations)
    make_image(images_dir / "a.jpg", "red")
    make_image(images_dir / "b.png", "blue")
    make_image(images_dir / "c.jpg", "green")
    make_image(images_dir / "d.jpg", "white")
    make_image(images_dir / "e.jpg", "black")
    make_image(root / "outside.jpg", "yellow")
    full = make_image(images_dir / "src.jpg", "purple", size=(200, 200)).read_bytes()
    _write(images_dir / "trunc.jpg", full[: len(full) // 3])
    images = [
        (1, "a.jpg", ["a red square", "red"], None),
        (2, "b.png", ["a blue square"], None),
        (1, "c.jpg", ["the same id again"], "duplicate_id"),
        (3, "../outside.jpg", ["outside the image folder"], "path_escapes_root"),
        (4, "d.jpg", [], "empty_caption"),
        (5, "missing.jpg", ["not there"], "missing_file"),
        (6, "trunc.jpg", ["a truncated JPEG"], "decode_error"),
        (7, "e.jpg", ["  "], "empty_caption"),
        (8, "c.jpg", ["a new id for c.jpg is a new item"], None),
    ]
    data = {"images": [], "annotations": []}
    for image_id, name, _captions, reason in images:
        data["images"].append({"id": image_id, "file_name": name, "width": 48, "height": 40})
        source = os.path.normpath(os.path.join(images_dir, name))
        if reason is None:
            corpus.good[source] += 1
        else:
            corpus.bad[(source, reason)] += 1
    for image_id, _, captions, reason in images:
        if reason == "duplicate_id":  # captions of a repeated id belong to the first image with that id
            continue
        for caption in captions:
            data["annotations"].append(
                {"id": len(data["annotations"]), "image_id": image_id, "caption": caption}
            )
    _write(annotations, json.dumps(data).encode("utf-8"))
    return corpus


def _audio_bytes(fmt: str, subtype: str | None = None, seconds: float = 0.6, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    soundfile.write(out, 0.3 * np.sin(2 * np.pi * 440 * t), rate, format=fmt, subtype=subtype)
    return out.getvalue()


def build_audio_corpus(root: Path) -> Corpus:
    """A folder of clips with .txt/.json captions: valid formats, and truncated or corrupt FLAC/Ogg/WAV."""
    root = Path(os.path.abspath(root))
    corpus = Corpus("audio folder", "audio", root)
    rng = np.random.default_rng(7)

    def garble(data: bytes, start: int) -> bytes:
        data = bytearray(data)
        data[start : start + 400] = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
        return bytes(data)

    flac, ogg, wav = _audio_bytes("FLAC"), _audio_bytes("OGG", "VORBIS"), _audio_bytes("WAV")
    nan_wav = io.BytesIO()
    soundfile.write(nan_wav, np.full(800, np.nan, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    files = {
        "mono.wav": (make_tone(root / "mono.wav", 330).read_bytes(), "a 330 hertz tone", None),
        "stereo.flac": (make_tone(root / "stereo.flac", 550, channels=2).read_bytes(), "a stereo tone", None),
        "vorbis.ogg": (ogg, "an ogg vorbis tone", None),
        "deep.wav": (_audio_bytes("WAV", "PCM_24"), "a 24-bit tone", None),
        "flac_named.wav": (flac, "FLAC content under a .wav name", None),
        "sidecar.flac": (flac, None, None),  # captioned by a .json sidecar
        "truncated.flac": (flac[: len(flac) // 2], "cut in half", "decode_error"),
        "garbled.flac": (garble(flac, len(flac) // 2), "garbage in the frames", "decode_error"),
        "truncated.ogg": (ogg[: len(ogg) // 2], "cut in half", "decode_error"),
        "garbled.ogg": (garble(ogg, len(ogg) // 2), "garbage in the pages", "decode_error"),
        "truncated.wav": (wav[: len(wav) // 2], "cut in half", "decode_error"),
        "nan.wav": (nan_wav.getvalue(), "float samples that are NaN", "decode_error"),
        "zero.flac": (b"", "zero bytes", "empty_file"),
        "text.flac": (b"not audio at all\n" * 30, "a text file named .flac", "decode_error"),
        "latin1.wav": (wav, b"caf\xe9 \xff", "caption_not_utf8"),
        "blank.wav": (wav, b"  \n\n", "empty_caption"),
        "uncaptioned.wav": (wav, None, "empty_caption"),
        "badjson.wav": (wav, None, "empty_caption"),
    }
    for name, (data, caption, reason) in files.items():
        path = _write(root / name, data)
        stem = root / Path(name).stem
        if isinstance(caption, str):
            stem.with_suffix(".txt").write_text(caption + "\n", "utf-8")
        elif isinstance(caption, bytes):
            stem.with_suffix(".txt").write_bytes(caption)
        if reason is None:
            corpus.good[str(path)] += 1
        else:
            corpus.bad[(str(path), reason)] += 1
    (root / "sidecar.json").write_text(json.dumps({"caption": "captioned by JSON", "license": "CC0"}))
    (root / "badjson.json").write_text("{not json")
    return corpus


def build_kill_corpus(root: Path, count: int) -> Path:
    """`count` real 256x192 PNGs (a few seconds of work for 2 workers) and a few bad rows, as a CSV manifest."""
    root = Path(os.path.abspath(root))
    rows = []
    for i in range(count):
        make_image(root / f"{i:04d}.png", COLOURS[i % len(COLOURS)], size=(256, 192), seed=i)
        rows.append(f"{i:04d}.png,picture {i} of a {COLOURS[i % len(COLOURS)]} field\n")
        if i % 50 == 25:  # bad rows in some shards, so the recorded errors must resume too
            rows.append(f"missing-{i}.png,a missing file\n")
            rows.append(f"{i:04d}.png,\n")
    manifest = root / "pairs.csv"
    manifest.write_text("path,caption\n" + "".join(rows))
    return manifest


# ================================================================================================ checks


def shard_sources(output: Path) -> Counter:
    """The `source` of every sample in the output's shards, as a multiset."""
    found: Counter = Counter()
    for tar in sorted(Path(output).glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    found[json.loads(archive.extractfile(member).read())["source"]] += 1
    return found


def check_corpus_output(output: Path, corpus: Corpus) -> dict:
    """Compare a sharding output with the corpus' answer; `problems` is empty when everything matches."""
    output = Path(output)
    manifest = json.loads((output / "manifest.json").read_text("utf-8"))
    errors = [json.loads(line) for line in (output / "_errors.jsonl").read_text("utf-8").splitlines()]
    skipped = Counter((e["source"], e["reason"]) for e in errors)
    found = shard_sources(output)
    problems = []
    expected_reasons = dict(sorted(Counter(r for (_, r), n in corpus.bad.items() for _ in range(n)).items()))
    if manifest["errors_by_reason"] != expected_reasons:
        problems.append(f"errors_by_reason {manifest['errors_by_reason']} != expected {expected_reasons}")
    if skipped != corpus.bad:
        problems.append(
            f"_errors.jsonl: unexpected {dict(skipped - corpus.bad)}, missing {dict(corpus.bad - skipped)}"
        )
    if not all(e.get("detail") for e in errors):
        problems.append("an _errors.jsonl entry has no detail")
    lost, extra = corpus.good - found, found - corpus.good
    if lost or extra:
        problems.append(f"samples lost {dict(lost)}, unexpected samples {dict(extra)}")
    if manifest["totals"]["samples"] != sum(corpus.good.values()):
        problems.append(
            f"manifest totals.samples {manifest['totals']['samples']} != {sum(corpus.good.values())}"
        )
    return {
        "inputs": corpus.inputs,
        "faults": corpus.faults,
        "written": sum(found.values()),
        "lost": sum(lost.values()),
        "errors_by_reason": manifest["errors_by_reason"],
        "problems": problems,
    }


def output_digest(output: Path) -> dict[str, str]:
    """sha256 of every file a user sees in a sharding output (shards, manifest, sizes, errors)."""
    files = [p for p in Path(output).glob("*.tar")] + [Path(output) / n for n in SHARD_OUTPUTS]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


def manifest_hashes_hold(output: Path) -> bool:
    """Every shard's sha256 and size in manifest.json match the file on disk."""
    manifest = json.loads((Path(output) / "manifest.json").read_text("utf-8"))
    return all(
        hashlib.sha256((Path(output) / s["name"]).read_bytes()).hexdigest() == s["sha256"]
        and (Path(output) / s["name"]).stat().st_size == s["bytes"]
        for s in manifest["shards"]
    )


def leftover_temporaries(output: Path) -> list[str]:
    return sorted(str(p.relative_to(output)) for p in Path(output).rglob(".*tmp*"))


def make_pickle_bomb(path: Path, marker: Path) -> Path:
    """A torch file whose unpickling under weights_only=False runs code (creates `marker`)."""
    import torch

    class Bomb:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state": {0: {"exp_avg": Bomb()}}, "param_groups": []}, path)
    return path


def weights_equal(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two safetensors files hold the same tensors, compared with torch.equal."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return False, f"keys differ: {sorted(set(x) ^ set(y))[:5]}"
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    return not differ, f"{len(differ)} of {len(x)} tensors differ" + (
        f" (first: {differ[0]})" if differ else ""
    )


def metrics_rows(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()] if path.exists() else []


# ================================================================================================ processes


def mmcl(
    *args: str, cwd: Path = REPO, timeout: float = 900, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmcl", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def start_mmcl(
    *args: str, cwd: Path = REPO, env: dict | None = None, log: Path | None = None
) -> subprocess.Popen:
    """Start `mmcl ARGS` in its own process group (so the whole tree can be killed), output to `log`."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [sys.executable, "-m", "mmcl", *map(str, args)],
        cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip


def wait_for(
    predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float, poll: float = 0.005
) -> bool:
    """Poll until `predicate()` or the process exits; True if the predicate held while it still ran."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return proc.poll() is None
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


# ================================================================================================ results


@dataclass
class Row:
    """One line of the results table."""

    area: str
    scenario: str
    inputs: int = 0  # inputs tried: items, samples or configs
    faults: int = 0  # faults injected
    runs: int = 0  # runs (trials) attempted
    survived: int = 0  # runs that ended as specified
    lost: int | None = 0  # samples lost (None: not applicable)
    problems: list[str] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.survived == self.runs and not self.lost


def print_table(rows: list[Row]) -> str:
    header = "| area | scenario | inputs tried | faults injected | runs survived | samples lost | result |"
    lines = [header, "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lost = "n/a" if r.lost is None else str(r.lost)
        lines.append(
            f"| {r.area} | {r.scenario} | {r.inputs} | {r.faults} | {r.survived}/{r.runs} | {lost} | "
            f"{'OK' if r.ok else 'FAIL'} |"
        )
    total_faults = sum(r.faults for r in rows)
    lines.append(
        f"| **all** | | {sum(r.inputs for r in rows)} | {total_faults} | "
        f"{sum(r.survived for r in rows)}/{sum(r.runs for r in rows)} | "
        f"{sum(r.lost or 0 for r in rows)} | {'OK' if all(r.ok for r in rows) else 'FAIL'} |"
    )
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ================================================================================================ sharding


def bench_bad_inputs(work: Path) -> list[Row]:
    rows = []
    builders = (build_image_corpus, build_coco_corpus, build_audio_corpus)
    for name, builder in zip(("image_csv", "coco", "audio"), builders, strict=True):
        corpus = builder(work / "inputs" / name)
        row = Row("sharding", f"bad inputs: {corpus.name}", runs=1)
        for workers in (2,):
            out = work / "shards" / f"{name}-w{workers}"
            result = mmcl(*corpus.shard_args(out, workers))
            crashed = result.returncode != 0 or "Traceback" in result.stderr
            if crashed:
                row.problems.append(f"exit {result.returncode}: {result.stderr[-800:]}")
                continue
            check = check_corpus_output(out, corpus)
            verify = mmcl("shard", "verify", out)
            if verify.returncode != 0:
                check["problems"].append(f"mmcl shard verify: {verify.stdout[-400:]}")
            if (corpus.input.parent / PWNED).exists():
                check["problems"].append("the pipe: row ran its command")
            row.inputs, row.faults, row.lost = check["inputs"], check["faults"], check["lost"]
            row.problems += check["problems"]
            row.survived += not check["problems"]
            row.details.append({"workers": workers, **check})
        log(f"{row.scenario}: {row.survived}/{row.runs} {'OK' if row.ok else row.problems}")
        rows.append(row)
    return rows


def bench_sharding_kills(work: Path, trials: int, rng: random.Random, images: int) -> Row:
    manifest = build_kill_corpus(work / "inputs" / "kill", images)
    args = ["--shard-size", "10", "--workers", "2", "--image-size", "128"]

    def command(out: Path) -> list[str]:
        return ["shard", "image-text", "--input", str(manifest), "--output", str(out), "--quiet", *args]

    reference = work / "shards" / "kill-reference"
    started = time.time()
    proc = start_mmcl(*command(reference), log=work / "logs" / "kill-reference.log")
    wait_for(lambda: (reference / "_progress" / "options.json").exists(), proc, 600)
    ready = time.time()
    # the timeline of the uninterrupted run: when the last shard record and the manifest appeared
    wait_for(lambda: (reference / "manifest.json").exists(), proc, 600)
    work_s = time.time() - ready  # reading, planning, writing every shard, merging
    proc.wait()
    ready -= started
    if proc.returncode != 0:
        return Row("sharding", "kill -9 at random points, re-run", problems=["the reference run failed"])
    expected = output_digest(reference)
    items = sum(1 for _ in manifest.open()) - 1
    samples = json.loads((reference / "manifest.json").read_text())["totals"]["samples"]
    log(f"sharding reference: {items} items, {samples} samples, {len(expected) - 3} shards, "
        f"start-up {ready:.1f} s, work {work_s:.1f} s")  # fmt: skip
    row = Row("sharding", f"kill -9 at random points, re-run ({items} items, 2 workers)", inputs=items)
    for trial in range(trials):
        out = work / "shards" / f"kill-{trial}"
        kills = 2 if trial % 4 == 3 else 1
        landed = []
        for k in range(kills):
            for _attempt in range(5):
                whole_group = (trial + k) % 2 == 1
                delay = rng.uniform(0, work_s * 1.02)
                proc = start_mmcl(*command(out), log=work / "logs" / f"kill-{trial}-{k}.log")
                running = wait_for(lambda o=out: (o / "_progress" / "options.json").exists(), proc, 600)
                time.sleep(delay)
                if not running or proc.poll() is not None:
                    proc.wait()  # finished before the kill: try again with another delay
                    shutil.rmtree(out, ignore_errors=True)
                    continue
                done = len(list((out / "_progress").glob("*.tar.json")))
                orphans = kill9(proc, whole_group, grace=2.0)
                landed.append({
                    "delay_after_start_s": round(delay, 3),
                    "shards_recorded_at_kill": done,
                    "temporaries_at_kill": len(leftover_temporaries(out)),
                    "manifest_written": (out / "manifest.json").exists(),
                    "killed": "process group" if whole_group else "main process only",
                    "orphans_left_running": len(orphans),
                })  # fmt: skip
                row.faults += 1
                break
        rerun = mmcl(*command(out))
        digest = output_digest(out) if rerun.returncode == 0 else {}
        trial_problems = []
        if rerun.returncode != 0:
            trial_problems.append(f"re-run exit {rerun.returncode}: {rerun.stderr[-400:]}")
        elif digest != expected:
            differ = sorted(n for n in set(digest) | set(expected) if digest.get(n) != expected.get(n))
            trial_problems.append(f"output differs from the uninterrupted run: {differ[:5]}")
        elif not manifest_hashes_hold(out):
            trial_problems.append("a shard's sha256 differs from manifest.json")
        if leftover_temporaries(out):
            trial_problems.append(f"temporaries left: {leftover_temporaries(out)[:3]}")
        if any(k["orphans_left_running"] for k in landed):
            trial_problems.append("pool workers outlived the killed process")
        row.runs += 1
        row.survived += not trial_problems
        row.problems += [f"trial {trial}: {p}" for p in trial_problems]
        row.details.append({"trial": trial, "kills": landed, "identical": not trial_problems})
        log(f"sharding kill trial {trial}: kills {[(k['delay_after_start_s'], k['shards_recorded_at_kill']) for k in landed]}"
            f" -> {'identical' if not trial_problems else trial_problems}")  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)
    return row


# ================================================================================================ training


TRAIN_STEPS = 24
CHECKPOINT_EVERY = 4


def build_train_shards(root: Path, count: int = 96, shard_size: int = 12) -> Path:
    """`count` 40x40 images with colour captions, sharded in-process into count/shard_size shards."""
    from shards_tools.config import build_config
    from shards_tools.run import run_sharding

    rows = []
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        make_image(root / "in" / f"{i:03d}.png", colour, size=(40, 40), seed=i)
        rows.append(f"{i:03d}.png,a photo of a {colour} square\n")
    (root / "in" / "m.csv").write_text("path,caption\n" + "".join(rows))
    out = root / "shards"
    config = {"input": {"modality": "image", "path": root / "in" / "m.csv"}, "output": out, "shard_size": shard_size,
              "workers": 1}  # fmt: skip
    run_sharding(build_config(config), progress=False)
    return out


def train_config(path: Path, shards: Path | str, output: Path, **sections) -> Path:
    """A micro image-text recipe: CPU, 2 loader workers, a checkpoint every CHECKPOINT_EVERY steps, every
    step logged; TRAIN_STEPS steps are 2 epochs of the 96-sample shards."""
    import yaml

    config = {
        "run": {"output_dir": str(output), "seed": 0},
        "model": {"modality": "image", "open_clip_name": "mmcl-micro-vit"},
        "data": {"sources": [{"urls": str(shards)}], "batch_size": 8, "workers": 2, "shuffle_buffer": 50},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": TRAIN_STEPS, "log_every": 1, "checkpoint_every": CHECKPOINT_EVERY, "keep_last": 3},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(run: Path, steps: int = TRAIN_STEPS) -> Path:
    return Path(run) / "checkpoints" / f"step-{steps:08d}" / "model.safetensors"


def check_resumed_run(run: Path, reference: Path, steps: int = TRAIN_STEPS) -> list[str]:
    """The run's final weights equal the reference's, and metrics.jsonl has each step once, same losses."""
    problems = []
    if not final_weights(run, steps).exists():
        return [f"no final checkpoint step-{steps:08d}"]
    same, detail = weights_equal(final_weights(run, steps), final_weights(reference, steps))
    if not same:
        problems.append(f"final weights differ: {detail}")
    rows, ref_rows = metrics_rows(run), metrics_rows(reference)
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl steps {[r['step'] for r in rows]}")
    elif [r["loss"] for r in rows] != [r["loss"] for r in ref_rows]:
        problems.append("metrics.jsonl losses differ from the uninterrupted run")
    return problems


def train_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def last_step(run: Path) -> int:
    rows = metrics_rows(run) if (run / "metrics.jsonl").exists() else []
    try:
        return rows[-1]["step"] if rows else 0
    except (KeyError, IndexError):
        return 0


def _logged_step(run: Path) -> int:
    """The highest step metrics.jsonl shows (tolerates a line being written)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    step = 0
    for line in path.read_text("utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            step = max(step, int(json.loads(line)["step"]))
    return step


def _checkpoint_state(run: Path) -> dict:
    root = run / "checkpoints"
    if not root.exists():
        return {"complete": [], "partial": [], "temporary": []}
    return {
        "complete": sorted(p.name for p in root.glob("step-*") if (p / "COMPLETE").exists()),
        "partial": sorted(p.name for p in root.glob("step-*") if not (p / "COMPLETE").exists()),
        "temporary": sorted(p.name for p in root.glob(".step-*")),
    }


def bench_training(work: Path, trials: int, rng: random.Random) -> list[Row]:
    env = train_env()
    shards = build_train_shards(work / "train")
    runs = work / "runs"
    reference = runs / "reference"
    config = train_config(work / "configs" / "reference.yaml", shards, reference)
    started = time.time()
    result = mmcl("train", "--config", config, env=env)
    if result.returncode != 0:
        return [Row("training", "reference run", problems=[result.stderr[-1000:]])]
    log(f"training reference: {TRAIN_STEPS} steps in {time.time() - started:.0f} s")
    rows = [bench_bad_shards(work, shards, env)]

    # --- kill -9 at random steps, then resume --------------------------------------------------------------
    step_s = statistics.median(
        8 / r["samples_per_s"] for r in metrics_rows(reference)
    )  # one step's wall time
    row = Row("training", f"kill -9 at random steps, resume ({TRAIN_STEPS} steps, 2 loader workers)")
    for trial in range(trials):
        run = runs / f"kill-{trial}"
        cfg = train_config(work / "configs" / f"kill-{trial}.yaml", shards, run)
        kills = 2 if trial % 3 == 2 else 1
        landed = []
        for k in range(kills):
            during_save = trial == 0 and k == 0
            proc = start_mmcl(
                "train", "--config", cfg, env=env, log=work / "logs" / f"train-kill-{trial}-{k}.log"
            )
            if during_save:  # the moment a checkpoint folder is being written
                target = "while a checkpoint is written"
                hit = wait_for(lambda r=run: any((r / "checkpoints").glob(".step-*")), proc, 600, poll=0.001)
                delay = 0.0
            elif _logged_step(run) + 1 <= TRAIN_STEPS - 1:
                step = rng.randint(_logged_step(run) + 1, TRAIN_STEPS - 1)
                target = f"after step {step}"
                hit = wait_for(lambda r=run, s=step: _logged_step(r) >= s, proc, 600)
                delay = rng.uniform(0, step_s)  # lands within the next step or its checkpoint
                time.sleep(delay)
            else:
                target, hit, delay = "during start-up", True, rng.uniform(0, 3.0)
                time.sleep(delay)
            if not hit or proc.poll() is not None:
                proc.wait()
                landed.append({"target": target, "missed": True})
                continue
            state = _checkpoint_state(run)
            orphans = kill9(
                proc, whole_group=(trial + k) % 2 == 0, grace=10.0
            )  # loader workers poll every 5 s
            landed.append({
                "target": target, "extra_delay_s": round(delay, 3), "logged_step_at_kill": _logged_step(run),
                **state, "orphans_left_running": len(orphans),
            })  # fmt: skip
            row.faults += 1
        resumed = mmcl("train", "--config", cfg, env=env)
        problems = (
            [] if resumed.returncode == 0 else [f"resume exit {resumed.returncode}: {resumed.stderr[-600:]}"]
        )
        if not problems:
            problems = check_resumed_run(run, reference)
            if _checkpoint_state(run)["temporary"]:
                problems.append(f"temporary checkpoint folders left: {_checkpoint_state(run)['temporary']}")
        if any(k.get("orphans_left_running") for k in landed):
            problems.append("loader workers outlived the killed process")
        resumed_from = next(
            (line for line in resumed.stdout.splitlines() if "resumed from" in line), "fresh start"
        )
        row.runs += 1
        row.survived += not problems
        row.problems += [f"trial {trial}: {p}" for p in problems]
        row.details.append(
            {"trial": trial, "kills": landed, "resume": resumed_from, "identical": not problems}
        )
        log(f"training kill trial {trial}: {[(k['target'], k.get('logged_step_at_kill')) for k in landed]}; "
            f"{resumed_from.strip()} -> {'identical' if not problems else problems}")  # fmt: skip
    row.inputs = TRAIN_STEPS * 8 * row.runs
    rows.append(row)

    rows.append(bench_sigterm(work, shards, reference, env, rng))
    rows.append(bench_damaged_checkpoints(work, shards, reference, env))
    return rows


def bench_sigterm(work: Path, shards: Path, reference: Path, env: dict, rng: random.Random) -> Row:
    row = Row("training", "SIGTERM mid-run: saved, exit 0, resume", runs=1)
    run = work / "runs" / "sigterm"
    cfg = train_config(work / "configs" / "sigterm.yaml", shards, run)
    proc = start_mmcl("train", "--config", cfg, env=env, log=work / "logs" / "sigterm.log")
    step = rng.randint(1, TRAIN_STEPS - 2)
    if not wait_for(lambda: _logged_step(run) >= step, proc, 600):
        proc.wait()
        row.problems.append("the run ended before SIGTERM")
        return row
    os.kill(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=300)
    text = (work / "logs" / "sigterm.log").read_text()
    saved = _checkpoint_state(run)["complete"]
    row.faults = 1
    if code != 0 or "stop requested" not in text:
        row.problems.append(
            f"exit {code}, 'stop requested' {'in' if 'stop requested' in text else 'not in'} the log"
        )
    resumed = mmcl("train", "--config", cfg, env=env)
    if resumed.returncode != 0:
        row.problems.append(f"resume exit {resumed.returncode}")
    else:
        row.problems += check_resumed_run(run, reference)
    row.survived = int(not row.problems)
    row.inputs = TRAIN_STEPS * 8
    row.details.append({"sigterm_after_step": step, "saved": saved[-1:] if saved else None})
    log(f"SIGTERM after step {step}: exit {code}, saved {saved[-1:]} -> {'OK' if row.ok else row.problems}")
    return row


def _damage(checkpoint: Path, how: str, marker: Path) -> None:
    if how == "no COMPLETE marker":
        (checkpoint / "COMPLETE").unlink()
    elif how == "model.safetensors truncated (COMPLETE kept)":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "optimizer.pt is a pickle bomb":
        make_pickle_bomb(checkpoint / "optimizer.pt", marker)
    elif how == "state.json is garbage":
        (checkpoint / "state.json").write_bytes(b"\x00{garbage")
    else:
        raise ValueError(how)


DAMAGES = (
    "no COMPLETE marker",
    "model.safetensors truncated (COMPLETE kept)",
    "optimizer.pt is a pickle bomb",
    "state.json is garbage",
)


def bench_damaged_checkpoints(work: Path, shards: Path, reference: Path, env: dict) -> Row:
    """The reference run without its final checkpoint and its newest one damaged: resume uses the one before."""
    row = Row("training", "damaged newest checkpoint: previous one used")
    newest, previous = (
        f"step-{TRAIN_STEPS - CHECKPOINT_EVERY:08d}",
        f"step-{TRAIN_STEPS - 2 * CHECKPOINT_EVERY:08d}",
    )
    for index, how in enumerate(DAMAGES):
        run = work / "runs" / f"damaged-{index}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(reference, run)
        shutil.rmtree(run / "checkpoints" / f"step-{TRAIN_STEPS:08d}")
        marker = run / PWNED
        _damage(run / "checkpoints" / newest, how, marker)
        cfg = train_config(work / "configs" / f"damaged-{index}.yaml", shards, run)
        result = mmcl("train", "--config", cfg, env=env)
        problems = [] if result.returncode == 0 else [f"exit {result.returncode}: {result.stderr[-500:]}"]
        output = result.stdout + result.stderr
        if f"resumed from {run / 'checkpoints' / previous}" not in output:
            problems.append(f"did not resume from {previous}")
        if how != "no COMPLETE marker" and f"{newest} is damaged" not in output:
            problems.append("no warning naming the damaged checkpoint")
        if marker.exists():
            problems.append("the pickle bomb ran")
        if not problems:
            problems = check_resumed_run(run, reference)
        row.runs += 1
        row.faults += 1
        row.survived += not problems
        row.problems += [f"{how}: {p}" for p in problems]
        warning = next((line for line in output.splitlines() if "damaged" in line), "")
        row.details.append({"damage": how, "warning": warning[:300], "ok": not problems})
        log(f"damaged checkpoint ({how}) -> {'OK' if not problems else problems}")
    row.inputs = row.runs * TRAIN_STEPS * 8
    return row


def damage_shards(source: Path, target: Path) -> dict:
    """Copy shards, cut one in the middle of a member (as an interrupted copy or download leaves it) and
    corrupt 4 samples of another (2 undecodable images, an invalid JSON with no .txt caption, a JSON list).

    Returns the injected bad count, the keys a reader can still use (image and JSON wholly before the cut,
    the corrupted ones excepted) and the shard names."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    names = sorted(p.name for p in target.glob("*.tar"))
    truncated, corrupted = target / names[1], target / names[2]
    with tarfile.open(truncated) as archive:
        images = [m for m in archive.getmembers() if m.name.split(".", 1)[1] in IMAGE_EXTENSIONS]
    cut = images[len(images) // 2]  # halfway through the image of the middle sample
    truncated.write_bytes(truncated.read_bytes()[: cut.offset_data + cut.size // 2])
    with tarfile.open(corrupted) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    bad = {keys[0]: "image", keys[1]: "image", keys[2]: "json+txt", keys[3]: "jsonlist"}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for member, payload in members:
            key, ext = member.name.split(".", 1)
            what = bad.get(key)
            if what == "image" and ext in IMAGE_EXTENSIONS:
                payload = payload[:16] + b"\0" * 64
            elif what == "json+txt" and ext in ("json", "txt"):
                payload = b"{broken" if ext == "json" else b""
            elif what == "jsonlist" and ext == "json":
                payload = b"[1, 2]"
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))
    corrupted.write_bytes(out.getvalue())
    return {"bad": len(bad), "bad_keys": set(bad), "good_keys": usable_keys(target) - set(bad), "truncated": truncated.name,
            "corrupted": corrupted.name}  # fmt: skip


def usable_keys(folder: Path) -> set[str]:
    """Keys of the samples whose image and .json (which holds the captions) lie wholly in the shard files."""
    usable: set[str] = set()
    for tar in sorted(Path(folder).glob("*.tar")):
        size, parts = tar.stat().st_size, {}
        with contextlib.suppress(tarfile.TarError, OSError), tarfile.open(tar) as archive:
            for member in archive:
                if member.offset_data + member.size <= size:
                    parts.setdefault(member.name.split(".")[0], set()).add(member.name.split(".", 1)[1])
        usable |= {key for key, exts in parts.items() if "json" in exts and exts & set(IMAGE_EXTENSIONS)}
    return usable


def truncation_reported(shard: Path, scratch: Path) -> dict[str, bool]:
    """Whether mmcl's tar stage (pipeline.keyed_samples) reports a copy of `shard` cut in the middle of a
    member's data, and one cut inside a 512-byte tar header block."""
    from mmcl.data.pipeline import keyed_samples

    with tarfile.open(shard) as archive:
        member = archive.getmembers()[len(archive.getmembers()) // 2]
    cuts = {
        "cut mid-member": member.offset_data + member.size // 2,
        "cut inside a header": member.offset + 100,
    }
    reported = {}
    for name, cut in cuts.items():
        copy = scratch / f"{name.replace(' ', '-')}.tar"
        copy.write_bytes(shard.read_bytes()[:cut])
        errors: list[Exception] = []
        list(keyed_samples([str(copy)], lambda err, errors=errors: errors.append(err) or True))
        reported[name] = bool(errors)
    return reported


def epoch_keys(cfg_path: Path) -> tuple[list[str], set[str], set[str]]:
    """One epoch of the training stream (in-process, 0 workers): the keys of the batches wholly in epoch 0,
    the keys of the batch that crosses into epoch 1 (it holds the epoch's last samples), and the keys of
    the samples the stream skipped as bad (each is logged as a warning too)."""
    import torch

    from mmcl.config import load_train_config
    from mmcl.data.common import BadSample, log_and_continue
    from mmcl.data.pipeline import build_train_stream

    bad: set[str] = set()

    def handler(err: Exception) -> bool:
        if isinstance(err, BadSample):
            bad.add(err.key)
        return log_and_continue(err)

    cfg = load_train_config(cfg_path, ["data.workers=0"])
    stream = build_train_stream(
        cfg.data,
        modality="image",
        media_transform=lambda image: torch.zeros(3, 4, 4),
        tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
        handler=handler,
    )
    keys: list[str] = []
    for batch in stream:
        if batch["epoch"] > 0:
            return keys, set(batch["keys"]), bad
        keys += batch["keys"]
    raise AssertionError("the stream ended")


def check_epoch(keys: list[str], boundary: set[str], bad: set[str], facts: dict) -> list[str]:
    """Every usable good sample is in epoch 0 exactly once (the boundary batch may hold the last ones), and
    the samples skipped as bad are exactly the injected ones."""
    problems = []
    if len(keys) != len(set(keys)):
        problems.append(f"{len(keys) - len(set(keys))} samples twice in one epoch")
    missing = facts["good_keys"] - set(keys) - boundary
    if missing:
        problems.append(f"{len(missing)} usable samples never trained on in epoch 0: {sorted(missing)[:5]}")
    if set(keys) - facts["good_keys"]:
        problems.append(
            f"samples that should have been skipped: {sorted(set(keys) - facts['good_keys'])[:5]}"
        )
    if bad != facts["bad_keys"]:
        problems.append(
            f"the stream skipped {sorted(bad)}, the injected bad samples are {sorted(facts['bad_keys'])}"
        )
    return problems


def check_bad_sample_metric(
    run: Path, facts: dict, stderr: str | None, steps: int = TRAIN_STEPS
) -> list[str]:
    """After training on damaged shards: metrics.jsonl's bad_samples never drops, reaches at least the
    injected count (it counts every skip, so a bad sample met again in a later epoch counts again) and ends
    equal to the sum over the loader workers' own counts saved in the last checkpoint; each injected bad
    sample and the truncated shard were named in a warning."""
    problems = []
    counts = [r["bad_samples"] for r in metrics_rows(run)]
    state = json.loads((Path(run) / "checkpoints" / f"step-{steps:08d}" / "state.json").read_text("utf-8"))
    readers = sum(
        w["skipped"] for rank in state["train_state"]["data"].values() for w in rank["workers"].values()
    )
    if counts != sorted(counts) or not counts or counts[-1] < facts["bad"] or counts[-1] != readers:
        problems.append(
            f"metrics bad_samples {counts}: should rise to the readers' total {readers} >= {facts['bad']}"
        )
    if stderr is not None:
        problems += check_warnings(stderr, facts)
    return problems


def check_warnings(text: str, facts: dict) -> list[str]:
    """Each injected bad sample and the truncated shard are named in a warning."""
    unnamed = [key for key in sorted(facts["bad_keys"]) if f"skipped: {key}:" not in text]
    return (
        [f"no warning for {unnamed or facts['truncated']}"]
        if unnamed or facts["truncated"] not in text
        else []
    )


def bench_bad_shards(work: Path, shards: Path, env: dict) -> Row:
    damaged = work / "train" / "damaged"
    facts = damage_shards(shards, damaged)
    row = Row("training", "truncated + corrupt shard in the stream", runs=2, faults=1 + facts["bad"])
    row.inputs = sum(json.loads((shards / "sizes.json").read_text()).values())
    cfg = train_config(work / "configs" / "damaged-shards.yaml", damaged, work / "runs" / "damaged-shards")
    keys, boundary, bad = epoch_keys(cfg)
    row.problems += check_epoch(keys, boundary, bad, facts)
    row.lost = len(facts["good_keys"] - set(keys) - boundary)
    row.survived += not row.problems
    result = mmcl("train", "--config", cfg, env=env)
    rows = metrics_rows(work / "runs" / "damaged-shards")
    counts = [r["bad_samples"] for r in rows]
    problems = []
    if result.returncode != 0:
        problems.append(f"training exit {result.returncode}: {result.stderr[-500:]}")
    elif len(rows) != TRAIN_STEPS:
        problems.append(f"{len(rows)} metrics rows")
    else:
        problems += check_bad_sample_metric(work / "runs" / "damaged-shards", facts, result.stderr)
    row.problems += problems
    row.survived += not problems
    reported = truncation_reported(shards / facts["truncated"], work / "train")
    row.details.append({"epoch_samples": len(keys), "usable_good": len(facts["good_keys"]),
                        "bad_samples_by_step": counts, "truncation_warned": reported,
                        **{k: facts[k] for k in ("truncated", "corrupted")}})  # fmt: skip
    log(f"damaged shards: {len(facts['good_keys'])} usable good samples, all in epoch 0: {not row.lost}, "
        f"bad_samples {counts} -> {'OK' if row.ok else row.problems}")  # fmt: skip
    return row


# ================================================================================================ loading, config


CONFIG_CASES: list[tuple[str, list[str] | None, str | None, str]] = [
    # (name, overrides, config text replacing the valid base (None: the base), text the message must hold)
    ("unknown key (typo)", ["optim.learning_rate=1"], None, "unknown key optim.learning_rate"),
    ("unknown section", ["optimiser.lr=1"], None, "unknown key optimiser"),
    ("wrong type", ["train.steps=many"], None, "train.steps"),
    ("list for an integer", ["data.batch_size=[8]"], None, "data.batch_size"),
    ("batch size 0", ["data.batch_size=0"], None, "data.batch_size"),
    ("negative workers", ["data.workers=-1"], None, "data.workers"),
    ("unknown choice", ["train.mixed_precision=fp8"], None, "train.mixed_precision"),
    ("no data section", None, "run: {seed: 0}\n", "data is required"),
    ("config file missing", None, "<missing>", "not found"),
    ("config is a list", None, "- run\n- data\n", "must hold a mapping"),
    ("YAML syntax error", None, "data: [unclosed\n", "not valid YAML"),
    ("override without =", ["optim.lr"], None, "not key=value"),
    ("override value not YAML", ["data.sources=[{urls: x"], None, "quote it"),
    ("empty sources", ["data.sources=[]"], None, "data.sources"),
    ("missing shards", ["data.sources=[{urls: '{SHARDS}/nope-{000..003}.tar'}]"], None, "nope-000.tar"),
    ("folder without shards", ["data.sources=[{urls: '{EMPTY}'}]"], None, "holds no *.tar"),
    ("pipe: URL", ["data.sources=[{urls: 'pipe:touch {TMP}/PWNED'}]"], None, "data.allow_pipe"),
    (
        "unsupported scheme",
        ["data.sources=[{urls: 's3://bucket/shard-000000.tar'}]"],
        None,
        "unsupported scheme",
    ),
    ("fewer shards than processes*workers", ["data.workers=5"], None, "5 readers"),
    ("warmup >= steps", ["optim.warmup_steps=50", "train.steps=10"], None, "optim.warmup_steps"),
    ("siglip loss without model.siglip", ["loss.kind=siglip"], None, "model.siglip"),
    ("image shards for an audio model", ["model.modality=audio"], None, "image-text pairs"),
    ("unknown architecture", ["model.open_clip_name=NoSuchNet"], None, "NoSuchNet"),
    ("resume folder missing", ["train.resume={TMP}/nope"], None, "train.resume"),
    ("resume folder partial (no COMPLETE)", ["train.resume={PARTIAL}"], None, "COMPLETE"),
    ("resume folder holds a pickle bomb", ["train.resume={BOMB}"], None, "train.resume"),
]


def config_case_files(root: Path, shards: Path) -> dict[str, str]:
    """The files the config cases refer to: 4 shards, an empty folder, a partial and a booby-trapped checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty").mkdir(exist_ok=True)
    partial = root / "checkpoints" / "step-00000003"
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "state.json").write_text("{}")
    bomb = root / "bomb" / "step-00000003"
    bomb.mkdir(parents=True, exist_ok=True)
    for name in ("state.json", "model.json"):
        (bomb / name).write_text("{}")
    make_pickle_bomb(bomb / "optimizer.pt", root / PWNED)
    make_pickle_bomb(bomb / "rng.pt", root / PWNED)
    (bomb / "COMPLETE").write_text("ok\n")
    return {"{SHARDS}": str(shards), "{EMPTY}": str(root / "empty"), "{TMP}": str(root), "{PARTIAL}": str(partial),
            "{BOMB}": str(bomb)}  # fmt: skip


def run_config_case(case, base: Path, root: Path, files: dict[str, str], main: Callable) -> dict:
    """Run one invalid-config case through `main` (mmcl.cli.main, in-process); returns what happened."""
    name, overrides, text, expected = case
    config = base
    if text == "<missing>":
        config = root / "missing.yaml"
    elif text is not None:
        config = root / f"case-{CONFIG_CASES.index(case)}.yaml"
        config.write_text(text)
    args = ["train", "--config", str(config)]
    for override in overrides or []:
        for key, value in files.items():
            override = override.replace(key, value)
        args.append(override)
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    except Exception:  # noqa: BLE001  (a crash is what this looks for)
        import traceback

        code, err = "crash", io.StringIO(traceback.format_exc())
    stderr = err.getvalue()
    messages = [line for line in stderr.splitlines() if line.startswith("mmcl train: error:")]
    ok = code == 2 and "Traceback" not in stderr and bool(messages) and expected in stderr
    return {"case": name, "exit": code, "ok": ok, "message": " / ".join(messages)[:400],
            "pwned": (root / PWNED).exists()}  # fmt: skip


def _config_matrix_main(work: str) -> int:
    """`faults.py _config-matrix WORK`: every case in this one process (imports paid once); JSON on stdout."""
    from mmcl.cli import main

    work_dir = Path(work)
    shards = work_dir / "train" / "shards4"
    base = train_config(
        work_dir / "configs" / "matrix-base.yaml", shards, work_dir / "runs" / "matrix", train={"steps": 4}
    )
    files = config_case_files(work_dir / "config-cases", shards)
    results = [run_config_case(case, base, work_dir / "config-cases", files, main) for case in CONFIG_CASES]
    sys.stdout.write("\n" + json.dumps(results) + "\n")
    return 0


def bench_loading_and_config(work: Path, env: dict) -> list[Row]:
    rows = []
    shards4 = build_train_shards(work / "train4", count=48, shard_size=12)
    shutil.rmtree(work / "train" / "shards4", ignore_errors=True)
    shutil.copytree(shards4, work / "train" / "shards4")

    # the invalid-config matrix, in one process; then the real exit status of two of them
    result = subprocess.run([sys.executable, __file__, "_config-matrix", str(work)], capture_output=True, text=True,
                            env=env, timeout=900)  # fmt: skip
    cases = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else []
    row = Row("config", "invalid configs: exit 2, one message, no traceback", inputs=len(CONFIG_CASES),
              faults=len(CONFIG_CASES), runs=len(CONFIG_CASES), lost=None)  # fmt: skip
    if not cases:
        row.problems.append(f"the matrix crashed: {result.stderr[-800:]}")
    for case in cases:
        row.survived += case["ok"]
        if not case["ok"]:
            row.problems.append(f"{case['case']}: exit {case['exit']}: {case['message']}")
        if case["pwned"]:
            row.problems.append(f"{case['case']}: a command or pickle ran")
    base = work / "configs" / "matrix-base.yaml"
    for overrides, expected in ((["optim.learning_rate=1"], "unknown key"), (["data.workers=5"], "readers")):
        real = mmcl("train", "--config", base, *overrides, env=env)
        row.runs += 1
        row.inputs += 1
        row.faults += 1
        fine = real.returncode == 2 and expected in real.stderr and "Traceback" not in real.stderr
        row.survived += fine
        if not fine:
            row.problems.append(f"real process {overrides}: exit {real.returncode}: {real.stderr[-300:]}")
    row.details = cases
    log(f"config matrix: {row.survived}/{row.runs} -> {'OK' if row.ok else row.problems}")
    rows.append(row)

    # loading: pickle bombs everywhere mmcl reads a torch file; pipe: URLs in configs and in file names
    load = Row("loading", "pickle bombs and shell-executing URLs refused", lost=None)
    bombs = work / "loading"
    bombs.mkdir(parents=True, exist_ok=True)
    marker = bombs / PWNED
    bomb = make_pickle_bomb(bombs / "weights.pt", marker)
    bomb_dir = bombs / "checkpoints" / "step-00000003"
    bomb_dir.mkdir(parents=True, exist_ok=True)
    for name in ("optimizer.pt", "rng.pt"):
        make_pickle_bomb(bomb_dir / name, marker)
    (bomb_dir / "state.json").write_text("{}")
    (bomb_dir / "COMPLETE").write_text("ok\n")
    checks = {
        "model.pretrained=<pickle bomb .pt>": mmcl("train", "--config", base, f"model.pretrained={bomb}",
                                                   f"run.output_dir={bombs / 'run-a'}", env=env),
        "train.resume=<checkpoint with pickle bombs>": mmcl("train", "--config", base, f"train.resume={bomb_dir}",
                                                            f"run.output_dir={bombs / 'run-b'}", env=env),
        "pipe: URL without data.allow_pipe": mmcl("train", "--config", base, "--check",
                                                  f"data.sources=[{{urls: 'pipe:touch {marker}'}}]", env=env),
    }  # fmt: skip
    for name, res in checks.items():
        load.runs += 1
        load.faults += 1
        fine = res.returncode == 2 and "Traceback" not in res.stderr and not marker.exists()
        if name.startswith("pipe") and "data.allow_pipe" not in res.stderr:
            fine = False
        if "pickle" in name and "refused by torch.load(weights_only=True)" not in res.stderr:
            fine = False
        load.survived += fine
        load.details.append({"case": name, "exit": res.returncode, "message": res.stderr.strip()[-300:]})
        if not fine:
            load.problems.append(
                f"{name}: exit {res.returncode}, executed: {marker.exists()}: {res.stderr[-300:]}"
            )
    # a shard whose *file name* starts with pipe: in a folder source "." is read as a file, not run
    folder = bombs / "cwd"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for i, tar in enumerate(sorted(shards4.glob("*.tar"))):
        name = f"pipe:touch {PWNED}.tar" if i == 0 else tar.name
        shutil.copy(tar, folder / name)
    cfg = train_config(bombs / "cwd.yaml", ".", bombs / "run-c", train={"steps": 4})
    res = mmcl("train", "--config", cfg, cwd=folder, env=env)
    load.runs += 1
    load.faults += 1
    fine = res.returncode == 0 and not (folder / f"{PWNED}.tar").exists() and "skipped" not in res.stderr
    load.survived += fine
    load.details.append({"case": "shard file named 'pipe:touch PWNED.tar' in folder source '.'", "exit": res.returncode,
                         "command_ran": (folder / f"{PWNED}.tar").exists()})  # fmt: skip
    if not fine:
        load.problems.append(
            f"pipe: file name: exit {res.returncode}, ran: {(folder / f'{PWNED}.tar').exists()}"
        )
    load.inputs = load.runs
    log(f"loading: {load.survived}/{load.runs} -> {'OK' if load.ok else load.problems}")
    rows.append(load)
    return rows


# ================================================================================================ main


def machine() -> str:
    from host import cpu_model  # bench/host.py (bench/ is sys.path[0] for this script)

    cpu = cpu_model()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, load average {load:.1f} at start"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--sharding-trials", type=int, default=10, help="kill -9 trials of a sharding run")
    parser.add_argument("--training-trials", type=int, default=5, help="kill -9 trials of a training run")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "out" / "faults")
    parser.add_argument("--images", type=int, default=400, help="images in the sharding kill corpus")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    parser.add_argument("--json", type=Path, help="results file (default WORK_DIR/results.json)")
    parser.add_argument(
        "--only", nargs="+", choices=("sharding", "training", "loading"), help="some areas only"
    )
    args = parser.parse_args(argv)
    work = Path(os.path.abspath(args.work_dir))
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    rng = random.Random(args.seed)
    areas = set(args.only or ("sharding", "training", "loading"))
    started = time.time()
    info = machine()
    log(f"fault injection in {work} on {info}")

    rows: list[Row] = []
    if "sharding" in areas:
        rows += bench_bad_inputs(work)
        rows.append(bench_sharding_kills(work, args.sharding_trials, rng, args.images))
    if "training" in areas:
        rows += bench_training(work, args.training_trials, rng)
    if "loading" in areas:
        rows += bench_loading_and_config(work, train_env())

    table = print_table(rows)
    elapsed = time.time() - started
    print(f"\n{table}\n\n{elapsed / 60:.1f} min on {info}")
    for row in rows:
        for problem in row.problems:
            print(f"FAIL {row.scenario}: {problem}")
    results = {
        "command": "python bench/faults.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "elapsed_s": round(elapsed, 1),
        "ok": all(r.ok for r in rows),
        "table": table,
        "rows": [{**r.__dict__, "ok": r.ok} for r in rows],
    }
    path = args.json or work / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {path}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_config-matrix":
        raise SystemExit(_config_matrix_main(sys.argv[2]))
    raise SystemExit(main())
