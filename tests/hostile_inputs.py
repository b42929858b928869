"""Hostile inputs for mmcl: the attack corpus of the hostile-input issue, as small deterministic builders.

Tar bombs (a sparse 8 GiB member, a header claiming 8 GiB, a gzip of 256 MiB of zeros, pax and GNU long-name
headers of huge declared size), odd audio (absurd sample rates, a data chunk claiming 4 GB, an hour of
silence, 1024 channels), images Pillow opens but mmcl should not (EPS, PCX, ICO, ...) disguised as .jpg, pixel
bombs, 100,000-deep JSON, bad .cls labels, a YAML alias bomb, booby-trapped manifest.json / sizes.json / part
records, `pipe:` strings and hostile HTTP servers on 127.0.0.1. Each builder uses the stdlib, numpy, Pillow
and soundfile only and takes well under a second; shards are the bytes mmcl's own writer produces
(shards_tools.writer).

bench/attack_corpus.py runs all of them through every mmcl entry point; tests import them directly
(`from hostile_inputs import ...`, tests/ on sys.path). `python tests/hostile_inputs.py [FOLDER]` runs
`self_check`, which proves that every builder makes what it claims.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import struct
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from media_files import COLOURS, make_image, make_tone, png_header_only  # noqa: E402

from shards_tools.writer import sample_bytes, tar_end  # noqa: E402  (mmcl's own tar bytes)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
HUGE = 8 * GiB - 1  # the largest size a plain (octal) tar header field can declare
AUDIO_CLASSES = ("low", "middle", "high")
AUDIO_FREQS = (220.0, 440.0, 880.0)

# ================================================================================================ tar pieces


def _checksummed(header: bytearray) -> bytes:
    """A 512-byte tar header with its checksum field recomputed (after editing other fields)."""
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _info(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode, info.mtime = size, kind, 0o444, 0
    return info


def sparse_member(
    name: str, real_size: int = 8 * GiB, data: bytes = b"\xff\xd8\xff\xe0" + bytes(508)
) -> bytes:
    """An old-GNU sparse member ('S'): `data` stored, then a hole up to `real_size`. Tiny in the archive, but
    a reader that extracts it (tarfile's extractfile().read()) produces `real_size` bytes."""
    header = bytearray(_info(name, len(data), tarfile.GNUTYPE_SPARSE).tobuf(tarfile.GNU_FORMAT))
    # the map: `data` at 0, then a hole to the end (GNU tar ends a map with (size, 0))
    for index, (offset, numbytes) in enumerate(((0, len(data)), (real_size, 0))):
        at = 386 + 24 * index
        header[at : at + 12] = tarfile.itn(offset, 12, tarfile.GNU_FORMAT)
        header[at + 12 : at + 24] = tarfile.itn(numbytes, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)  # realsize
    return _checksummed(header) + _padded(data)


def oversized_member(name: str, claimed: int = 8 * GiB, present: int = 4 * KiB) -> bytes:
    """A regular member whose header claims `claimed` bytes (GNU base-256 size field) followed by only
    `present` bytes: the tar ends there, truncated."""
    return _info(name, claimed).tobuf(tarfile.GNU_FORMAT) + b"\xff\xd8\xff\xe0" + bytes(present - 4)


def pax_header_bomb(claimed: int = HUGE, present: int = KiB) -> bytes:
    """A pax extended header ('x') declaring `claimed` bytes of records, then `present` bytes: the tar
    ends."""
    record = b"%d comment=" % claimed
    return _info("PaxHeader/hostile", claimed, tarfile.XHDTYPE).tobuf(tarfile.USTAR_FORMAT) + (
        record + b"x" * (present - len(record))
    )


def gnu_longname_bomb(claimed: int = HUGE, present: int = KiB) -> bytes:
    """A GNU long-name header ('L') declaring a `claimed`-byte file name, then `present` bytes: the tar
    ends."""
    return (
        _info("././@LongLink", claimed, tarfile.GNUTYPE_LONGNAME).tobuf(tarfile.GNU_FORMAT) + b"a" * present
    )


def shard_bytes(*parts: bytes, end: bool = True) -> bytes:
    """Tar pieces joined into one archive, closed the way tarfile (and mmcl) close it, or left open (`end`
    False: a truncated tar)."""
    body = b"".join(parts)
    return body + tar_end(len(body)) if end else body


def _deflate(data: bytes, last: bool) -> bytes:
    """Raw deflate of `data` from a fresh compressor, ended by a full flush (no history carried over, so such
    pieces can be concatenated and repeated) or, for the `last` piece, by the final block."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)


def gzip_tar_of_zeros(
    path: Path, before: bytes, name: str, after: bytes, member_size: int = 256 * MiB
) -> Path:
    """A .tar.gz: the tar pieces `before`, a member `name` of `member_size` zero bytes, the pieces `after`,
    the end blocks. ~250 KiB on disk for 256 MiB of zeros; written as one 1 MiB block of zeros compressed once
    and repeated (full flushes make the pieces independent), so it takes a fraction of a second."""
    chunk = bytes(MiB)
    assert member_size % MiB == 0, "member_size must be whole MiB"
    head = before + _info(name, member_size).tobuf(tarfile.PAX_FORMAT)
    tail = after + tar_end(len(head) + member_size + len(after))
    crc = zlib.crc32(head)
    for _ in range(member_size // MiB):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(tail, crc)
    zeros = _deflate(chunk, last=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip header: deflate, no name, mtime 0
        out.write(_deflate(head, last=False))
        for _ in range(member_size // MiB):
            out.write(zeros)
        out.write(_deflate(tail, last=True))
        out.write(struct.pack("<II", crc, (len(head) + member_size + len(tail)) & 0xFFFFFFFF))
    return path


# ================================================================================================ samples


def sample(key: str, caption: str = "a hostile sample", **members: bytes) -> dict[str, bytes]:
    """A WebDataset sample: the given members (extension=bytes) plus, unless given, a .txt caption, a .json
    record ({"key", "text", "label_index": 0}) and a .cls of 0, so the given members are its only fault. A
    given .cls is the label: the .json then has no label_index (readers prefer it to the .cls)."""
    record = (
        {"key": key, "text": [caption]}
        if "cls" in members
        else {"key": key, "text": [caption], "label_index": 0}
    )
    return {
        "__key__": key,
        "txt": caption.encode(),
        "json": json.dumps(record).encode(),
        "cls": b"0",
        **members,
    }


def good_samples(folder: Path, modality: str, count: int, first: int = 0) -> list[dict[str, bytes]]:
    """`count` valid labelled samples as mmcl writes them (media, .txt, .json with key/text/label/label_index,
    .cls), keys f"{i:06d}" from `first`; the source files are written under `folder`. Images: 40x40 PNGs of
    COLOURS (class = colour); audio: 0.6 s 16 kHz FLAC tones of AUDIO_CLASSES."""
    samples = []
    for i in range(first, first + count):
        key = f"{i:06d}"
        if modality == "image":
            index = i % len(COLOURS)
            label, caption = COLOURS[index], f"a photo of a {COLOURS[index]} square"
            media = {"png": make_image(folder / f"{key}.png", label, size=(40, 40), seed=i).read_bytes()}
        else:
            index = i % len(AUDIO_CLASSES)
            label, caption = AUDIO_CLASSES[index], f"a {AUDIO_CLASSES[index]} tone"
            tone = make_tone(folder / f"{key}.flac", AUDIO_FREQS[index] + i, seconds=0.6, rate=16000)
            media = {"flac": tone.read_bytes()}
        record = {"key": key, "text": [caption], "source": f"{key}", "label": label, "label_index": index}
        samples.append({"__key__": key, **media, "txt": caption.encode(), "json": json.dumps(record).encode(),
                        "cls": str(index).encode()})  # fmt: skip
    return samples


def shard_with(
    folder: Path,
    modality: str,
    *hostile: bytes,
    first: int = 0,
    before: int = 2,
    after: int = 2,
    end: bool = True,
) -> bytes:
    """A shard: `before` good samples (keys from `first`; sources written under `folder`), the hostile tar
    pieces (e.g. `sample_bytes(sample("hostile_eps", jpg=eps_bytes()))` or `sparse_member(...)`), `after` good
    samples, and the end blocks unless `end` is False (for pieces that swallow the rest of the archive
    anyway)."""
    head = good_samples(folder, modality, before, first=first)
    tail = good_samples(folder, modality, after, first=first + before)
    return shard_bytes(*map(sample_bytes, head), *hostile, *map(sample_bytes, tail), end=end)


def class_names(modality: str) -> list[str]:
    return list(COLOURS) if modality == "image" else list(AUDIO_CLASSES)


def samples_tar(samples: list[dict[str, bytes]]) -> bytes:
    """Samples as one complete tar, member for member what mmcl's shard writer produces."""
    return shard_bytes(*(sample_bytes(s) for s in samples))


def write_shard_folder(
    folder: Path, modality: str, shards: dict[str, bytes | Path], counts: dict[str, int] | None = None
) -> Path:
    """A shard folder with a consistent index: each `shards` entry (name -> tar bytes, or a file to copy) is
    written, then manifest.json (count, bytes, sha256 per shard, class names) and sizes.json describe them, so
    verify's hash checks pass and it reads on into the members. `counts` gives the samples per shard (default:
    the distinct keys tarfile can list, 0 for an archive it cannot)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, content in shards.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        (folder / name).write_bytes(data)
        count = (counts or {}).get(name)
        if count is None:
            count = _count_keys(data)
        entries.append(
            {"name": name, "count": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    write_index(folder, modality, entries)
    return folder


def _count_keys(data: bytes) -> int:
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            return len({m.name.split(".", 1)[0] for m in archive.getmembers()})
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        return 0


def write_index(folder: Path, modality: str, entries: list[dict], **manifest_fields: object) -> None:
    """manifest.json and sizes.json for shard `entries` ({"name", "count", "bytes", "sha256"}), in mmcl's
    layout; `manifest_fields` replace top-level manifest keys."""
    manifest = {
        "format": "mmcl-shards/1",
        "tool": "hostile_inputs",
        "modality": modality,
        "prefix": "shard",
        "shards": entries,
        "totals": {
            "shards": len(entries),
            "samples": sum(e["count"] for e in entries if isinstance(e["count"], int)),
            "bytes": sum(e["bytes"] for e in entries),
            "items": sum(e["count"] for e in entries if isinstance(e["count"], int)),
            "skipped": 0,
        },
        "errors_by_reason": {},
        "class_names": class_names(modality),
        "noise": None,
        "options": {},
        **manifest_fields,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (folder / "sizes.json").write_text(json.dumps({e["name"]: e["count"] for e in entries}, indent=1))


# ================================================================================================ media


def eps_bytes() -> bytes:
    """A minimal valid EPS: Pillow identifies it as "EPS" and renders it by running Ghostscript on the
    file."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
            b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")  # fmt: skip


DISGUISED_FORMATS = ("PCX", "ICO", "TGA", "SGI", "SPIDER", "DDS")
"""Formats Pillow opens (and writes) that are not JPEG/PNG/WebP: each is saved under a .jpg name."""


def disguised_image(fmt: str) -> bytes:
    """A 16x16 picture saved by Pillow in `fmt` (one of DISGUISED_FORMATS)."""
    pixels = (np.arange(16 * 16 * 3, dtype=np.uint32).reshape(16, 16, 3) * 7 % 256).astype(np.uint8)
    image = Image.fromarray(pixels)
    if fmt == "SPIDER":  # a single-channel float format
        image = image.convert("F")
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def gif_header_only(width: int = 65535, height: int = 65535) -> bytes:
    """A valid, tiny GIF whose screen and one frame claim width x height pixels (the largest GIF allows)."""
    lzw = bytes([2, 2, 0x4C, 0x01, 0])  # min code size 2; one sub-block: clear, one pixel, end; terminator
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + bytes(6)  # 2-colour table
            + b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + lzw + b";")  # fmt: skip


