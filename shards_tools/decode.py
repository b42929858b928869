"""Open media nobody vetted, the same way in the sharder, the training loader, the evaluator and `verify`.

Images: only the formats on IMAGE_FORMATS are opened (Pillow would hand EPS to Ghostscript and knows dozens
of rarely used formats), and an image of more than Pillow's MAX_IMAGE_PIXELS is a decompression bomb, refused
before its pixels are decoded.

Audio: a sample rate outside [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE] is refused; samples are decoded in blocks
of bounded size whatever the header claims (frames, channels), and at most MAX_DECODED_SAMPLES of them.
Resampling uses torchaudio's windowed sinc, whose kernel grows with rate / gcd(rate, target): 44,101 Hz to
16 kHz would allocate ~5 GiB. `resampling_rate` picks what the source is resampled from: its own rate when
that is cheap, else the nearest round rate within 0.1 % (a pitch change under 2 cents, inaudible), else the
clip is refused.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator

import numpy as np
import soundfile
from PIL import Image

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO, as phones write them
Image.init()  # register every plugin, so that naming formats does not depend on what was imported before
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 768_000
MAX_DECODED_SAMPLES = 1 << 26  # 64M samples (256 MiB as float32): 23 minutes of 48 kHz mono
MAX_RESAMPLE_KERNEL = 1 << 20  # elements of torchaudio's sinc kernel (standard rate pairs need < 150k)
_ROUNDING_STEPS = (10, 50, 100, 1000)
_MAX_RATE_CHANGE = 0.001
_BLOCK_SAMPLES = 1 << 20  # samples decoded per block, over all channels


class DecodeError(Exception):
    """Media that cannot, or must not, be decoded; `bomb` marks a decompression bomb (pixels or samples)."""

    def __init__(self, message: str, bomb: bool = False) -> None:
        super().__init__(message)
        self.bomb = bomb


def open_image(data: bytes) -> Image.Image:
    """A lazily decoded Pillow image of an allowed format and size; DecodeError otherwise. Decode it with
    `load()`, `convert()` or `draft()` as usual."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError(str(err), bomb=True) from None
    except Image.UnidentifiedImageError:
        raise DecodeError(
            f"cannot identify an image of an allowed format ({', '.join(IMAGE_FORMATS)})"
        ) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise DecodeError(f"{image.width}x{image.height} pixels exceeds the limit of {limit}", bomb=True)
    return image


def open_audio(data: bytes) -> soundfile.SoundFile:
    """An open SoundFile over the bytes, its sample rate checked; DecodeError if unreadable or out of
    range."""
    try:
        handle = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
        detail = err.error_string if isinstance(err, soundfile.LibsndfileError) else str(err)
        raise DecodeError(f"undecodable audio ({detail})") from None
    if not MIN_SAMPLE_RATE <= handle.samplerate <= MAX_SAMPLE_RATE:
        rate = handle.samplerate
        handle.close()
        raise DecodeError(f"sample rate {rate:,} Hz is outside {MIN_SAMPLE_RATE:,}-{MAX_SAMPLE_RATE:,} Hz")
    return handle


def audio_blocks(
    handle: soundfile.SoundFile, frames: int | None = None, max_samples: int = MAX_DECODED_SAMPLES
) -> Iterator[np.ndarray]:
    """float32 blocks [n, channels] of the next `frames` frames (None: to the end), each of at most
    _BLOCK_SAMPLES samples; DecodeError(bomb) once more than `max_samples` samples have been decoded."""
    channels = max(handle.channels, 1)
    block = max(1, _BLOCK_SAMPLES // channels)
    decoded = 0
    while frames is None or frames > 0:
        want = block if frames is None else min(block, frames)
        try:
            samples = handle.read(want, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, ValueError) as err:
            detail = err.error_string if isinstance(err, soundfile.LibsndfileError) else str(err)
            raise DecodeError(f"undecodable audio ({detail})") from None
        if not len(samples):
            return
        decoded += samples.size
        if decoded > max_samples:
            raise DecodeError(f"more than {max_samples:,} audio samples decoded", bomb=True)
        if frames is not None:
            frames -= len(samples)
        yield samples


def resample_cost(source_rate: int, target_rate: int) -> int:
    """Elements of torchaudio's sinc resampling kernel from `source_rate` to `target_rate` (its defaults:
    lowpass_filter_width 6, rolloff 0.99)."""
    gcd = math.gcd(source_rate, target_rate)
    source, target = source_rate // gcd, target_rate // gcd
    width = math.ceil(6 * source / (min(source, target) * 0.99))
    return target * (source + 2 * width)


def resampling_rate(source_rate: int, target_rate: int) -> int:
    """The rate to resample a `source_rate` clip from (see the module docstring); DecodeError if none."""
    if source_rate == target_rate or resample_cost(source_rate, target_rate) <= MAX_RESAMPLE_KERNEL:
        return source_rate
    for step in _ROUNDING_STEPS:
        rounded = round(source_rate / step) * step
        if (
            rounded > 0
            and abs(rounded - source_rate) <= _MAX_RATE_CHANGE * source_rate
            and resample_cost(rounded, target_rate) <= MAX_RESAMPLE_KERNEL
        ):
            return rounded
    raise DecodeError(
        f"sample rate {source_rate:,} Hz cannot be resampled to {target_rate:,} Hz at bounded cost "
        f"(no round rate within {_MAX_RATE_CHANGE:.1%} shares a large enough divisor with it)"
    )
