"""Sharding inputs with a known answer, for fault injection: every kind of bad item the sharder must skip
(with the reason it must give) among unusual but valid ones, in three layouts (CSV manifest, COCO, audio
folder), a corpus for kill -9 trials, and the checks of a sharding output against the answer.

tests/test_faults.py runs the cheap, deterministic cases; bench/faults.py runs them through the real CLI and
kills sharding runs at random points. tests/fault_training.py holds the training side.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
from media_files import COLOURS, make_image, make_tone, png_header_only
from PIL import Image

SHARD_OUTPUTS = ("manifest.json", "sizes.json", "_errors.jsonl")
PWNED = "PWNED"  # a file that only a shell command injected through a URL or a pickle would create


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
    good_rows = _unusual_images(img)
    bad_rows = _bad_image_rows(root, img, outside, unanswered_url)
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


def _unusual_images(img: Path) -> list[tuple[str, str]]:
    """Valid, if unusual, images in `img` and their manifest rows (path cell, caption): all must be
    written."""
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
    return [
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


def _bad_image_rows(root: Path, img: Path, outside: Path, unanswered_url: str) -> list[tuple[str, str, str]]:
    """Broken files in `img` and every kind of bad manifest row: (path cell, caption, expected reason)."""
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
    return [
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
    """`count` real 256x192 PNGs (a few seconds of work for 2 workers) and a few bad rows, as a CSV
    manifest."""
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
