"""The typed model schema: which towers to build, from which weights, and what to freeze.

Every default lives here (not in the code that reads the config), unknown keys are errors, and each
validation message names the bad key and says how to fix it. This module imports no torch/open_clip so
that configs can be checked quickly and before anything expensive is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# open_clip silently skips a registered config that lacks any of these keys.
OPEN_CLIP_REQUIRED_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
# open_clip's default vision head width; a tower narrower than this has zero heads unless it is set.
OPEN_CLIP_DEFAULT_HEAD_WIDTH = 64
# open_clip's HFTextEncoder poolers (its max_pooler is left out: it masks the real tokens, not the padding).
HFPooler = Literal["mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler"]


def check_open_clip_config(cfg: dict[str, Any], where: str) -> None:
    """Raise ValueError if `cfg` is an open_clip model config that open_clip would skip or fail to build.

    `where` names the source (a config key or a file) so the message points at what to edit.
    """
    missing = [k for k in OPEN_CLIP_REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ValueError(
            f"{where} lacks {missing}: open_clip ignores a model config without all of "
            f"{list(OPEN_CLIP_REQUIRED_KEYS)}; add them (see configs/models/mmcl-micro-vit.json)"
        )
    vision = cfg["vision_cfg"]
    width, layers = vision.get("width"), vision.get("layers")
    if "timm_model_name" in vision or isinstance(layers, (list, tuple)) or width is None:
        return  # timm and ResNet towers size their heads differently
    head_width = vision.get("head_width", OPEN_CLIP_DEFAULT_HEAD_WIDTH)
    if width < head_width or width % head_width:
        raise ValueError(
            f"{where}: vision_cfg.width={width} is not a multiple of vision_cfg.head_width={head_width} "
            f"(open_clip's default is {OPEN_CLIP_DEFAULT_HEAD_WIDTH}); set vision_cfg.head_width to a "
            f"divisor of the width, e.g. {width // 2}"
        )


LongClips = Literal["crop", "average", "fusion"]  # see mmcl.models.long_clips
LONG_CLIP_MODES = get_args(LongClips)


class _Strict(BaseModel):
    """Base for all model config sections: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SpecAugmentConfig(_Strict):
    """SpecAugment masks on the log-mel input, applied only in training mode; 0 masks turns a kind off."""

    freq_masks: int = Field(2, ge=0, description="number of frequency masks per clip")
    freq_mask_width: int = Field(8, ge=1, description="largest frequency mask, in mel bins")
    time_masks: int = Field(2, ge=0, description="number of time masks per clip")
    time_mask_width: int = Field(40, ge=1, description="largest time mask, in spectrogram frames")


