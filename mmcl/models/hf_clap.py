"""A whole transformers CLAP model as an mmcl dual encoder (`model.hf_clap`, `mmcl eval --hf-clap`).

The ClapModel's parts keep their weights and take mmcl's places: its audio model and projection form an
HFAudioTower (features computed in torch as ClapFeatureExtractor computes them, mmcl.models.hf_audio),
its text model and projection the text tower, its processor's tokenizer the tokenizer. Embeddings equal
ClapModel.get_audio_features / get_text_features (tests/test_hf_clap.py).

Temperature. A ClapModel has two: logit_scale_a scales audio->text logits and logit_scale_t text->audio
ones. LAION-CLAP trains with logit_scale_a in both directions (its ClipLoss without mlp_loss) and ranks
with it in its evaluation; logit_scale_t stays at its initial value. mmcl does the same: the dual
encoder's one temperature (`logit_scale`) is logit_scale_a, trained as any mmcl temperature, and
logit_scale_t is kept as it was (a buffer: it takes no part in training) and written back on export.

Freezing. The projections here are pretrained, not new as on mmcl's hf towers (where freezing locks the
encoder and trains the projection), so freeze_media / freeze_text lock the whole tower, encoder and
projection: a locked tower keeps the published embedding space, and the other tower is tuned to it (LiT).

Checkpoints. `save_model_files` writes the ClapConfig and the processor (feature extractor settings and
tokenizer) into the checkpoint, so a checkpoint rebuilds the model without the original folder.

transformers is imported only when such a model is built: `pip install 'mmcl[hf]'`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmcl.errors import UsageError
from mmcl.models.config import ModelConfig
from mmcl.models.dual_encoder import AudioTextEncoder, Tower
from mmcl.models.hf_audio import ClapFeatures, HFAudioTower, freeze_fusion_branch

KEY = "model.hf_clap"
HF_EXTRA = "pip install 'mmcl[hf]'"
CONTEXT_LENGTH = 77  # LAION-CLAP's tokenizer call: padding="max_length", max_length=77 (laion_clap/hook.py)
# mmcl's names of a ClapModel's parts -> the ClapModel's own (its state dict keys)
TO_CLAP = {
    "audio.encoder.": "audio_model.",
    "audio.proj.": "audio_projection.",
    "text.encoder.": "text_model.",
}
TO_CLAP |= {
    "text.proj.": "text_projection.",
    "logit_scale": "logit_scale_a",
    "logit_scale_t": "logit_scale_t",
}


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UsageError(f"{KEY} needs Hugging Face transformers: {HF_EXTRA}") from None
    return transformers


class ClapTokenizer:
    """list[str] -> input ids [N, context_length]: the CLAP processor's tokenizer, padded to the full length
    and truncated as LAION-CLAP tokenizes (77 tokens, or fewer where the text model takes fewer)."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, texts: str | list[str]) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )["input_ids"]


