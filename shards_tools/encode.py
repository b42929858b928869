"""Turn one item's fetched bytes into what the sharder writes: a re-encoded image or audio clip.

Anything wrong with the item itself raises ItemError with one of SKIP_REASONS, so the sharder can skip and
record it; any other exception is a bug. Outputs are deterministic: the same bytes and options give the same
output bytes (no timestamps or metadata are written).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf
from PIL import ExifTags, Image, ImageOps

from shards_tools.config import AudioOptions, ImageOptions
from shards_tools.decode import DecodeError, audio_blocks, open_audio, open_image, resampling_rate
from shards_tools.items import ItemError


@dataclass(frozen=True)
class EncodedMedia:
    """Encoded bytes, the extension they are written under in the tar (jpg/png/webp/flac/wav), and facts
    about them for the sample's .json (images: width, height, original_width, original_height; audio:
    sample_rate, duration, channels, original_sample_rate, original_duration)."""

    data: bytes
    extension: str
    meta: dict[str, Any] = field(default_factory=dict)


def check_captions(captions: list[str]) -> list[str]:
    """Return the captions stripped of surrounding whitespace, empty ones dropped.

    Readers decode text with errors="surrogateescape", so bytes that are not UTF-8 arrive as lone surrogates;
    such a caption cannot be written as UTF-8 and fails the item (caption_not_utf8) rather than being
    silently altered. No caption left fails it as empty_caption.
    """
    kept = []
    for index, caption in enumerate(captions):
        caption = caption.strip()
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ItemError("caption_not_utf8", f"caption {index}: {caption[:80]!r} ({err.reason})") from None
        if caption:
            kept.append(caption)
    if not kept:
        raise ItemError("empty_caption", f"{len(captions)} caption(s), all empty or whitespace")
    return kept


# ---------------------------------------------------------------- images

# EXIF orientations that rotate by 90 degrees, swapping width and height.
_SWAPS_AXES = {5, 6, 7, 8}
# The resampling filter of every resize; reducing_gap lets Pillow box-reduce first on large downscales.
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0
# Pillow modes that hold 16-bit samples; convert() would clip them at 255 instead of scaling them.
_WIDE_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SAVE_ARGS = {"jpg": ("JPEG", True), "png": ("PNG", False), "webp": ("WEBP", True)}


@contextmanager
def _decode_errors() -> Iterator[None]:
    """Anything decoding one item's bytes raises is that item's fault: a skip with its reason, never a dead
    run (Pillow's plugins alone raise a dozen exception types on hostile files)."""
    try:
        yield
    except ItemError:
        raise
    except DecodeError as err:
        raise ItemError("decompression_bomb" if err.bomb else "decode_error", str(err)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ItemError("decompression_bomb", str(err)) from None
    except Exception as err:
        raise ItemError("decode_error", f"{type(err).__name__}: {_short(err)}") from None


def _short(err: Exception, limit: int = 300) -> str:
    text = str(err)
    return text if len(text) <= limit else text[:limit] + "..."


def _geometry(width: int, height: int, options: ImageOptions) -> tuple[tuple[int, int], tuple[int, int]]:
    """(size the whole image is scaled to, final size after any center crop) for an upright width x height."""
    size = options.image_size
    if size is None or options.resize_mode == "none":
        return (width, height), (width, height)
    side = max(width, height) if options.resize_mode == "keep-ratio-largest" else min(width, height)
    scaled = (max(1, round(width * size / side)), max(1, round(height * size / side)))
    return scaled, ((size, size) if options.resize_mode == "center-crop" else scaled)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited on white; 16-bit greyscale scaled (not clipped) to 8 bits."""
    if img.mode in _WIDE_GREY_MODES:
        img = img.convert("I").point(lambda v: v / 256, "L")
    if img.mode == "RGB":
        return img
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", img.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return img.convert("RGB")


def encode_image(data: bytes, options: ImageOptions) -> EncodedMedia:
    """Decode, orient, convert to RGB, resize and re-encode one image.

    The formats of decode.IMAGE_FORMATS; the first frame of animations. EXIF orientation is applied, so
    original_width/original_height are the upright size. Resize modes follow img2dataset, which upscales
    by default (resize_only_if_bigger=False), and so do these: "keep-ratio-largest" scales the largest side
    to image_size, "shortest-side" scales the shortest side to image_size, "center-crop" does that and keeps
    the central image_size square, "none" keeps the size. The filter is LANCZOS.

    JPEGs are decoded at 1/2, 1/4 or 1/8 scale (Image.draft) when the result is still at least the target
    size, which makes decoding several times faster. A JPEG that already is the requested output (RGB,
    upright, of the final size, jpg requested) is fully decoded to check it and then passed through
    unchanged, keeping its own quality and metadata instead of losing a generation to re-encoding.

    Raises ItemError: empty_file, decode_error (truncated, corrupt, not an image or not an allowed format),
    decompression_bomb (more than Image.MAX_IMAGE_PIXELS pixels, Pillow's module-level limit), too_small
    (shortest upright side below options.min_size).
    """
    if not data:
        raise ItemError("empty_file", "0 bytes")
    with _decode_errors():
        img = open_image(data)
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        swaps = orientation in _SWAPS_AXES
        width, height = img.size[::-1] if swaps else img.size
        if min(width, height) < options.min_size:
            raise ItemError("too_small", f"{width}x{height} is below --min-size {options.min_size}")
        meta = {"original_width": width, "original_height": height}
        scaled, final = _geometry(width, height, options)
        if (
            img.format == "JPEG"
            and options.image_format == "jpg"
            and img.mode == "RGB"
            and orientation == 1
            and scaled == final == (width, height)
        ):
            img.load()
            return EncodedMedia(data, "jpg", {"width": width, "height": height, **meta})
        if scaled != (width, height):
            img.draft("RGB", scaled[::-1] if swaps else scaled)
        ImageOps.exif_transpose(img, in_place=True)
        rgb = _to_rgb(img)
        if final != rgb.size:
            # After draft the image can be slightly larger than `scaled`: crop the same fraction of it.
            keep_x, keep_y = rgb.width * final[0] / scaled[0], rgb.height * final[1] / scaled[1]
            left, top = (rgb.width - keep_x) // 2, (rgb.height - keep_y) // 2
            rgb = rgb.resize(
                final, RESAMPLE, box=(left, top, left + keep_x, top + keep_y), reducing_gap=REDUCING_GAP
            )
    rgb.info = {}
    pillow_format, takes_quality = _SAVE_ARGS[options.image_format]
    out = io.BytesIO()
    rgb.save(out, pillow_format, **({"quality": options.quality} if takes_quality else {}))
    return EncodedMedia(
        out.getvalue(), options.image_format, {"width": rgb.width, "height": rgb.height, **meta}
    )


# ---------------------------------------------------------------- audio

# Source subtypes with more than 16 bits of precision; they are written as 24-bit PCM (FLAC's maximum here).
_HIGH_RES_SUBTYPES = {"PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ALAC_24", "ALAC_32"}
# Without a Xing/Info header an MP3's frame count is mpg123's estimate from the file size, and an intact CBR
# file decodes a little short of it (encoder delay/padding, trailing tags): accept this much shortfall.
_MP3_SLACK_FRACTION = 0.01
_MP3_SLACK_FRAMES = 2304  # two MPEG-1 Layer III frames


@dataclass(frozen=True)
class _Decoded:
    samples: np.ndarray  # (frames, channels) float32: the first frames, as many as the output needs
    sample_rate: int
    frames: int  # all frames decoded, kept or not
    subtype: str


def _truncated_wav(data: bytes) -> bool:
    """libsndfile silently shortens a truncated WAV to the bytes present; its data chunk still says the
    size."""
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if data[pos : pos + 4] == b"data":
            return size != 0xFFFFFFFF and pos + 8 + size > len(data)  # 0xFFFFFFFF: streamed, size unknown
        pos += 8 + size + (size & 1)
    return False


def _truncated_ogg(data: bytes) -> bool:
    """libsndfile decodes a truncated Ogg stream without complaint; intact, it ends with a complete page
    flagged end-of-stream."""
    page = data.rfind(b"OggS")
    if page < 0 or page + 27 > len(data):
        return True
    segments = data[page + 26]
    end = page + 27 + segments + sum(data[page + 27 : page + 27 + segments])
    return end != len(data) or not data[page + 5] & 0x04


def _frames_to_keep(source_rate: int, options: AudioOptions) -> int | None:
    """Source frames needed for max_seconds of output, plus the resampling filter's reach past the cut so that
    the cut is not resampled as an edge (torchaudio's kernel reaches 6 periods of the lower rate; 8 to
    spare)."""
    if options.max_seconds is None:
        return None
    frames = math.ceil(options.max_seconds * source_rate)
    if options.sample_rate not in (None, source_rate):
        frames += math.ceil(8 * source_rate / min(source_rate, options.sample_rate))
    return frames


def _decode_audio(data: bytes, options: AudioOptions) -> _Decoded:
    """Decode every frame (so corruption anywhere is found) but keep in memory only those the output needs;
    at most decode.MAX_DECODED_SAMPLES samples are decoded (a longer clip is skipped as too_large)."""
    try:
        with open_audio(data) as f:
            keep_frames = _frames_to_keep(f.samplerate, options)
            blocks, kept, frames = [], 0, 0
            for block in audio_blocks(f):
                frames += len(block)
                if keep_frames is None or kept < keep_frames:
                    blocks.append(block)
                    kept += len(block)
            declared, file_format, sample_rate, subtype = f.frames, f.format, f.samplerate, f.subtype
    except DecodeError as err:
        reason = "too_large" if err.bomb else "decode_error"
        raise ItemError(reason, f"{err}{'; cut long clips with --max-seconds' if err.bomb else ''}") from None
    if frames == 0:
        raise ItemError("decode_error", "no audio frames")
    slack = max(declared * _MP3_SLACK_FRACTION, _MP3_SLACK_FRAMES) if file_format == "MP3" else 0
    if frames < declared - slack:
        raise ItemError("decode_error", f"truncated: decoded {frames} of {declared} frames")
    if (data.startswith(b"RIFF") and data[8:12] == b"WAVE" and _truncated_wav(data)) or (
        data.startswith(b"OggS") and _truncated_ogg(data)
    ):
        raise ItemError("decode_error", f"truncated {file_format} file")
    samples = np.concatenate(blocks)[:keep_frames]
    if not np.isfinite(samples).all():
        raise ItemError("decode_error", "non-finite samples (NaN or inf)")
    return _Decoded(samples, sample_rate, frames, subtype)


def _resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """torchaudio's windowed-sinc resampling at bounded cost (decode.resampling_rate)."""
    # Imported here so that image-only workers do not pay torch's import time (over a second).
    import torch
    import torchaudio.functional

    with _decode_errors():
        rate = resampling_rate(source_rate, target_rate)
        waveform = torch.from_numpy(np.ascontiguousarray(samples.T))
        return torchaudio.functional.resample(waveform, rate, target_rate).numpy().T


def encode_audio(data: bytes, options: AudioOptions) -> EncodedMedia:
    """Decode, mix down, resample, crop and re-encode one audio clip.

    Input: anything libsndfile reads (WAV, FLAC, Ogg Vorbis/Opus, MP3, AIFF...). options.mono averages the
    channels; options.sample_rate resamples (torchaudio's windowed-sinc resampler); options.max_seconds keeps
    the first max_seconds. Output: FLAC or WAV, 16-bit PCM, or 24-bit when the source has more than 16 bits
    per sample; samples are clipped to [-1, 1] first.

    Raises ItemError: empty_file, decode_error (unreadable, truncated, corrupt, zero frames, NaN or inf
    samples). A truncated FLAC makes libsndfile raise ("flac decoder lost sync"); truncated MP3 (with a
    Xing/Info header), WAV and Ogg files decode without error and are caught by checking the decoded frame
    count against the header's, the WAV data chunk's size and the Ogg end-of-stream page.
    """
    if not data:
        raise ItemError("empty_file", "0 bytes")
    decoded = _decode_audio(data, options)
    samples, rate = decoded.samples, decoded.sample_rate
    if options.mono and samples.shape[1] > 1:
        samples = samples.mean(axis=1, keepdims=True)
    if options.sample_rate not in (None, rate):
        samples, rate = _resample(samples, rate, options.sample_rate), options.sample_rate
    if options.max_seconds is not None:
        samples = samples[: round(options.max_seconds * rate)]
    subtype = "PCM_24" if decoded.subtype in _HIGH_RES_SUBTYPES else "PCM_16"
    out = io.BytesIO()
    sf.write(out, np.clip(samples, -1.0, 1.0), rate, subtype=subtype, format=options.audio_format.upper())
    meta = {
        "sample_rate": rate,
        "duration": round(len(samples) / rate, 4),
        "channels": samples.shape[1],
        "original_sample_rate": decoded.sample_rate,
        "original_duration": round(decoded.frames / decoded.sample_rate, 4),
    }
    return EncodedMedia(out.getvalue(), options.audio_format, meta)