def pixel_bombs() -> dict[str, bytes]:
    """Small files whose headers claim absurd pixel counts."""
    return {
        "png-100000x100000": png_header_only(100_000, 100_000),
        "png-1x2147483647": png_header_only(1, 2**31 - 1),
        "gif-65535x65535": gif_header_only(),
    }


def hostile_images() -> dict[str, bytes]:
    """Every hostile image, by case name; each is meant to be stored under a .jpg name."""
    images = {"eps-as-jpg": eps_bytes()}
    images.update({f"{fmt.lower()}-as-jpg": disguised_image(fmt) for fmt in DISGUISED_FORMATS})
    images.update(pixel_bombs())
    return images


def wav_bytes(rate: int, frames: int = 2000, claimed_data: int | None = None) -> bytes:
    """A 16-bit PCM mono WAV written field by field (any header rate, even ones libsndfile would not write): a
    tone of one cycle per 400 frames; `claimed_data` sets the data chunk's declared size (the file stays
    small)."""
    data = (3000 * np.sin(np.arange(frames) * 2 * np.pi / 400)).astype("<i2").tobytes()
    declared = len(data) if claimed_data is None else claimed_data
    fmt = struct.pack("<HHIIHH", 1, 1, rate, (rate * 2) & 0xFFFFFFFF, 2, 16)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", declared) + data
    )
    return b"RIFF" + struct.pack("<I", min(4 + 8 + len(fmt) + 8 + declared, 0xFFFFFFFF)) + body


