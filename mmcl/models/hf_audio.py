"""Pretrained audio towers from Hugging Face transformers (`model.audio.tower: hf`).

The encoder is CLAP's HTSAT (from a ClapAudioModel, ClapAudioModelWithProjection or ClapModel folder),
AST, Whisper's encoder, or a wav2vec2/HuBERT-style encoder (an AutoModel on raw waveforms). It is fed
exactly what the encoder's own feature extractor makes, computed here in torch on the batched
waveform inside `forward` (on the model's device, in float32 even under mixed precision) rather
than per sample in the data pipeline; tests/test_hf_audio.py checks each family against its extractor.

Clip lengths. The data pipeline crops every recording to `clip_seconds` (a random window, seeded per
sample, in training: CLAP's "rand_trunc"; the centre in evaluation) and repeats a short one; that
length defaults to the longest clip the extractor takes (CLAP's max_length_s, Whisper's 30 s chunk,
AST's max_length frames). A shorter clip_seconds is padded here as the extractor pads a short clip.

transformers is imported only when such a tower is built: `pip install 'mmcl[hf]'`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmcl.errors import UsageError
from mmcl.models.config import AudioTowerConfig
from mmcl.models.hf_audio_settings import clip_limits, family_of
from mmcl.models.long_clips import unmark

KEY = "model.audio"
DB_FLOOR = 1e-10  # CLAP's mel_floor and min_value (-100 dB)
WHISPER_FLOOR = 1e-10
WHISPER_RANGE = 8.0  # log10 units kept below each clip's maximum
KALDI_PREEMPHASIS = 0.97
KALDI_LOW_HZ = 20.0
WAV2VEC2_EPS = 1e-7
FLOAT64_DEVICES = ("cpu", "cuda")  # where CLAP's features are computed in float64 (not MPS)


def require_transformers() -> Any:
    """The transformers module, or a UsageError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise UsageError(f"{KEY}.tower: hf needs Hugging Face transformers: pip install 'mmcl[hf]'") from None
    return transformers


