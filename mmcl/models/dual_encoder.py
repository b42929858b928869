"""The one model interface of mmcl: a media tower and a text tower embedding into one space.

Training, losses and evaluation see only `DualEncoder`; the two implementations differ in where their
towers come from:

* `ImageTextEncoder` wraps an open_clip `CLIP`/`CustomTextCLIP` as `self.clip`, untouched, so that
  `self.clip.state_dict()` is exactly open_clip's and open_clip can load what mmcl trains.
* `AudioTextEncoder` pairs an mmcl `AudioTower` with an open_clip text tower (`self.text`, the module
  open_clip's `CustomTextCLIP` also keeps under `text`, so text weights move between the two).
  `ClapEncoder` (mmcl.models.hf_clap) is one whose towers are a transformers ClapModel's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from open_clip import CustomTextCLIP, get_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import Tensor, nn

from mmcl.models.audio_tower import AudioTower, ClipCrop
from mmcl.models.hf_audio import lockable_audio_part
from mmcl.models.hf_text import lockable_text_part
from mmcl.models.long_clips import average_windows

Tower = Literal["media", "text"]
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on exp(logit_scale): beyond it training turns unstable
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0


class DualEncoder(nn.Module):
    """Media + text towers, a learned temperature, and (for sigmoid losses) a learned logit bias.

    Subclasses provide the towers; this class provides the shared contract: normalised features,
    `forward` returning what a contrastive loss needs, LiT-style freezing and gradient checkpointing.
    """

    modality: str

    def __init__(self, tokenizer: Callable[..., Tensor], embed_dim: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim
        self.frozen: set[Tower] = set()

    def encode_media(self, media: Tensor, normalize: bool = True) -> Tensor:
        """Images [B, 3, H, W] or waveforms [B, samples] -> features [B, embed_dim]."""
        raise NotImplementedError

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        """Token ids [B, context_length] (from `self.tokenizer`) -> features [B, embed_dim]."""
        raise NotImplementedError

    def media_transform(self, train: bool) -> Callable[[Any], Tensor]:
        """Per-sample preprocessing for the data pipeline (augmenting when `train`)."""
        raise NotImplementedError

    def tower_parts(self, tower: Tower) -> list[nn.Module | nn.Parameter]:
        """The modules and loose parameters that make up `tower` (what freezing acts on)."""
        raise NotImplementedError

    def logit_params(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        """The log temperature and the logit bias (None unless the model was built for SigLIP)."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward in both towers (less memory, ~30% more compute)."""
        raise NotImplementedError

    def export_state_dict(self, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The weights to publish: open_clip's layout for images, mmcl's own for audio.

        `state` is this module's full state dict when it was gathered elsewhere (accelerate's
        `get_state_dict` under FSDP/DeepSpeed); by default the module's own."""
        raise NotImplementedError

    def save_model_files(self, folder: Path) -> bool:
        """Write into `folder` the files besides the weights that rebuilding this model takes (a whole
        transformers model's config, processor and tokenizer: mmcl.models.hf_clap); whether it wrote any.
        Most models are rebuilt from their config alone and write nothing."""
        return False

    def forward(self, media: Tensor, tokens: Tensor) -> dict[str, Tensor | None]:
        """Normalised features of both towers, exp(logit_scale) capped at 100, and the logit bias."""
        logit_scale, logit_bias = self.logit_params()
        return {
            "media_features": self.encode_media(media),
            "text_features": self.encode_text(tokens),
            "logit_scale": logit_scale.exp().clamp(max=MAX_LOGIT_SCALE),
            "logit_bias": logit_bias,
        }

    def freeze(self, tower: Tower) -> None:
        """Lock `tower` (LiT): no gradients, and eval mode even when the model is put in training mode,
        so its BatchNorm statistics and dropout stay fixed too."""
        for part in self.tower_parts(tower):
            for param in [part] if isinstance(part, nn.Parameter) else part.parameters():
                param.requires_grad_(False)
        self.frozen.add(tower)
        self.train(self.training)

    def _tower_modules(self, tower: Tower) -> Iterator[nn.Module]:
        return (part for part in self.tower_parts(tower) if isinstance(part, nn.Module))

    def train(self, mode: bool = True) -> DualEncoder:
        """Like nn.Module.train, but frozen towers stay in eval mode."""
        super().train(mode)
        for tower in self.frozen:
            for module in self._tower_modules(tower):
                module.eval()
        return self


class ImageTextEncoder(DualEncoder):
    """An open_clip image-text model behind the DualEncoder interface."""

    modality = "image"

    def __init__(self, clip: nn.Module, tokenizer: Callable[..., Tensor], embed_dim: int) -> None:
        super().__init__(tokenizer, embed_dim)
        self.clip = clip

    def encode_media(self, media: Tensor, normalize: bool = True) -> Tensor:
        return self.clip.encode_image(media, normalize=normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def media_transform(self, train: bool) -> Callable[[Any], Tensor]:
        """open_clip's transform for this model: PIL image -> normalised tensor [3, H, W]
        (random resized crop when `train`, resize + centre crop otherwise)."""
        cfg = PreprocessCfg(**get_model_preprocess_cfg(self.clip))
        return image_transform_v2(cfg, is_train=train)

    def tower_parts(self, tower: Tower) -> list[nn.Module | nn.Parameter]:
        if tower == "media":
            return [self.clip.visual]
        if isinstance(self.clip, CustomTextCLIP):
            return [lockable_text_part(self.clip.text)]
        # open_clip's CLIP keeps the text tower's pieces as its own attributes.
        names = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        return [part for name in names if (part := getattr(self.clip, name)) is not None]

    def logit_params(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        return self.clip.logit_scale, self.clip.logit_bias

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    def export_state_dict(self, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        if state is None:
            return self.clip.state_dict()
        return {k.removeprefix("clip."): v for k, v in state.items() if k.startswith("clip.")}


class AudioTextEncoder(DualEncoder):
    """An mmcl audio tower and an open_clip text tower (CLAP-style)."""

    modality = "audio"

    def __init__(
        self,
        audio: AudioTower,
        text: nn.Module,
        tokenizer: Callable[..., Tensor],
        embed_dim: int,
        init_logit_scale: float = CLIP_INIT_LOGIT_SCALE,
        init_logit_bias: float | None = None,
        long_clips: str = "crop",
        max_samples: int | None = None,
    ) -> None:
        super().__init__(tokenizer, embed_dim)
        self.audio = audio
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(init_logit_bias))
        # recordings longer than the tower's window (mmcl.models.long_clips): with average or fusion the
        # model takes NaN-padded whole clips [B, max_samples]
        self.long_clips = long_clips
        self.max_samples = max_samples if long_clips != "crop" else None

    def encode_media(self, media: Tensor, normalize: bool = True) -> Tensor:
        if self.long_clips == "average":
            features = average_windows(self.audio, media, self.audio.clip_samples)
        else:
            features = self.audio(media)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def media_transform(self, train: bool) -> Callable[[Any], Tensor]:
        """Crop/pad a mono waveform tensor [samples] at the model's sample rate to the clip length
        (a random window when `train`, the centre otherwise)."""
        return ClipCrop(self.audio.clip_samples, random=train)

    def tower_parts(self, tower: Tower) -> list[nn.Module | nn.Parameter]:
        return [lockable_audio_part(self.audio) if tower == "media" else lockable_text_part(self.text)]

    def logit_params(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        return self.logit_scale, self.logit_bias

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.audio.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def export_state_dict(self, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        return self.state_dict() if state is None else state
