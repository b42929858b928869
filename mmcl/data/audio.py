"""Audio samples: decode with soundfile, mix to mono, crop, resample to the model's rate, repeat-pad.

soundfile (bundled libsndfile: FLAC, WAV, OGG, MP3) rather than torchaudio.load, which in torchaudio
2.9 needs TorchCodec and ffmpeg. The window is chosen and read at the file's own rate before
resampling, so a long recording is neither fully decoded nor fully resampled; the rate is checked and
resampling kept cheap as in the sharder (shards_tools.decode). The log-mel front end
lives in the model, so what leaves here is a float32 waveform [T] with T = sample_rate * clip_seconds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import soundfile
import torch
import torchaudio.functional

from mmcl.data.common import BadSample, call_seeded
from shards_tools.decode import DecodeError, audio_blocks, open_audio, resampling_rate
from shards_tools.shard_format import AUDIO_EXTENSIONS


def fit_length(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Cut to `length` samples, or repeat a short clip until it is that long (no silent padding)."""
    if wave.shape[-1] >= length:
        return wave[..., :length]
    return wave.repeat(math.ceil(length / wave.shape[-1]))[:length]


def read_window(data: bytes, key: str, seconds: float, rng: random.Random | None) -> tuple[np.ndarray, int]:
    """Decode a `seconds` window of a clip as mono float32 at its own rate (the whole clip if shorter).

    The window is random when `rng` is given, else centred. Channels are mixed down block by block, so
    memory stays that of the mono window whatever the header claims. Raises BadSample for undecodable,
    empty or truncated audio, and for a sample rate out of range (shards_tools.decode).
    """
    try:
        with open_audio(data) as handle:
            rate, frames = handle.samplerate, handle.frames
            want = math.ceil(seconds * rate)
            excess = frames - want
            start = 0 if excess <= 0 else (rng.randint(0, excess) if rng else excess // 2)
            if start:
                handle.seek(start)
            count = min(want, frames) if frames > 0 else want
            blocks = [block.mean(axis=1) for block in audio_blocks(handle, count)]
    except DecodeError as err:
        raise BadSample(key, str(err)) from None
    except (soundfile.SoundFileError, ValueError, OSError) as err:
        raise BadSample(key, f"undecodable audio ({err})") from err
    wave = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    if len(wave) == 0:
        raise BadSample(key, "audio has no frames")
    if frames > 0 and len(wave) < count:
        raise BadSample(key, f"truncated audio: {len(wave)} of {count} frames readable")
    return np.ascontiguousarray(wave, dtype=np.float32), rate


def load_clip(
    data: bytes, key: str, *, sample_rate: int, clip_seconds: float, rng: random.Random | None
) -> torch.Tensor:
    """Audio bytes -> float32 mono waveform [round(sample_rate * clip_seconds)] at `sample_rate`."""
    wave, rate = read_window(data, key, clip_seconds, rng)
    tensor = torch.from_numpy(wave)
    if rate != sample_rate:
        try:
            source_rate = resampling_rate(rate, sample_rate)
        except DecodeError as err:
            raise BadSample(key, str(err)) from None
        tensor = torchaudio.functional.resample(tensor, source_rate, sample_rate)
    return fit_length(tensor, round(sample_rate * clip_seconds))


def audio_media(
    sample: dict,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    seed: int,
    *,
    sample_rate: int,
    clip_seconds: float,
    random_crop: bool,
) -> torch.Tensor:
    """The sample's audio as the model's input waveform [T]; the crop and `transform` seeded by `seed`."""
    key = sample["__key__"]
    ext = next((e for e in AUDIO_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample(key, f"no audio file (.{', .'.join(AUDIO_EXTENSIONS)})")
    rng = random.Random(seed) if random_crop else None
    wave = load_clip(sample[ext], key, sample_rate=sample_rate, clip_seconds=clip_seconds, rng=rng)
    return wave if transform is None else call_seeded(transform, wave, seed)