def many_channel_wav(channels: int = 1024, frames: int = 16) -> bytes:
    """A WAV with `channels` channels (1024 is libsndfile's maximum), written by soundfile."""
    out = io.BytesIO()
    soundfile.write(out, np.zeros((frames, channels), dtype=np.int16), 16000, format="WAV")
    return out.getvalue()


def _crc(data: bytes, poly: int, bits: int) -> int:
    top, mask, crc = 1 << (bits - 1), (1 << bits) - 1, 0
    for byte in data:
        crc ^= byte << (bits - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & mask if crc & top else (crc << 1) & mask
    return crc


def silent_flac(seconds: int = 3600, rate: int = 48000) -> bytes:
    """A FLAC of `seconds` of 16-bit mono silence: ~35 KB for an hour. Written frame by frame (65,535-sample
    blocks, each one CONSTANT subframe) because libFLAC needs a second or more to encode an hour."""
    total, block = seconds * rate, 65535
    info = struct.pack(">HH", block, block) + bytes(6)  # block sizes; frame sizes unknown
    # rate (20 bits), channels - 1 (3 bits: mono), bits per sample - 1 (5 bits), total samples (36 bits);
    # no MD5
    info += ((rate << 44) | (0 << 41) | (15 << 36) | total).to_bytes(8, "big") + bytes(16)
    frames = [b"fLaC", bytes([0x80, 0, 0, len(info)]), info]  # last metadata block: STREAMINFO
    for number, start in enumerate(range(0, total, block)):
        size = min(block, total - start)
        # sync + fixed blocking; size from the 16-bit field below, rate from STREAMINFO; mono, 16 bit
        head = (
            b"\xff\xf8\x70\x08" + chr(number).encode("utf-8", "surrogatepass") + struct.pack(">H", size - 1)
        )
        head += bytes([_crc(head, 0x07, 8)])
        frame = head + b"\x00\x00\x00"  # CONSTANT subframe, value 0
        frames.append(frame + struct.pack(">H", _crc(frame, 0x8005, 16)))
    return b"".join(frames)


def hostile_audio() -> dict[str, bytes]:
    """Every hostile audio file, by case name (the extension each needs is the name's last part)."""
    return {
        "wav-44101hz": wav_bytes(44_101),
        "wav-999983hz": wav_bytes(999_983),
        "wav-1hz": wav_bytes(1),
        "wav-2147483647hz": wav_bytes(2**31 - 1),
        "wav-data-claims-4gb": wav_bytes(16_000, claimed_data=0xFFFFFFF0),
        "flac-1h-silence": silent_flac(),
        "wav-1024-channels": many_channel_wav(),
    }


# ================================================================================================ text


def deep_json(depth: int = 100_000) -> bytes:
    """A JSON array nested `depth` levels deep (a RecursionError for a recursive parser)."""
    return b"[" * depth + b"]" * depth


def deep_jsonl_manifest(folder: Path, depth: int = 100_000) -> tuple[Path, str]:
    """A JSONL manifest of two good image rows around one row with a `depth`-deep value; returns the
    manifest and the deep row's image path (its source)."""
    make_image(folder / "a.png", "red")
    make_image(folder / "b.png", "blue")
    make_image(folder / "deep.png", "green")
    deep = '{"path": "deep.png", "caption": "a row nested deep", "extra": ' + "[" * depth + "]" * depth + "}"
    rows = [
        '{"path": "a.png", "caption": "a red square"}',
        deep,
        '{"path": "b.png", "caption": "a blue square"}',
    ]
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest, str(folder / "deep.png")


HOSTILE_LABELS = {
    "cls-5000-digits": b"7" * 5000,  # beyond Python's 4,300-digit int() limit
    "cls-negative": b"-3",
    "cls-non-ascii": "\uff13".encode(),  # FULLWIDTH DIGIT THREE: str.isdigit() and int() accept it
    "cls-out-of-range": b"999",
}


def alias_bomb_yaml(indent: str = "") -> str:
    """The classic "billion laughs" in YAML (~280 bytes): 9 levels of 9 aliases, 9**9 strings once
    expanded."""
    lines = [f'{indent}a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{indent}{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def alias_bomb_config(path: Path, shards: Path, output: Path) -> Path:
    """A micro image-text training config, valid except that model.open_clip_config holds an alias bomb
    beside a real open_clip model config."""
    model = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    config = "\n".join(
        [
            f"run: {{output_dir: {json.dumps(str(output))}, seed: 0}}",
            "model:",
            "  modality: image",
            "  open_clip_config:",
            *(f"    {key}: {json.dumps(value)}" for key, value in model.items()),
            alias_bomb_yaml("    ").rstrip("\n"),
            f"data: {{sources: [{{urls: {json.dumps(str(shards))}}}], batch_size: 8, workers: 1, "
            f"shuffle_buffer: 20}}",
            "optim: {lr: 1.0e-3, warmup_steps: 1}",
            "train: {steps: 2, log_every: 1, checkpoint_every: 100}",
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config + "\n")
    return path


# ================================================================================================ index files


def hostile_manifest(folder: Path, kind: str, outside: Path | None = None, canary: Path | None = None) -> str:
    """Rewrite the manifest.json / sizes.json of a shard folder written by `write_shard_folder` into a hostile
    `kind` (one of HOSTILE_INDEX_KINDS); returns the text a reader should name when it reports the problem.
    The name kinds point the first shard at `outside`, a valid shard outside the folder (sha256 and count
    right), at /etc/passwd, or at the `pipe_string` of `canary`."""
    manifest = json.loads((folder / "manifest.json").read_text())
    first = manifest["shards"][0]
    if kind in ("name-absolute", "name-dotdot", "name-etc-passwd", "name-pipe"):
        if kind == "name-etc-passwd":
            first["name"] = "/etc/passwd"
        elif kind == "name-pipe":
            assert canary is not None, "name-pipe needs a canary path"
            first["name"] = pipe_string(canary)
        else:
            assert outside is not None, "the name kinds need a shard outside the folder"
            data = outside.read_bytes()
            first.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), count=_count_keys(data))
            first["name"] = str(outside) if kind == "name-absolute" else f"../{outside.name}"
        write_index(folder, manifest["modality"], manifest["shards"])
        return first["name"]
    if kind == "manifest-is-a-list":
        (folder / "manifest.json").write_text(json.dumps([manifest]))
        return "manifest.json"
    if kind == "sizes-count-string":  # open_clip's sizes.json alone
        (folder / "manifest.json").unlink()
        (folder / "sizes.json").write_text(json.dumps({first["name"]: "many"}))
        return "sizes.json"
    values = {"count-string": "many", "count-list": [1, 2], "count-negative": -5, "count-huge": 10**30}
    first["count"] = values[kind.removeprefix("manifest-")]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (folder / "sizes.json").write_text(json.dumps({s["name"]: s["count"] for s in manifest["shards"]}))
    return "manifest.json"


HOSTILE_INDEX_KINDS = (
    "name-absolute",
    "name-dotdot",
    "name-etc-passwd",
    "name-pipe",
    "manifest-is-a-list",
    "sizes-count-string",
    "manifest-count-string",
    "manifest-count-list",
    "manifest-count-negative",
    "manifest-count-huge",
)


def corrupt_progress_options(output: Path) -> Path:
    """A shard output folder whose _progress/options.json (what a resumed run compares its options with) is
    not JSON."""
    path = output / "_progress" / "options.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"{\x00garbage: [")
    return path


HOSTILE_PART_KINDS = (
    "part-not-json",
    "part-is-a-list",
    "part-count-string",
    "part-deep-json",
    "part-name-escapes",
)


def hostile_part(output: Path, kind: str) -> Path:
    """A `--part` run's record under OUT/_parts/ (what `mmcl shard merge` joins) made hostile."""
    path = output / "_parts" / "part-00000-of-00001.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    shard = {
        "index": 0,
        "name": "shard-000000.tar",
        "count": 1,
        "items": 1,
        "bytes": 10240,
        "sha256": "0" * 64,
        "errors": [],
    }
    record = {"part": 0, "parts": 1, "modality": "image", "prefix": "shard", "planned_shards": 1,
              "class_names": None, "noise": None, "options": {}, "shards": [shard]}  # fmt: skip
    if kind == "part-not-json":
        path.write_bytes(b"{\x00not json")
        return path
    if kind == "part-deep-json":
        path.write_bytes(deep_json())
        return path
    if kind == "part-is-a-list":
        record = [record]
    elif kind == "part-count-string":
        shard["count"] = "many"
    elif kind == "part-name-escapes":
        shard["name"] = "../../escaped.tar"
    path.write_text(json.dumps(record))
    return path


# ============================================================================================== pipe: strings


def pipe_string(canary: Path) -> str:
    """A `pipe:` URL that creates `canary`0 if anything runs it in a shell (brace-expanded like a shard
    pattern)."""
    return f"pipe:touch {canary}{{0..0}}"


def canaries(canary: Path) -> list[Path]:
    """The files a pipe: string (or the fake Ghostscript of bench/attack_corpus.py) made from `canary`."""
    return sorted(canary.parent.glob(canary.name + "*"))


# =============================================================================================== HTTP servers


Respond = Callable[[BaseHTTPRequestHandler, threading.Event], None]


@contextlib.contextmanager
def _http_server(respond: Respond) -> Iterator[str]:
    """Serve every GET with `respond(handler, stop)` on 127.0.0.1 (a free port) in threads; yields the base
    URL. On exit `stop` is set (slow responders check it), the server stops and its socket closes."""
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10  # a write blocked on a client that stopped reading ends
        disable_nagle_algorithm = True

        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client gave up: that is its right
                respond(self, stop)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join()


def _body_prefix(path: str) -> bytes:
    """What a hostile server sends first: for a shard (.tar) the header of a member claiming 8 GiB."""
    return (
        _info("000000.jpg", 8 * GiB).tobuf(tarfile.GNU_FORMAT) if path.split("?")[0].endswith(".tar") else b""
    )


def huge_length_server(pause: float = 0.25, duration: float = 60.0) -> contextlib.AbstractContextManager[str]:
    """Answers `Content-Length: 10000000000000`, then sends 64 KiB every `pause` s for `duration` s and
    closes: a client must refuse on the header (or its deadline), not read until the server stops."""

    def respond(handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", "10000000000000")
        handler.end_headers()
        handler.wfile.write(_body_prefix(handler.path))
        ends = time.monotonic() + duration
        while time.monotonic() < ends and not stop.wait(pause):
            handler.wfile.write(bytes(64 * KiB))

    return _http_server(respond)


def chunked_server() -> contextlib.AbstractContextManager[str]:
    """An endless chunked body, as fast as the client reads: 64 KiB chunks of zeros after the prefix."""

    def respond(handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        prefix, zeros = _body_prefix(handler.path), bytes(64 * KiB)
        if prefix:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(prefix), prefix))
        while not stop.is_set():
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(zeros), zeros))

    return _http_server(respond)


