"""Audio towers: waveform -> log-mel spectrogram -> one embedding per clip.

The front end lives inside the model (not in the data pipeline) so that it runs on the model's device,
batched, and so a checkpoint fully defines how audio is featurised. Input is a mono waveform batch
[B, clip_samples] at the configured sample rate (see `ClipCrop` for making clips that length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchaudio.transforms import FrequencyMasking, MelSpectrogram, TimeMasking

from mmcl.models.config import AudioTowerConfig, SpecAugmentConfig

LOG_EPS = 1e-6  # keeps log() finite on digital silence


class ClipCrop(nn.Module):
    """Crop or zero-pad a waveform [..., T] to exactly `num_samples`.

    Training takes a random window of a long clip (augmentation); evaluation takes the centre, so
    scores are deterministic. Short clips are padded with silence at the end.
    """

    def __init__(self, num_samples: int, random: bool) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.random = random

    def forward(self, waveform: Tensor) -> Tensor:
        excess = waveform.shape[-1] - self.num_samples
        if excess < 0:
            return F.pad(waveform, (0, -excess))
        start = int(torch.randint(0, excess + 1, ())) if self.random else excess // 2
        return waveform[..., start : start + self.num_samples]


class LogMel(nn.Module):
    """Waveform [B, T] -> log-mel spectrogram [B, 1, n_mels, frames], always computed in float32."""

    def __init__(self, cfg: AudioTowerConfig) -> None:
        super().__init__()
        self.mel = MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
            f_min=cfg.f_min,
            f_max=cfg.f_max,
        )

    def forward(self, waveform: Tensor) -> Tensor:
        # The STFT and the log are not safe in half precision: opt out of any surrounding autocast.
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            mel = self.mel(waveform.float())
        return torch.log(mel + LOG_EPS).unsqueeze(1)


class SpecAugment(nn.Module):
    """Random frequency and time masks (Park et al. 2019), drawn per clip; identity in eval mode."""

    def __init__(self, cfg: SpecAugmentConfig) -> None:
        super().__init__()
        self.freq_masks = cfg.freq_masks
        self.time_masks = cfg.time_masks
        self.freq = FrequencyMasking(cfg.freq_mask_width, iid_masks=True)
        self.time = TimeMasking(cfg.time_mask_width, iid_masks=True)

    def forward(self, spec: Tensor) -> Tensor:
        if not self.training:
            return spec
        for _ in range(self.freq_masks):
            spec = self.freq(spec)
        for _ in range(self.time_masks):
            spec = self.time(spec)
        return spec


class SpectrogramTransformer(nn.Module):
    """ViT over the spectrogram (AST-style): non-overlapping (mel x time) patches, a class token,
    learned positions, pre-norm transformer layers, and a linear projection of the class token."""

    def __init__(self, cfg: AudioTowerConfig, embed_dim: int) -> None:
        super().__init__()
        pf, pt = cfg.patch_size
        self.num_patches = (cfg.n_mels // pf) * (cfg.n_frames // pt)
        self.patch_embed = nn.Conv2d(1, cfg.width, kernel_size=(pf, pt), stride=(pf, pt))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches + 1, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.width,
                cfg.heads,
                dim_feedforward=int(cfg.width * cfg.mlp_ratio),
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(cfg.layers)
        )
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.grad_checkpointing = False

    def forward(self, spec: Tensor) -> Tensor:
        x = self.patch_embed(spec).flatten(2).transpose(1, 2)  # [B, patches, width]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.proj(self.ln_post(x[:, 0]))


class SpectrogramCNN(nn.Module):
    """A small CNN: conv-bn-relu-pool blocks, then mean over frequency and mean+max over time (the
    max keeps short events that a plain average would wash out), then a linear projection."""

    def __init__(self, cfg: AudioTowerConfig, embed_dim: int) -> None:
        super().__init__()
        blocks, channels = [], 1
        for out in cfg.cnn_channels:
            blocks += [
                nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Linear(channels, embed_dim)

    def forward(self, spec: Tensor) -> Tensor:
        x = self.blocks(spec).mean(dim=2)  # [B, C, T']
        return self.proj(x.mean(dim=-1) + x.amax(dim=-1))


def build_audio_tower(cfg: AudioTowerConfig, embed_dim: int, pretrained: bool = True) -> nn.Module:
    """The tower `cfg.tower` names: mmcl's own, or (hf) a transformers encoder, started from its
    pretrained weights when `pretrained` (else from its config alone, for a checkpoint's weights)."""
    if cfg.tower == "hf":
        from mmcl.models.hf_audio import build_hf_audio_tower  # imports transformers

        return build_hf_audio_tower(cfg, embed_dim, pretrained)
    return AudioTower(cfg, embed_dim)


class AudioTower(nn.Module):
    """Waveform [B, clip_samples] -> embedding [B, embed_dim] (unnormalised).

    Log-mel features are standardised per mel bin by a BatchNorm (learned, so no dataset statistics
    need computing first), then SpecAugment-ed in training, then encoded by the configured tower.
    """

    def __init__(self, cfg: AudioTowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.clip_samples = cfg.clip_samples
        self.sample_rate = cfg.sample_rate
        self.log_mel = LogMel(cfg)
        self.norm = nn.BatchNorm1d(cfg.n_mels)
        self.spec_augment = SpecAugment(cfg.spec_augment)
        encoders = {"spectrogram-transformer": SpectrogramTransformer, "cnn": SpectrogramCNN}
        self.encoder = encoders[cfg.tower](cfg, embed_dim)

    def spectrogram(self, waveform: Tensor) -> Tensor:
        """The normalised (and, in training, masked) log-mel input of the encoder: [B, 1, mels, frames]."""
        if waveform.dim() != 2 or waveform.shape[1] != self.clip_samples:
            raise ValueError(
                f"audio tower expects mono waveforms [batch, {self.clip_samples}] (clip_seconds x "
                f"sample_rate), got {list(waveform.shape)}; crop/pad with model.media_transform(train)"
            )
        spec = self.norm(self.log_mel(waveform).squeeze(1)).unsqueeze(1)
        return self.spec_augment(spec)

    def forward(self, waveform: Tensor) -> Tensor:
        return self.encoder(self.spectrogram(waveform))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer layers in backward. The CNN is not checkpointed: it is small, and
        recomputing its BatchNorms would update their running statistics twice per step."""
        if isinstance(self.encoder, SpectrogramTransformer):
            self.encoder.grad_checkpointing = enable