class ClapTextTower(nn.Module):
    """Token ids [B, L] -> the text projection of the text model's pooled output [B, projection_dim]
    (unnormalised), padding masked by the pad id."""

    def __init__(self, encoder: nn.Module, proj: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.proj = proj
        self.pad_token_id = pad_token_id

    def forward(self, tokens: Tensor) -> Tensor:
        mask = (tokens != self.pad_token_id).long()
        return self.proj(self.encoder(input_ids=tokens, attention_mask=mask).pooler_output)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        func = partial(checkpoint, use_reentrant=False)
        self.encoder._set_gradient_checkpointing(enable=enable, gradient_checkpointing_func=func)


class ClapEncoder(AudioTextEncoder):
    """A ClapModel behind the DualEncoder contract (see the module docstring for its temperature,
    freezing and checkpoint files)."""

    def __init__(
        self, clap: nn.Module, processor: Any, audio: HFAudioTower, *, long_clips: str, max_samples: int
    ) -> None:
        text_config = clap.config.text_config
        offset = text_config.pad_token_id + 1  # RoBERTa-style positions start after the padding id
        context = min(CONTEXT_LENGTH, text_config.max_position_embeddings - offset)
        tokenizer = ClapTokenizer(processor.tokenizer, context)
        text = ClapTextTower(clap.text_model, clap.text_projection, tokenizer.pad_token_id)
        super().__init__(
            audio,
            text,
            tokenizer,
            clap.config.projection_dim,
            init_logit_scale=float(clap.logit_scale_a.detach()),
            long_clips=long_clips,
            max_samples=max_samples,
        )
        self.register_buffer("logit_scale_t", clap.logit_scale_t.detach().clone())
        self.clap_config = clap.config
        self.processor = processor

    def tower_parts(self, tower: Tower) -> list[nn.Module | nn.Parameter]:
        return [self.audio if tower == "media" else self.text]

    def save_model_files(self, folder: Path) -> bool:
        self.clap_config.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        return True

    def clap_state_dict(self) -> dict[str, Tensor]:
        """The weights under the ClapModel's own names."""
        state = {}
        for key, value in self.state_dict().items():
            if key in TO_CLAP:
                state[TO_CLAP[key]] = value
                continue
            prefix = next(p for p in TO_CLAP if p.endswith(".") and key.startswith(p))
            state[TO_CLAP[prefix] + key[len(prefix) :]] = value
        return state

    def to_clap_model(self) -> nn.Module:
        """A transformers ClapModel with this model's weights (both temperatures included)."""
        clap = require_transformers().ClapModel(self.clap_config)
        clap.load_state_dict(self.clap_state_dict(), strict=True)
        return clap.eval()


def load_clap(name: str, pretrained: bool) -> tuple[nn.Module, Any]:
    """The ClapModel (with its weights, or fresh from its config when not `pretrained`) and its processor."""
    transformers = require_transformers()
    try:
        processor = transformers.ClapProcessor.from_pretrained(name)
        if not pretrained:
            return transformers.ClapModel(transformers.ClapConfig.from_pretrained(name)), processor
        clap, info = transformers.ClapModel.from_pretrained(
            name, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"{KEY}={name!r} cannot be loaded: {str(err).splitlines()[0]}") from None
    if info["missing_keys"]:  # transformers only warns, and leaves them random
        missing = sorted(info["missing_keys"])
        raise UsageError(
            f"{KEY}={name!r}: its weights lack {len(missing)} tensors of the ClapModel its config.json "
            f"describes (e.g. {missing[0]}); re-save the model"
        )
    return clap, processor


def build_clap_model(cfg: ModelConfig) -> ClapEncoder:
    """The dual encoder `cfg.hf_clap` names, with its weights unless cfg.hf_clap_pretrained is false or
    cfg.pretrained (a whole mmcl checkpoint, loaded by the caller) replaces them."""
    clap, processor = load_clap(cfg.hf_clap, cfg.hf_clap_pretrained and cfg.pretrained is None)
    extractor = processor.feature_extractor
    fusion = bool(clap.config.audio_config.enable_fusion)
    if fusion != (extractor.truncation == "fusion"):
        raise UsageError(
            f"{KEY}={cfg.hf_clap!r}: its feature extractor's truncation={extractor.truncation!r} does not "
            f"fit a CLAP model with enable_fusion={fusion} (fusion models take 'fusion', others 'rand_trunc')"
        )
    audio_cfg = cfg.audio
    if fusion and audio_cfg.long_clips != "fusion":
        freeze_fusion_branch(clap.audio_model)
    max_samples = round(audio_cfg.max_seconds * audio_cfg.sample_rate)
    audio = HFAudioTower(
        clap.audio_model,
        ClapFeatures(extractor, fusion),
        family="clap",
        pooling="pooler",
        width=clap.config.audio_config.hidden_size,
        embed_dim=clap.config.projection_dim,
        sample_rate=audio_cfg.sample_rate,
        clip_samples=audio_cfg.clip_samples,
        proj=clap.audio_projection,
        long_clips="fusion" if audio_cfg.long_clips == "fusion" else "crop",
        input_samples=max_samples if audio_cfg.long_clips == "fusion" else None,
    )
    return ClapEncoder(clap, processor, audio, long_clips=audio_cfg.long_clips, max_samples=max_samples)