def slowloris_server(
    interval: float = 9.0, slow_headers: bool = True
) -> contextlib.AbstractContextManager[str]:
    """Trickles one byte every `interval` s: the status line and headers (unless `slow_headers` is False),
    then the body. Every read gets a byte before a 10 s per-read timeout, so only a total deadline ends it."""

    def respond(handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
        body = _body_prefix(handler.path) + bytes(100_000)
        if not slow_headers:
            handler.wfile.write(head)
        for byte in (head if slow_headers else b"") + body:
            if stop.wait(interval):
                return
            handler.wfile.write(bytes([byte]))

    return _http_server(respond)


def file_server(files: dict[str, bytes]) -> contextlib.AbstractContextManager[str]:
    """A well-behaved server (the control case): `files` by URL path ("/shard-000000.tar"), at once; 404
    else."""

    def respond(handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
        data = files.get(handler.path.split("?")[0])
        handler.send_response(200 if data is not None else 404)
        handler.send_header("Content-Length", str(len(data or b"")))
        handler.end_headers()
        handler.wfile.write(data or b"")

    return _http_server(respond)


# ================================================================================================ self-check


def _timed(name: str, build: Callable[[], object], report: list[str]) -> object:
    started = time.perf_counter()
    result = build()
    elapsed = time.perf_counter() - started
    if elapsed > 1.0:
        report.append(f"{name}: built in {elapsed:.2f} s (not well under a second)")
    return result


def _tar_members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return archive.getmembers()


def _check_tars(folder: Path, problems: list[str]) -> None:
    sparse = _timed("sparse tar", lambda: shard_bytes(sparse_member("hostile.jpg")), problems)
    (folder / "sparse.tar").write_bytes(sparse)
    (member,) = _tar_members(sparse)
    if not (member.issparse() and member.size == 8 * GiB and len(sparse) <= 12 * KiB):
        problems.append(
            f"sparse tar: {len(sparse)} bytes, member {member.size} bytes, sparse {member.issparse()}"
        )
    claimed = oversized_member("hostile.jpg")
    with tarfile.open(fileobj=io.BytesIO(claimed), mode="r|") as archive:
        first = archive.next()
    if first.size != 8 * GiB or len(claimed) > 8 * KiB:
        problems.append(f"8 GiB header: member {first.size} bytes in a {len(claimed)}-byte tar")
    for name, bomb, kind in (("pax", pax_header_bomb(), tarfile.XHDTYPE),
                             ("GNU long name", gnu_longname_bomb(), tarfile.GNUTYPE_LONGNAME)):  # fmt: skip
        header = tarfile.TarInfo.frombuf(bomb[:512], "utf-8", "surrogateescape")
        if header.type != kind or header.size != HUGE or len(bomb) > 2 * KiB:
            problems.append(f"{name} header: type {header.type!r}, declared {header.size}, {len(bomb)} bytes")
    path = _timed(
        "gzip tar",
        lambda: gzip_tar_of_zeros(
            folder / "zeros.tar.gz", b"", "hostile.jpg", sample_bytes(sample("hostile"))
        ),
        problems,
    )
    with tarfile.open(path, "r:gz") as archive:
        sizes = {m.name: m.size for m in archive.getmembers()}
    with gzip.open(path) as unzipped:
        total = sum(len(b) for b in iter(lambda: unzipped.read(16 * MiB), b""))  # checks the CRC and length
    if sizes.get("hostile.jpg") != 256 * MiB or path.stat().st_size > 400 * KiB or total < 256 * MiB:
        problems.append(f"gzip tar: {path.stat().st_size} bytes on disk, members {sizes}, {total} unzipped")


def _check_media(problems: list[str]) -> None:
    expected = {
        "eps-as-jpg": "EPS",
        "png-100000x100000": "PNG",
        "png-1x2147483647": "PNG",
        "gif-65535x65535": "GIF",
    }
    expected.update({f"{fmt.lower()}-as-jpg": fmt for fmt in DISGUISED_FORMATS})
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # identify the bombs without tripping on them
    try:
        for name, data in _timed("images", hostile_images, problems).items():
            with Image.open(io.BytesIO(data)) as image:
                if image.format != expected[name]:
                    problems.append(f"{name}: Pillow says {image.format}")
                if name.startswith(("png-", "gif-")) and image.size[0] * image.size[1] < 2**31 - 1:
                    problems.append(f"{name}: only {image.size}")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    rates = {"wav-44101hz": 44_101, "wav-999983hz": 999_983, "wav-1hz": 1, "wav-2147483647hz": 2**31 - 1}
    audio = _timed("audio", hostile_audio, problems)
    for name, data in audio.items():
        if len(data) > 64 * KiB:
            problems.append(f"{name}: {len(data)} bytes, not small")
        info = soundfile.info(io.BytesIO(data))
        if name in rates and info.samplerate != rates[name]:
            problems.append(f"{name}: soundfile reports {info.samplerate} Hz")
    if soundfile.info(io.BytesIO(audio["flac-1h-silence"])).frames != 3600 * 48000:
        problems.append("flac-1h-silence: not an hour at 48 kHz")
    flac = soundfile.SoundFile(io.BytesIO(audio["flac-1h-silence"]))
    flac.seek(3600 * 48000 - 100_000)
    if len(flac.read(200_000)) != 100_000:  # the last frames decode (CRCs right)
        problems.append("flac-1h-silence: the last frames do not decode")
    if soundfile.info(io.BytesIO(audio["wav-1024-channels"])).channels != 1024:
        problems.append("wav-1024-channels: not 1024 channels")
    declared = struct.unpack("<I", audio["wav-data-claims-4gb"][40:44])[0]
    if declared < 4 * 10**9:
        problems.append(f"wav-data-claims-4gb: data chunk declares {declared}")


def self_check(folder: Path) -> list[str]:
    """Build everything under `folder` and check it is what the docstrings say; returns the problems found."""
    folder.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    _check_tars(folder, problems)
    _check_media(problems)
    try:
        json.loads(deep_json())
        problems.append("deep JSON parsed")
    except RecursionError:
        pass
    try:
        int(HOSTILE_LABELS["cls-5000-digits"])
        problems.append("a 5,000-digit label parsed")
    except ValueError:
        pass
    if int(HOSTILE_LABELS["cls-non-ascii"].decode()) != 3:
        problems.append("the non-ASCII digit is not read as 3 by int()")
    import yaml  # only here: the bomb must be valid YAML with 9**9 leaves once expanded

    bomb = yaml.safe_load(alias_bomb_yaml())
    if len(alias_bomb_yaml()) > 400 or len(bomb["i"]) != 9 or bomb["i"][0] is not bomb["h"]:
        problems.append(f"alias bomb: {len(alias_bomb_yaml())} bytes, not 9 levels of shared aliases")
    config = yaml.safe_load(alias_bomb_config(folder / "bomb.yaml", folder, folder / "run").read_text())
    if set(config["model"]["open_clip_config"]) != {"embed_dim", "vision_cfg", "text_cfg", *"abcdefghi"}:
        problems.append("alias bomb config: open_clip_config is not a model config plus the bomb")
    problems += _check_servers()
    return problems


def _check_servers() -> list[str]:
    """Each server answers as described, and shuts down within a second."""
    import http.client
    import socket

    def connect(url: str) -> http.client.HTTPConnection:
        host, port = url.removeprefix("http://").split(":")
        return http.client.HTTPConnection(host, int(port), timeout=5)

    problems = []
    with file_server({"/x": b"hello"}) as url:
        connection = connect(url)
        connection.request("GET", "/x")
        if connection.getresponse().read() != b"hello":
            problems.append("file server: wrong body")
    with huge_length_server(pause=0.01) as url:
        connection = connect(url)
        connection.request("GET", "/shard.tar")
        response = connection.getresponse()
        header = response.read(512)
        if (
            response.getheader("Content-Length") != "10000000000000"
            or tarfile.TarInfo.frombuf(header, "utf-8", "strict").size != 8 * GiB
        ):
            problems.append("huge-length server: wrong header or prefix")
        connection.close()
    with chunked_server() as url:
        connection = connect(url)
        connection.request("GET", "/x.jpg")
        response = connection.getresponse()
        if response.getheader("Transfer-Encoding") != "chunked" or len(response.read(4 * MiB)) != 4 * MiB:
            problems.append("chunked server: not an endless chunked body")
        connection.close()
    started = time.monotonic()
    with slowloris_server(interval=0.2) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /x.jpg HTTP/1.1\r\nHost: x\r\n\r\n")
            got = sock.recv(100) + sock.recv(100)
        if len(got) != 2 or time.monotonic() - started < 0.35:
            problems.append(f"slowloris server: {got!r} after {time.monotonic() - started:.2f} s")
    if time.monotonic() - started > 3:
        problems.append("slowloris server: slow to shut down")
    return problems


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        found = self_check(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(scratch))
    print("\n".join(found) or "hostile_inputs: every builder makes what it claims")
    raise SystemExit(1 if found else 0)
