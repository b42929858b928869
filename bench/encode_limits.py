"""The "library limit" that shards_tools.encode is benchmarked against.

Each function is the least work its libraries need to make the same output as the sharder's default options,
with none of the sharder's checks (EXIF orientation, modes, bombs, truncation, NaN) or error handling.
"""

from __future__ import annotations

import io

import soundfile as sf
import torch
import torchaudio.functional
from PIL import Image

from shards_tools.encode import REDUCING_GAP, RESAMPLE


def image_limit(data: bytes, image_size: int, quality: int = 95) -> bytes:
    """Open, draft (reduced-size JPEG decode), convert to RGB, resize the largest side to image_size, save
    JPEG."""
    img = Image.open(io.BytesIO(data))
    scale = image_size / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img.draft("RGB", size)
    img = img.convert("RGB").resize(size, RESAMPLE, reducing_gap=REDUCING_GAP)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def audio_limit(data: bytes, sample_rate: int) -> bytes:
    """Read with soundfile, average to mono, resample with torchaudio, write 16-bit FLAC."""
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = torch.from_numpy(samples.mean(axis=1))[None]
    resampled = torchaudio.functional.resample(mono, rate, sample_rate)[0].numpy()
    out = io.BytesIO()
    sf.write(out, resampled, sample_rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()