class AudioTowerConfig(_Strict):
    """The audio front end (waveform -> log-mel) and the tower that embeds the spectrogram.

    tower: hf instead takes a pretrained Hugging Face encoder and its own feature settings
    (mmcl.models.hf_audio); the log-mel, transformer, cnn and spec_augment keys do not apply to it.
    """

    tower: Literal["spectrogram-transformer", "cnn", "hf"] = "spectrogram-transformer"
    sample_rate: int = Field(16000, gt=0, description="Hz; the data pipeline resamples to this")
    clip_seconds: float = Field(10.0, gt=0, description="every clip is cropped/padded to this length")
    n_fft: int = Field(400, gt=0, description="STFT size (400 = 25 ms at 16 kHz)")
    hop_length: int = Field(160, gt=0, description="STFT hop (160 = 10 ms at 16 kHz)")
    n_mels: int = Field(64, gt=0)
    f_min: float = Field(0.0, ge=0)
    f_max: float | None = Field(None, gt=0, description="None: sample_rate / 2")
    patch_size: tuple[int, int] = Field((16, 16), description="transformer patches: (mel bins, frames)")
    width: int = Field(256, gt=0, description="transformer width")
    layers: int = Field(4, gt=0, description="transformer layers")
    heads: int = Field(4, gt=0, description="transformer attention heads")
    mlp_ratio: float = Field(4.0, gt=0)
    cnn_channels: tuple[int, ...] = Field(
        (32, 64, 128, 256), min_length=1, description="cnn: output channels of each conv-bn-relu-pool block"
    )
    spec_augment: SpecAugmentConfig = Field(default_factory=SpecAugmentConfig)
    hf_model: str | None = Field(
        None,
        description="hf: a save_pretrained folder or hub name (CLAP, AST, Whisper, wav2vec2/HuBERT); "
        "sample_rate and clip_seconds follow its feature extractor. None: hf_config with fresh weights",
    )
    hf_pooling: Literal["auto", "mean", "cls", "pooler"] = Field(
        "auto", description="hf: auto = the encoder's pooler output if it has one, else mean over time"
    )
    hf_config: dict[str, Any] | None = Field(
        None, description="hf: the encoder's config.json (filled from hf_model; kept in checkpoints)"
    )
    hf_features: dict[str, Any] | None = Field(
        None, description="hf: its preprocessor_config.json (filled from hf_model; kept in checkpoints)"
    )
    long_clips: LongClips = Field(
        "crop",
        description="recordings longer than clip_seconds: crop (one window: random in training, the centre "
        "in evaluation), average (the mean embedding of consecutive clip_seconds windows) or fusion "
        "(CLAP fusion models: the whole clip's mel and 3 windows of it); see mmcl.models.long_clips",
    )
    max_seconds: float = Field(
        30.0, gt=0, description="average / fusion: the longest stretch of a recording handed to the model"
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_hf(cls, data: Any) -> Any:
        """tower: hf reads the encoder's config and feature settings (cheap JSON files) up front."""
        if isinstance(data, dict) and data.get("tower") == "hf":
            from mmcl.models.hf_audio_settings import resolve_hf_audio

            return resolve_hf_audio(data)
        return data

    @property
    def clip_samples(self) -> int:
        """Waveform length, in samples, that the tower expects."""
        return round(self.sample_rate * self.clip_seconds)

    @property
    def n_frames(self) -> int:
        """Spectrogram frames of one clip (torchaudio's centred STFT)."""
        return self.clip_samples // self.hop_length + 1

    @property
    def fusion_model(self) -> bool:
        """Whether tower: hf is a CLAP model with a fusion branch (enable_fusion)."""
        config = self.hf_config or {}
        return bool(config.get("audio_config", config).get("enable_fusion", False))

    @model_validator(mode="after")
    def _check_long_clips(self) -> AudioTowerConfig:
        p = "model.audio"
        if self.long_clips != "crop" and self.max_seconds < self.clip_seconds:
            raise ValueError(
                f"{p}.max_seconds={self.max_seconds} is shorter than {p}.clip_seconds={self.clip_seconds}; "
                f"with long_clips: {self.long_clips} it must be at least one clip"
            )
        if self.long_clips == "fusion" and self.tower != "hf":
            raise ValueError(
                f"{p}.long_clips: fusion needs a CLAP fusion model (model.hf_clap, or tower: hf with a "
                f"CLAP model whose enable_fusion is true); use average for {self.tower} towers"
            )
        if self.long_clips == "fusion" and self.hf_config is not None and not self.fusion_model:
            raise ValueError(
                f"{p}.long_clips: fusion needs a CLAP model with enable_fusion: true; this one has none "
                "(e.g. laion/clap-htsat-fused has); use average or crop"
            )
        return self

    @model_validator(mode="after")
    def _check_shapes(self) -> AudioTowerConfig:
        p = "model.audio"
        hf_keys = [k for k in ("hf_model", "hf_config", "hf_features") if getattr(self, k) is not None]
        hf_keys += ["hf_pooling"] if "hf_pooling" in self.model_fields_set else []
        if self.tower == "hf" or hf_keys:
            if self.tower != "hf":
                raise ValueError(f"{p}.{hf_keys[0]} is set but {p}.tower is {self.tower!r}; set tower: hf")
            return self  # the encoder's own feature extractor fixes the front end
        if self.n_fft > self.clip_samples:
            raise ValueError(
                f"{p}.n_fft={self.n_fft} exceeds the clip ({self.clip_samples} samples); "
                f"lower n_fft or raise {p}.clip_seconds"
            )
        if self.hop_length > self.n_fft:
            raise ValueError(
                f"{p}.hop_length={self.hop_length} > n_fft={self.n_fft} skips samples; "
                f"set hop_length <= n_fft (typically n_fft // 2.5)"
            )
        nyquist = self.sample_rate / 2
        if self.f_max is not None and not self.f_min < self.f_max <= nyquist:
            raise ValueError(
                f"{p}.f_max={self.f_max} must lie in (f_min={self.f_min}, {nyquist}] "
                f"(half of sample_rate); lower it or set it to null"
            )
        if self.n_mels > self.n_fft // 2 + 1:
            raise ValueError(
                f"{p}.n_mels={self.n_mels} exceeds the {self.n_fft // 2 + 1} STFT bins of "
                f"n_fft={self.n_fft}, leaving empty mel filters; lower n_mels or raise n_fft"
            )
        aug = self.spec_augment
        if aug.freq_masks and aug.freq_mask_width >= self.n_mels:
            raise ValueError(
                f"{p}.spec_augment.freq_mask_width={aug.freq_mask_width} could mask every one "
                f"of the {self.n_mels} mel bins; set it below n_mels"
            )
        if aug.time_masks and aug.time_mask_width >= self.n_frames:
            raise ValueError(
                f"{p}.spec_augment.time_mask_width={aug.time_mask_width} could mask the whole "
                f"clip ({self.n_frames} frames); set it below that"
            )
        if self.tower == "spectrogram-transformer":
            pf, pt = self.patch_size
            if not (0 < pf <= self.n_mels and 0 < pt <= self.n_frames):
                raise ValueError(
                    f"{p}.patch_size={list(self.patch_size)} must fit the spectrogram "
                    f"({self.n_mels} mels x {self.n_frames} frames); lower it"
                )
            if self.width % self.heads:
                raise ValueError(
                    f"{p}.width={self.width} is not divisible by {p}.heads={self.heads}; "
                    f"pick heads that divide the width"
                )
        else:
            shrink = 2 ** len(self.cnn_channels)
            if self.n_mels < shrink or self.n_frames < shrink:
                raise ValueError(
                    f"{p}.cnn_channels has {len(self.cnn_channels)} blocks, each halving the "
                    f"spectrogram, which needs >= {shrink} mels and frames (have {self.n_mels} "
                    f"x {self.n_frames}); use fewer blocks or more mels"
                )
        return self


class ModelConfig(_Strict):
    """A dual encoder: an open_clip text tower paired with an open_clip image tower or an mmcl audio tower."""

    modality: Literal["image", "audio"] = "image"
    open_clip_name: str = Field(
        "mmcl-micro-vit",
        description="open_clip architecture (built-in, configs/models/*.json stem, hf-hub:, local-dir:); "
        "for audio only its text tower and embed_dim are used",
    )
    open_clip_config: dict[str, Any] | None = Field(
        None, description="inline open_clip model config, used instead of open_clip_name"
    )
    open_clip_config_dirs: list[str] = Field(
        default_factory=list, description="extra folders of open_clip JSON configs (name = file stem)"
    )
    pretrained: str | None = Field(
        None, description="image: open_clip tag or weights file; audio: an mmcl checkpoint file"
    )
    text_pretrained: str | None = Field(
        None, description="audio: open_clip tag or checkpoint file whose text tower initialises ours"
    )
    siglip: bool = Field(False, description="add a logit bias and init scale/bias like open_clip's SigLIP")
    audio: AudioTowerConfig = Field(default_factory=AudioTowerConfig)
    freeze_media: bool = Field(False, description="LiT-style locked media tower (no grad, eval mode)")
    freeze_text: bool = Field(
        False, description="locked text tower (no grad, eval mode); with hf_text: its encoder only"
    )
    grad_checkpointing: bool = False
    hf_text: str | None = Field(
        None,
        min_length=1,
        description="text tower: this transformers encoder (hub id or local save_pretrained folder) "
        "with its own tokenizer, in place of open_clip's text transformer (pip install 'mmcl[hf]')",
    )
    hf_text_pooler: HFPooler = Field("mean_pooler", description="hf_text: how tokens pool (open_clip's)")
    hf_text_proj: Literal["mlp", "linear"] = Field("mlp", description="hf_text: projection to embed_dim")
    hf_text_pretrained: bool = Field(
        True, description="hf_text: start from its pretrained weights (false: random, from its config)"
    )
    hf_clap: str | None = Field(
        None,
        min_length=1,
        description="the whole dual encoder: a transformers ClapModel (hub name or local save_pretrained "
        "folder with its processor), its towers, projections, tokenizer and temperature (pip install "
        "'mmcl[hf]'); model.audio follows its feature extractor",
    )
    hf_clap_pretrained: bool = Field(
        True, description="hf_clap: start from its weights (false: random, from its config)"
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_hf_clap(cls, data: Any) -> Any:
        """hf_clap reads the CLAP model's config and feature settings (cheap JSON files) up front."""
        if isinstance(data, dict) and data.get("hf_clap"):
            from mmcl.models.hf_clap_settings import resolve_hf_clap

            defaults = {k: f.get_default(call_default_factory=True) for k, f in cls.model_fields.items()}
            return resolve_hf_clap(data, defaults)
        return data

    @field_validator("hf_text")
    @classmethod
    def _absolute_folder(cls, value: str | None) -> str | None:
        """A local folder is recorded as an absolute path, so a checkpoint's model.json finds it from
        anywhere."""
        if value is not None and Path(value).expanduser().is_dir():
            return str(Path(value).expanduser().resolve())
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> ModelConfig:
        given = self.model_fields_set
        if self.open_clip_config is not None:
            if "open_clip_name" in given:
                raise ValueError(
                    "model.open_clip_name and model.open_clip_config are both set; "
                    "keep one (the inline config is registered under a generated name)"
                )
            check_open_clip_config(self.open_clip_config, "model.open_clip_config")
        if self.modality == "image":
            if "audio" in given:
                raise ValueError(
                    "model.audio is set but model.modality is 'image'; "
                    "set modality: audio or remove the audio section"
                )
            if self.text_pretrained is not None:
                raise ValueError(
                    "model.text_pretrained initialises the text tower of audio models; for "
                    "image-text models put the full open_clip checkpoint in model.pretrained"
                )
        if self.pretrained is not None and self.text_pretrained is not None:
            raise ValueError(
                "model.pretrained (whole model) and model.text_pretrained (text tower only) are "
                "both set; keep one"
            )
        self._check_hf_text(given)
        if "hf_clap_pretrained" in given and self.hf_clap is None:
            raise ValueError("model.hf_clap_pretrained is set but model.hf_clap is not; set both or neither")
        if self.freeze_media and self.freeze_text:
            raise ValueError(
                "model.freeze_media and model.freeze_text are both true, which leaves only the "
                "temperature to train; unfreeze one tower"
            )
        return self

    def _check_hf_text(self, given: set[str]) -> None:
        """model.hf_text replaces the text tower: settings of another text tower contradict it."""
        hf_keys = sorted(k for k in given if k.startswith("hf_text_"))
        if self.hf_text is None:
            if hf_keys:
                raise ValueError(f"model.{hf_keys[0]} is set but model.hf_text is not; set both or neither")
            return
        if self.text_pretrained is not None:
            raise ValueError(
                "model.hf_text (a transformers text tower) and model.text_pretrained (open_clip text "
                "weights) are both set; keep one"
            )
        if self.open_clip_name.startswith(("hf-hub:", "local-dir:")) and self.open_clip_config is None:
            raise ValueError(
                f"model.hf_text cannot replace the text tower of model.open_clip_name="
                f"{self.open_clip_name!r}, which brings its own config and weights; use a named or "
                f"inline open_clip config"
            )
        text_cfg = (self.open_clip_config or {}).get("text_cfg", {})
        hf_keys = sorted(k for k in text_cfg if k.startswith("hf_"))
        if hf_keys:
            raise ValueError(
                f"model.hf_text and model.open_clip_config.text_cfg.{hf_keys[0]} both choose a "
                f"transformers text tower; keep model.hf_text and give text_cfg only context_length"
            )