# ------------------------------------------------------------------------------------ features
class ClapFeatures(nn.Module):
    """ClapFeatureExtractor: pad a short clip to max_length_s as its `padding` says, a centred STFT
    (periodic Hann, reflect padding), power, its mel filters (Slaney for rand_trunc, HTK for fusion),
    dB. [B, T] -> [B, 1, frames, mels], or 4 copies for a fusion model; `fusion` makes a fusion model's
    input for clips of any length (long_clips: fusion).

    Computed in float64 like the extractor (numpy) where the device has it: the dB of quiet bins next
    to loud ones are sensitive to rounding, and float32 leaves them up to 4e-5 dB off."""

    def __init__(self, extractor: Any, fusion: bool) -> None:
        super().__init__()
        filters = extractor.mel_filters if fusion else extractor.mel_filters_slaney
        window = torch.hann_window(extractor.fft_window_size, dtype=torch.float64)
        self.register_buffer("filters", torch.as_tensor(filters, dtype=torch.float64), persistent=False)
        self.register_buffer("window", window, persistent=False)
        self.n_fft, self.hop = extractor.fft_window_size, extractor.hop_length
        self.max_samples, self.padding = int(extractor.nb_max_samples), extractor.padding
        self.copies = 4 if fusion else 1

    def pad(self, wave: Tensor) -> Tensor:
        """The extractor's "repeat", "repeatpad" or "pad" of a clip shorter than max_length_s."""
        length = wave.shape[-1]
        if length >= self.max_samples:
            return wave
        repeats = self.max_samples // length
        if self.padding == "repeat":
            wave = wave.repeat(1, repeats + 1)[:, : self.max_samples]
        elif self.padding == "repeatpad":
            wave = wave.repeat(1, repeats)
        return F.pad(wave, (0, self.max_samples - wave.shape[-1]))

    def mel(self, wave: Tensor) -> Tensor:
        """[B, T] -> dB mel [B, frames, mels] (float32), T as it is."""
        dtype = torch.float64 if wave.device.type in FLOAT64_DEVICES else torch.float32
        window, filters = self.window.to(dtype), self.filters.to(dtype)
        spec = torch.stft(
            wave.to(dtype), self.n_fft, self.hop, window=window, pad_mode="reflect", return_complex=True
        )
        mel = (spec.abs().pow(2).transpose(1, 2) @ filters).clamp(min=DB_FLOOR)
        return (10.0 * mel.log10()).float()

    def forward(self, wave: Tensor) -> Tensor:
        return self.mel(self.pad(wave)).unsqueeze(1).expand(-1, self.copies, -1, -1)

    def fusion(self, wave: Tensor, random: bool) -> tuple[Tensor, Tensor]:
        """A fusion model's input for NaN-padded clips of any length [B, T] (mmcl.models.long_clips):
        features [B, 4, frames, mels] and is_longer [B, 1], as ClapFeatureExtractor(truncation="fusion")
        makes them. A clip longer than max_length_s: its whole mel squeezed to the window (bilinear), then
        3 windows of it, one from each third of the possible starts, chosen at random when `random`
        (training), else the middle start of each third (the extractor always draws them). A shorter clip:
        padded, 4 copies, not longer. In training, when no clip of the batch is longer, a random one is
        marked longer, as the extractor does, so the fusion branch takes part in every step."""
        wave, lengths = unmark(wave)
        chunk = self.max_samples // self.hop + 1
        features, longer = [], []
        for index, length in enumerate(lengths):
            clip = wave[index : index + 1, :length]
            if length <= self.max_samples:
                features.append(self(clip)[0])
                longer.append(False)
                continue
            mel = self.mel(clip)[0]
            total = mel.shape[0]
            if total == chunk:  # longer by less than a hop: the whole clip is one window
                features.append(mel.expand(4, -1, -1))
                longer.append(False)
                continue
            starts = [part.tolist() or [0] for part in np.array_split(np.arange(total - chunk + 1), 3)]
            if random:
                starts = [part[int(torch.randint(len(part), ()))] for part in starts]
            else:
                starts = [part[len(part) // 2] for part in starts]
            squeezed = F.interpolate(
                mel[None, None], size=[chunk, mel.shape[1]], mode="bilinear", align_corners=False
            )
            features.append(torch.stack([squeezed[0, 0], *(mel[s : s + chunk] for s in starts)]))
            longer.append(True)
        is_longer = torch.tensor(longer, device=wave.device)[:, None]
        if random and not is_longer.any():
            is_longer[int(torch.randint(len(lengths), ()))] = True
        return torch.stack(features), is_longer


class WhisperFeatures(nn.Module):
    """WhisperFeatureExtractor: zero-pad to the 30 s chunk (chunk_length), log10 mel of a centred STFT
    without its last frame, floored 8 below each clip's maximum, scaled by (x + 4) / 4.
    [B, T] -> [B, mels, frames]."""

    def __init__(self, extractor: Any) -> None:
        super().__init__()
        self.register_buffer(
            "filters", torch.as_tensor(extractor.mel_filters, dtype=torch.float32).T, persistent=False
        )
        self.register_buffer("window", torch.hann_window(extractor.n_fft), persistent=False)
        self.n_fft, self.hop, self.n_samples = extractor.n_fft, extractor.hop_length, extractor.n_samples

    def forward(self, wave: Tensor) -> Tensor:
        wave = F.pad(wave, (0, self.n_samples - wave.shape[-1]))
        spec = torch.stft(wave, self.n_fft, self.hop, window=self.window, return_complex=True)
        log_spec = (self.filters @ spec[..., :-1].abs().pow(2)).clamp(min=WHISPER_FLOOR).log10()
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - WHISPER_RANGE)
        return (log_spec + 4.0) / 4.0


class KaldiFbankFeatures(nn.Module):
    """ASTFeatureExtractor: torchaudio.compliance.kaldi.fbank with its defaults (25 ms frames every
    10 ms, whole frames only, DC removal, pre-emphasis 0.97, symmetric Hanning window, FFT size rounded
    up to a power of two, power, kaldi mel banks from 20 Hz, log), batched here; frames zero-padded to
    max_length, then (x - mean) / (2 std). [B, T] -> [B, max_length, mels]."""

    def __init__(self, extractor: Any) -> None:
        super().__init__()
        from torchaudio.compliance.kaldi import get_mel_banks

        rate = extractor.sampling_rate
        self.frame, self.shift = int(rate * 0.025), int(rate * 0.010)
        self.fft = 1 << (self.frame - 1).bit_length()
        banks, _ = get_mel_banks(
            extractor.num_mel_bins, self.fft, float(rate), KALDI_LOW_HZ, 0.0, 100.0, -500.0, 1.0
        )
        banks = F.pad(banks, (0, 1))  # [mels, fft // 2 + 1]: kaldi drops the Nyquist bin
        self.register_buffer("banks", banks.T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(self.frame, periodic=False), persistent=False)
        self.max_length = extractor.max_length
        self.mean, self.std = extractor.mean, extractor.std
        self.normalize = extractor.do_normalize

    def forward(self, wave: Tensor) -> Tensor:
        frames = wave.unfold(-1, self.frame, self.shift)  # [B, frames, frame]
        frames = frames - frames.mean(dim=-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - KALDI_PREEMPHASIS * previous) * self.window
        power = torch.fft.rfft(frames, n=self.fft).abs().pow(2)
        fbank = (power @ self.banks).clamp(min=torch.finfo(torch.float32).eps).log()
        missing = self.max_length - fbank.shape[1]
        fbank = F.pad(fbank, (0, 0, 0, missing)) if missing > 0 else fbank[:, : self.max_length]
        return (fbank - self.mean) / (self.std * 2) if self.normalize else fbank


class WaveformFeatures(nn.Module):
    """Wav2Vec2FeatureExtractor: the waveform itself, zero-mean unit-variance per clip when the
    extractor's do_normalize says so. [B, T] -> [B, T]."""

    def __init__(self, extractor: Any) -> None:
        super().__init__()
        self.normalize = extractor.do_normalize

    def forward(self, wave: Tensor) -> Tensor:
        if not self.normalize:
            return wave
        mean = wave.mean(dim=-1, keepdim=True)
        var = wave.var(dim=-1, keepdim=True, unbiased=False)
        return (wave - mean) / torch.sqrt(var + WAV2VEC2_EPS)


# --------------------------------------------------------------------------------------- tower
class HFAudioTower(nn.Module):
    """Waveform [B, clip_samples] -> embedding [B, embed_dim] (unnormalised): the family's features,
    the pretrained encoder, pooling over time, and a linear projection (`proj`) to embed_dim, or the
    projection given (a ClapModel's own, mmcl.models.hf_clap). With long_clips "fusion" (CLAP fusion
    models) it takes NaN-padded whole clips [B, input_samples] (mmcl.models.long_clips)."""

    def __init__(
        self,
        encoder: nn.Module,
        features: nn.Module,
        *,
        family: str,
        pooling: str,
        width: int,
        embed_dim: int,
        sample_rate: int,
        clip_samples: int,
        valid_positions: int | None = None,
        proj: nn.Module | None = None,
        long_clips: str = "crop",
        input_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.features = features
        self.family = family
        self.pooling = pooling
        self.sample_rate = sample_rate
        self.clip_samples = clip_samples
        self.valid_positions = valid_positions  # Whisper: encoder positions covering the clip
        self.input_name = "input_values" if family in ("ast", "wav2vec2") else "input_features"
        self.proj = nn.Linear(width, embed_dim) if proj is None else proj
        self.long_clips = long_clips  # "fusion": whole clips, CLAP's fusion input; else one window
        self.input_samples = input_samples or clip_samples

    def encoder_inputs(self, waveform: Tensor) -> dict[str, Tensor]:
        """The keyword arguments the encoder's forward takes, as its feature extractor would give them."""
        if waveform.dim() != 2 or waveform.shape[1] != self.input_samples:
            seconds = "clip_seconds" if self.long_clips != "fusion" else "max_seconds, NaN-padded"
            raise ValueError(
                f"audio tower expects mono waveforms [batch, {self.input_samples}] ({seconds} x "
                f"sample_rate), got {list(waveform.shape)}; crop/pad with model.media_transform(train)"
            )
        # STFTs and logs are not safe in half precision: opt out of any surrounding autocast.
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            if self.long_clips == "fusion":
                features, is_longer = self.features.fusion(waveform.float(), random=self.training)
                return {self.input_name: features, "is_longer": is_longer}
            inputs = {self.input_name: self.features(waveform.float())}
        if self.family == "clap" and getattr(self.encoder.config, "enable_fusion", False):
            inputs["is_longer"] = torch.zeros(len(waveform), 1, dtype=torch.bool, device=waveform.device)
        return inputs

    def pooled(self, waveform: Tensor) -> Tensor:
        """The encoder's output pooled over time: [B, width]."""
        out = self.encoder(**self.encoder_inputs(waveform))
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if hidden.dim() == 4:  # CLAP: [B, channels, freq, time]
            return hidden.flatten(2).mean(dim=-1)
        return hidden[:, : self.valid_positions].mean(dim=1)

    def forward(self, waveform: Tensor) -> Tensor:
        return self.proj(self.pooled(waveform))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's layers in backward, through transformers' own switch. CLAP's class
        declines gradient_checkpointing_enable (for its text model), but its audio stages support it."""
        func = partial(checkpoint, use_reentrant=False)
        self.encoder._set_gradient_checkpointing(enable=enable, gradient_checkpointing_func=func)


def lockable_audio_part(audio: nn.Module) -> nn.Module:
    """What freeze_media locks in an audio tower: a transformers tower's encoder (its projection, new on
    top of pretrained weights, keeps training, as for pretrained text towers), else the whole tower."""
    return audio.encoder if isinstance(audio, HFAudioTower) else audio


# --------------------------------------------------------------------------------------- build
def load_feature_extractor(features: dict[str, Any]) -> Any:
    """The transformers feature extractor that `features` (preprocessor_config.json) describes."""
    transformers = require_transformers()
    return getattr(transformers, features["feature_extractor_type"]).from_dict(dict(features))


def load_encoder(name: str | None, config: dict[str, Any]) -> nn.Module:
    """The audio encoder: pretrained from `name` (a folder or hub name), or fresh from `config` when
    `name` is None (a checkpoint's tower, whose weights are loaded afterwards). ClapModel and Whisper
    folders give their audio model / encoder."""
    transformers = require_transformers()
    model_type = config["model_type"]
    if name is None:
        hf_config = transformers.AutoConfig.for_model(**config)
        if model_type == "clap":
            return transformers.ClapAudioModel(hf_config.audio_config)
        if model_type == "clap_audio_model":
            return transformers.ClapAudioModel(hf_config)
        if model_type == "whisper":
            return transformers.WhisperModel(hf_config).get_encoder()
        return transformers.AutoModel.from_config(hf_config)
    model_class = transformers.AutoModel
    if model_type == "clap_audio_model":  # not in AutoModel's table
        with_projection = "ClapAudioModelWithProjection" in (config.get("architectures") or [])
        model_class = getattr(transformers, "ClapAudioModel" + ("WithProjection" if with_projection else ""))
    try:  # in float32 whatever the checkpoint was saved in
        model, info = model_class.from_pretrained(name, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise UsageError(f"{KEY}.hf_model={name!r}: cannot load the encoder ({err})") from None
    if info["missing_keys"]:  # transformers only warns, and leaves them random
        missing = sorted(info["missing_keys"])
        raise UsageError(
            f"{KEY}.hf_model={name!r}: its weights lack {len(missing)} tensors of the "
            f"{type(model).__name__} its config.json describes (e.g. {missing[0]}); re-save the model"
        )
    if model_type == "whisper":
        return model.get_encoder()
    return model.audio_model if model_type.startswith("clap") and hasattr(model, "audio_model") else model


def build_hf_audio_tower(cfg: AudioTowerConfig, embed_dim: int, pretrained: bool = True) -> HFAudioTower:
    """The tower `cfg` (tower: hf, resolved by the config) describes, projecting to `embed_dim`; the
    encoder's weights come from cfg.hf_model when `pretrained`, else they are fresh (from hf_config)."""
    family = family_of(cfg.hf_features)
    extractor = load_feature_extractor(cfg.hf_features)
    encoder = load_encoder(cfg.hf_model if pretrained else None, cfg.hf_config)
    config = encoder.config
    valid_positions = None
    if family == "clap":
        fusion = bool(getattr(config, "enable_fusion", False))
        if fusion != (extractor.truncation == "fusion"):
            raise UsageError(
                f"{KEY}.hf_features: truncation={extractor.truncation!r} does not fit a CLAP model with "
                f"enable_fusion={fusion} (fusion models take 'fusion', others 'rand_trunc')"
            )
        features, width = ClapFeatures(extractor, fusion), encoder.audio_encoder.num_features
        if fusion and cfg.long_clips != "fusion":
            freeze_fusion_branch(encoder)
    elif family == "whisper":
        features, width = WhisperFeatures(extractor), config.d_model
        frames = cfg.clip_samples // extractor.hop_length
        valid_positions = math.ceil(frames / 2)  # the encoder's second conv has stride 2
    elif family == "ast":
        features, width = KaldiFbankFeatures(extractor), config.hidden_size
    else:
        features, width = WaveformFeatures(extractor), config.hidden_size
    rate, _ = clip_limits(cfg.hf_features)
    if extractor.sampling_rate != rate:  # the config's reading of the file disagrees with transformers'
        raise UsageError(f"{KEY}.hf_features: sampling_rate {extractor.sampling_rate} != {rate}")
    pooling = cfg.hf_pooling
    if pooling == "auto":
        pooling = "pooler" if family in ("clap", "ast") else "mean"
    return HFAudioTower(
        encoder,
        features,
        family=family,
        pooling=pooling,
        width=width,
        embed_dim=embed_dim,
        sample_rate=cfg.sample_rate,
        clip_samples=cfg.clip_samples,
        valid_positions=valid_positions,
        long_clips="fusion" if cfg.long_clips == "fusion" else "crop",
        input_samples=round(cfg.max_seconds * cfg.sample_rate) if cfg.long_clips == "fusion" else None,
    )


def freeze_fusion_branch(encoder: nn.Module) -> None:
    """Freeze a CLAP fusion model's branch for clips longer than max_length_s when it never runs (clips
    are cropped: long_clips is not fusion), so that DDP does not wait for its gradients."""
    patch_embed = encoder.audio_encoder.patch_embed
    for part in (patch_embed.fusion_model, patch_embed.mel_conv2d):
        part.requires_grad_(False)
