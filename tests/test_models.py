"""mmcl.models: micro image-text and audio-text dual encoders built offline, weights round trips with
open_clip, freezing, SpecAugment, config validation, and one real optimisation step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import save_file

from mmcl.errors import UsageError
from mmcl.models import (
    AudioTextEncoder,
    ImageTextEncoder,
    ModelConfig,
    build_model,
    get_tokenizer,
    read_state_dict,
    save_open_clip_weights,
)
from mmcl.models.audio_tower import ClipCrop, SpecAugment
from mmcl.models.config import SpecAugmentConfig
from mmcl.models.factory import BUNDLED_CONFIG_DIR

# One second of 16 kHz audio, 32 mels x 101 frames: small enough for many CPU forward passes.
MICRO_AUDIO = {
    "clip_seconds": 1.0,
    "n_mels": 32,
    "patch_size": (8, 10),
    "width": 64,
    "layers": 2,
    "heads": 2,
    "cnn_channels": (8, 16),
    "spec_augment": {"time_mask_width": 20},
}
CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a yellow star"]


def image_cfg(**overrides) -> ModelConfig:
    return ModelConfig(modality="image", open_clip_name="mmcl-micro-vit", **overrides)


def audio_cfg(tower: str = "spectrogram-transformer", audio: dict | None = None, **overrides) -> ModelConfig:
    return ModelConfig(
        modality="audio",
        open_clip_name="mmcl-micro-vit",
        audio={**MICRO_AUDIO, "tower": tower, **(audio or {})},
        **overrides,
    )


def cnn_audio_cfg(**overrides) -> ModelConfig:
    return audio_cfg("cnn", **overrides)


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def waveforms(n: int = 4) -> torch.Tensor:
    return 0.1 * torch.randn(n, 16000, generator=torch.Generator().manual_seed(0))


def media_for(model) -> torch.Tensor:
    return images() if model.modality == "image" else waveforms()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def image_model() -> ImageTextEncoder:
    torch.manual_seed(0)
    return build_model(image_cfg())


def test_bundled_micro_configs_are_registered_and_valid():
    names = sorted(p.stem for p in BUNDLED_CONFIG_DIR.glob("*.json"))
    assert {"mmcl-micro-vit", "mmcl-tiny-vit"} <= set(names)
    get_tokenizer(image_cfg())  # registers them
    assert set(names) <= set(open_clip.list_models())


def test_image_model_outputs(image_model):
    tokens = image_model.tokenizer(CAPTIONS)
    assert tokens.shape == (4, 32) and tokens.dtype == torch.long
    out = image_model(images(), tokens)
    assert out["media_features"].shape == out["text_features"].shape == (4, 64)
    for key in ("media_features", "text_features"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(4))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out["logit_bias"] is None
    raw = image_model.encode_media(images(), normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4))
    picture = Image.new("RGB", (100, 80), (200, 30, 30))
    for train in (True, False):
        assert image_model.media_transform(train)(picture).shape == (3, 64, 64)


def test_logit_scale_is_capped_at_100(image_model):
    with torch.no_grad():
        image_model.clip.logit_scale.fill_(math.log(1000.0))
    out = image_model(images(), image_model.tokenizer(CAPTIONS))
    assert out["logit_scale"].item() == pytest.approx(100.0)


@pytest.mark.parametrize("make_cfg", [image_cfg, audio_cfg])
def test_siglip_initialises_scale_and_bias_like_open_clip(make_cfg):
    model = build_model(make_cfg(siglip=True))
    out = model(media_for(model), model.tokenizer(CAPTIONS))
    assert out["logit_scale"].item() == pytest.approx(10.0)
    assert out["logit_bias"].item() == pytest.approx(-10.0)


@pytest.mark.parametrize("tower", ["spectrogram-transformer", "cnn"])
def test_audio_towers_forward_and_backward(tower):
    torch.manual_seed(0)
    model = build_model(audio_cfg(tower)).train()
    assert isinstance(model, AudioTextEncoder)
    out = model(waveforms(), model.tokenizer(CAPTIONS))
    assert out["media_features"].shape == out["text_features"].shape == (4, 64)
    torch.testing.assert_close(out["media_features"].norm(dim=-1), torch.ones(4))
    logits = out["logit_scale"] * out["media_features"] @ out["text_features"].T
    F.cross_entropy(logits, torch.arange(4)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_log_mel_stays_float32_under_autocast():
    model = build_model(audio_cfg()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.audio.log_mel(waveforms()).dtype == torch.float32
        features = model.encode_media(waveforms())
    assert torch.isfinite(features).all()


def test_audio_media_transform_crops_and_pads():
    model = build_model(audio_cfg("cnn"))
    long_clip, short_clip = torch.arange(20000.0), torch.ones(9000)
    assert model.media_transform(train=True)(long_clip).shape == (16000,)
    centre = model.media_transform(train=False)(long_clip)
    assert centre[0].item() == 2000.0  # (20000 - 16000) // 2
    padded = model.media_transform(train=False)(short_clip)
    assert padded.shape == (16000,) and padded[9000:].abs().sum() == 0
    with pytest.raises(ValueError, match="media_transform"):
        model.encode_media(torch.zeros(2, 12345))
    assert ClipCrop(10, random=True)(torch.zeros(2, 10)).shape == (2, 10)


def test_spec_augment_masks_only_in_training():
    aug = SpecAugment(SpecAugmentConfig(freq_masks=2, freq_mask_width=8, time_masks=2, time_mask_width=20))
    spec = torch.randn(8, 1, 32, 101) + 5.0  # no zeros to begin with
    assert aug.train()(spec).eq(0).any()
    assert aug.eval()(spec) is spec

    model = build_model(audio_cfg())
    wave = waveforms()
    with torch.no_grad():
        model.train()
        assert not torch.equal(model.audio.spectrogram(wave), model.audio.spectrogram(wave))
        model.eval()
        torch.testing.assert_close(model.audio.spectrogram(wave), model.audio.spectrogram(wave))
        torch.testing.assert_close(model.encode_media(wave), model.encode_media(wave))


@pytest.mark.parametrize(
    ("make_cfg", "frozen"),
    [(image_cfg, "media"), (image_cfg, "text"), (audio_cfg, "media"), (audio_cfg, "text")],
)
def test_frozen_tower_gets_no_grad_and_stays_in_eval(make_cfg, frozen):
    model = build_model(make_cfg(**{f"freeze_{frozen}": True})).train()
    live = "text" if frozen == "media" else "media"
    frozen_params = {
        id(p)
        for part in model.tower_parts(frozen)
        for p in ([part] if isinstance(part, torch.nn.Parameter) else part.parameters())
    }
    buffers_before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}

    out = model(media_for(model), model.tokenizer(CAPTIONS))
    (out["logit_scale"] * out["media_features"] @ out["text_features"].T).logsumexp(-1).mean().backward()

    for name, param in model.named_parameters():
        if id(param) in frozen_params:
            assert not param.requires_grad and param.grad is None, name
    assert all(
        p.grad is not None
        for part in model.tower_parts(live)
        if isinstance(part, torch.nn.Module)
        for p in part.parameters()
    )
    assert all(
        not m.training
        for part in model.tower_parts(frozen)
        if isinstance(part, torch.nn.Module)
        for m in part.modules()
    )
    assert all(
        m.training
        for part in model.tower_parts(live)
        if isinstance(part, torch.nn.Module)
        for m in part.modules()
    )
    if model.modality == "audio" and frozen == "media":  # a locked tower's BatchNorm statistics stay put
        for key, before in buffers_before.items():
            torch.testing.assert_close(model.state_dict()[key], before)
    model.eval().train()  # toggling modes keeps the lock
    assert not any(
        m.training
        for part in model.tower_parts(frozen)
        if isinstance(part, torch.nn.Module)
        for m in part.modules()
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_saved_weights_load_in_open_clip_and_back(image_model, tmp_path, suffix):
    path = save_open_clip_weights(image_model, tmp_path / f"micro{suffix}")
    assert not list(tmp_path.glob("*.tmp"))
    clip, _, preprocess_val = open_clip.create_model_and_transforms("mmcl-micro-vit", pretrained=str(path))
    clip.eval()
    image_model.eval()
    tokens = image_model.tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(
            clip.encode_image(images(), normalize=True), image_model.encode_media(images())
        )
        torch.testing.assert_close(clip.encode_text(tokens, normalize=True), image_model.encode_text(tokens))
        reloaded = build_model(image_cfg(pretrained=str(path))).eval()
        torch.testing.assert_close(reloaded.encode_media(images()), image_model.encode_media(images()))
        torch.testing.assert_close(reloaded.encode_text(tokens), image_model.encode_text(tokens))


@pytest.mark.parametrize("make_cfg", [image_cfg, audio_cfg])
def test_dual_encoder_state_dict_is_a_valid_pretrained_checkpoint(make_cfg, tmp_path):
    torch.manual_seed(1)
    model = build_model(make_cfg()).eval()
    path = tmp_path / "model.safetensors"  # what accelerate's save_state writes: the module's state_dict
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    reloaded = build_model(make_cfg(pretrained=str(path))).eval()
    tokens = model.tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.encode_media(media_for(model)), model.encode_media(media_for(model))
        )
        torch.testing.assert_close(reloaded.encode_text(tokens), model.encode_text(tokens))


def test_siglip_model_starts_from_a_clip_checkpoint(image_model, tmp_path):
    path = save_open_clip_weights(image_model, tmp_path / "clip.safetensors")
    siglip = build_model(image_cfg(siglip=True, pretrained=str(path))).eval()
    out = siglip(images(), image_model.tokenizer(CAPTIONS))
    assert out["logit_bias"].item() == pytest.approx(-10.0)
    with torch.no_grad():
        torch.testing.assert_close(out["media_features"], image_model.eval().encode_media(images()))
    siglip_path = save_open_clip_weights(siglip, tmp_path / "siglip.safetensors")
    with pytest.raises(UsageError, match="model.siglip"):
        build_model(image_cfg(pretrained=str(siglip_path)))


def test_read_state_dict_unwraps_open_clip_trainer_checkpoints(image_model, tmp_path):
    state = {f"module.{k}": v for k, v in image_model.clip.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, tmp_path / "epoch_3.pt")
    assert read_state_dict(tmp_path / "epoch_3.pt").keys() == image_model.clip.state_dict().keys()
    torch.save({"not": "tensors"}, tmp_path / "junk.pt")
    with pytest.raises(UsageError, match="no state dict"):
        read_state_dict(tmp_path / "junk.pt")


@pytest.mark.parametrize("source", ["image", "audio"])
def test_text_pretrained_copies_the_text_tower(source, tmp_path):
    torch.manual_seed(2)
    teacher = build_model(image_cfg() if source == "image" else audio_cfg()).eval()
    path = save_open_clip_weights(teacher, tmp_path / "teacher.safetensors")
    student = build_model(audio_cfg("cnn", text_pretrained=str(path))).eval()
    tokens = teacher.tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(student.encode_text(tokens), teacher.encode_text(tokens))


def test_text_pretrained_from_a_different_architecture_fails_clearly(tmp_path):
    path = save_open_clip_weights(build_model(ModelConfig(open_clip_name="mmcl-tiny-vit")), tmp_path / "t.pt")
    with pytest.raises(UsageError, match=r"model.text_pretrained=.*does not fit"):
        build_model(audio_cfg(text_pretrained=str(path)))


def test_inline_config_and_user_config_dir(tmp_path):
    micro = json.loads((BUNDLED_CONFIG_DIR / "mmcl-micro-vit.json").read_text())
    inline = {**micro, "embed_dim": 32, "text_cfg": {**micro["text_cfg"], "context_length": 16}}
    model = build_model(ModelConfig(open_clip_config=inline))
    assert model(images(), model.tokenizer(CAPTIONS))["media_features"].shape == (4, 32)
    assert get_tokenizer(ModelConfig(open_clip_config=inline))(CAPTIONS).shape == (4, 16)

    (tmp_path / "my-micro.json").write_text(json.dumps(inline))
    model = build_model(ModelConfig(open_clip_name="my-micro", open_clip_config_dirs=[str(tmp_path)]))
    assert model.embed_dim == 32

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "broken.json").write_text(json.dumps({"embed_dim": 8, "text_cfg": {}}))
    with pytest.raises(UsageError, match=r"broken.json lacks \['vision_cfg'\]"):
        build_model(ModelConfig(open_clip_name="broken", open_clip_config_dirs=[str(bad_dir)]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "video"}, "modality"),
        ({"unknown_key": 1}, "unknown_key"),
        ({"audio": {"hop": 10}, "modality": "audio"}, "hop"),
        (
            {"open_clip_name": "x", "open_clip_config": {"embed_dim": 8}},
            "open_clip_name and model.open_clip_config",
        ),
        ({"open_clip_config": {"embed_dim": 8, "text_cfg": {}}}, "lacks ['vision_cfg']"),
        (
            {"open_clip_config": {"embed_dim": 8, "vision_cfg": {"width": 48, "layers": 2}, "text_cfg": {}}},
            "set vision_cfg.head_width",
        ),
        ({"audio": {"n_mels": 64}}, "model.audio is set but model.modality is 'image'"),
        ({"text_pretrained": "x.pt"}, "put the full open_clip checkpoint in model.pretrained"),
        ({"modality": "audio", "pretrained": "a.pt", "text_pretrained": "b.pt"}, "keep one"),
        ({"freeze_media": True, "freeze_text": True}, "unfreeze one tower"),
        ({"modality": "audio", "audio": {"n_mels": 300}}, "model.audio.n_mels=300"),
        ({"modality": "audio", "audio": {"patch_size": (128, 16)}}, "model.audio.patch_size"),
        ({"modality": "audio", "audio": {"width": 100, "heads": 3}}, "model.audio.heads=3"),
        (
            {"modality": "audio", "audio": {"clip_seconds": 0.1, "spec_augment": {"time_mask_width": 40}}},
            "time_mask_width=40",
        ),
        (
            {"modality": "audio", "audio": {"tower": "cnn", "n_mels": 12}},
            "model.audio.cnn_channels has 4 blocks",
        ),
        ({"modality": "audio", "audio": {"f_max": 9000}}, "model.audio.f_max=9000"),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(kwargs, message):
    with pytest.raises(ValidationError) as info:
        ModelConfig(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("make_cfg", "message"),
    [
        (lambda: ModelConfig(open_clip_name="no-such-model"), "open_clip_config_dirs"),
        (lambda: image_cfg(pretrained="missing.safetensors"), "neither a weights file nor an open_clip"),
        (lambda: audio_cfg(pretrained="missing.safetensors"), "use model.text_pretrained"),
        (lambda: audio_cfg(text_pretrained="laion2b_s34b_b79k"), "pretrained tag of 'mmcl-micro-vit'"),
        (lambda: ModelConfig(open_clip_config_dirs=["/no/such/dir"]), "/no/such/dir is not a folder"),
    ],
)
def test_bad_references_raise_usage_errors(make_cfg, message):
    with pytest.raises(UsageError, match=message):
        build_model(make_cfg())


@pytest.mark.parametrize("make_cfg", [image_cfg, audio_cfg])
def test_grad_checkpointing_gives_the_same_gradients(make_cfg):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        no_masks = {"audio": {"spec_augment": {"freq_masks": 0, "time_masks": 0}}}
        model = build_model(
            make_cfg(grad_checkpointing=checkpointing, **(no_masks if make_cfg is audio_cfg else {}))
        ).train()
        out = model(media_for(model), model.tokenizer(CAPTIONS))
        (out["media_features"] @ out["text_features"].T).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize("make_cfg", [image_cfg, cnn_audio_cfg])
def test_one_training_step_reduces_contrastive_loss(make_cfg):
    torch.manual_seed(4)
    model = build_model(make_cfg()).train()
    media, tokens = media_for(model), model.tokenizer(CAPTIONS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.arange(len(CAPTIONS))

    def loss() -> torch.Tensor:
        out = model(media, tokens)
        logits = out["logit_scale"] * out["media_features"] @ out["text_features"].T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    if model.modality == "audio":  # compare like with like: no random masks in this check
        model.audio.spec_augment.eval()
    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_weights_file_names_are_checked(image_model, tmp_path: Path):
    with pytest.raises(UsageError, match=".safetensors"):
        save_open_clip_weights(image_model, tmp_path / "weights.ckpt")
