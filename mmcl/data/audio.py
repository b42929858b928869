"""Audio samples: decode with soundfile, mix to mono, crop, resample to the model's rate, repeat-pad.

soundfile (bundled libsndfile: FLAC, WAV, OGG, MP3) rather than torchaudio.load, which in torchaudio
2.9 needs TorchCodec and ffmpeg. The window is chosen and read at the file's own rate before
resampling, so a long recording is neither fully decoded nor fully resampled; the rate is checked and
resampling kept cheap as in the sharder (shards_tools.decode). The log-mel front end
lives in the model, so what leaves here is a float32 waveform [T] with T = sample_rate * clip_seconds.

Long clips (`model.audio.long_clips: average | fusion`): a recording is then handed over whole, up to
`max_seconds`, and a shorter one is padded with NaN (`MARKED_PAD`) to that length, so that the model
(mmcl.models.long_clips) knows each clip's true length from the one batched tensor.
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

# What pads a clip handed over whole (long_clips: average | fusion) up to max_seconds: no real sample of
# such a clip is NaN (load_clip zeroes any), so the model reads each clip's length from where NaN begins.
MARKED_PAD = float("nan")


def fit_length(wave: torch.Tensor, length: int, padding: str = "repeat") -> torch.Tensor:
    """Cut to `length` samples; a short clip is repeated until it is that long ("repeat", no silence),
    or, as CLAP's feature extractor pads it ("repeatpad"), repeated as often as it fits whole and then
    padded with zeros."""
    if wave.shape[-1] >= length:
        return wave[..., :length]
    if padding == "repeatpad":
        wave = wave.repeat(length // wave.shape[-1])
        return torch.nn.functional.pad(wave, (0, length - wave.shape[-1]))
    return wave.repeat(math.ceil(length / wave.shape[-1]))[:length]


def pad_marked(wave: torch.Tensor, length: int) -> torch.Tensor:
    """`wave` (at most `length` samples) padded with MARKED_PAD to `length`."""
    return torch.nn.functional.pad(wave, (0, length - wave.shape[-1]), value=MARKED_PAD)


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
    data: bytes,
    key: str,
    *,
    sample_rate: int,
    clip_seconds: float,
    rng: random.Random | None,
    max_seconds: float | None = None,
    padding: str = "repeat",
) -> torch.Tensor:
    """Audio bytes -> float32 mono waveform [round(sample_rate * clip_seconds)] at `sample_rate`, a short
    clip padded as `padding` says (see fit_length). With `max_seconds`, the clip is not cut to
    clip_seconds: up to max_seconds of it (a window chosen as `rng` says when it is longer), padded
    with MARKED_PAD to [round(sample_rate * max_seconds)]."""
    seconds = clip_seconds if max_seconds is None else max_seconds
    wave, rate = read_window(data, key, seconds, rng)
    tensor = torch.from_numpy(wave)
    if rate != sample_rate:
        try:
            source_rate = resampling_rate(rate, sample_rate)
        except DecodeError as err:
            raise BadSample(key, str(err)) from None
        tensor = torchaudio.functional.resample(tensor, source_rate, sample_rate)
    if max_seconds is not None:  # a NaN sample of the file itself would read as the clip's end
        tensor = tensor.masked_fill(tensor.isnan(), 0.0)[: round(sample_rate * max_seconds)]
        return pad_marked(tensor, round(sample_rate * max_seconds))
    return fit_length(tensor, round(sample_rate * clip_seconds), padding)


def audio_media(
    sample: dict,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    seed: int,
    *,
    sample_rate: int,
    clip_seconds: float,
    random_crop: bool,
    max_seconds: float | None = None,
) -> torch.Tensor:
    """The sample's audio as the model's input waveform [T]; the crop and `transform` seeded by `seed`.
    With `max_seconds`, the clip is handed over whole up to that length (see load_clip)."""
    key = sample["__key__"]
    ext = next((e for e in AUDIO_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample(key, f"no audio file (.{', .'.join(AUDIO_EXTENSIONS)})")
    rng = random.Random(seed) if random_crop else None
    wave = load_clip(
        sample[ext], key, sample_rate=sample_rate, clip_seconds=clip_seconds, rng=rng, max_seconds=max_seconds
    )
    return wave if transform is None else call_seeded(transform, wave, seed)
