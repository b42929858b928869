"""Pretrained transformers audio towers (model.audio.tower: hf) on tiny random models of each family,
saved with save_pretrained and loaded back through mmcl: features equal the family's own feature
extractor, pooled outputs equal the transformers model's, training moves only unfrozen weights, and a
trained run's checkpoint is evaluated without the original weights folder."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from hf_models import TINY_HTSAT, TINY_TEXT
from media_files import make_tone
from processes import run_mmcl

from mmcl.errors import UsageError
from mmcl.models import ModelConfig, build_model
from mmcl.models.config import AudioTowerConfig
from mmcl.models.hf_audio import build_hf_audio_tower, require_transformers
from shards_tools.config import build_config
from shards_tools.run import run_sharding

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CAPTIONS = ["a low tone", "a high tone", "a rising tone"]
CLAP_FEATURES = {"sampling_rate": 16000, "hop_length": 160, "fft_window_size": 512, "max_length_s": 1}


def _clap(fusion: bool = False, full: bool = False, projection: bool = False) -> tuple:
    audio = transformers.ClapAudioConfig(**TINY_HTSAT, enable_fusion=fusion, projection_dim=16)
    extractor = transformers.ClapFeatureExtractor(
        **CLAP_FEATURES, frequency_max=8000, truncation="fusion" if fusion else "rand_trunc"
    )
    if projection:
        return transformers.ClapAudioModelWithProjection(audio), extractor
    if not full:
        return transformers.ClapAudioModel(audio), extractor
    config = transformers.ClapConfig(
        audio_config=audio.to_dict(), text_config={**TINY_TEXT, "vocab_size": 99}, projection_dim=16
    )
    return transformers.ClapModel(config), extractor


def _ast() -> tuple:
    config = transformers.ASTConfig(
        **TINY_TEXT, max_length=98, num_mel_bins=16, patch_size=16, frequency_stride=10, time_stride=10
    )
    return transformers.ASTModel(config), transformers.ASTFeatureExtractor(num_mel_bins=16, max_length=98)


def _whisper() -> tuple:
    # 2 s chunks instead of 30 s: 200 log-mel frames, 100 encoder positions.
    config = transformers.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=80, max_source_positions=100,
        max_target_positions=16, vocab_size=99, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        decoder_start_token_id=2,
    )  # fmt: skip
    extractor = transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=2)
    return transformers.WhisperForConditionalGeneration(config), extractor


def _wav2vec2(kind: str) -> tuple:
    config_class, model_class = {
        "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
        "hubert": (transformers.HubertConfig, transformers.HubertModel),
    }[kind]
    config = config_class(
        **TINY_TEXT, conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, vocab_size=10,
    )  # fmt: skip
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=kind == "wav2vec2")
    return model_class(config), extractor


MAKERS = {
    "clap": _clap,
    "clap-model": lambda: _clap(full=True),
    "clap-fusion": lambda: _clap(fusion=True),
    "clap-projection": lambda: _clap(projection=True),
    "ast": _ast,
    "whisper": _whisper,
    "wav2vec2": lambda: _wav2vec2("wav2vec2"),
    "hubert": lambda: _wav2vec2("hubert"),
}
# clip_seconds for encoders that take any length; the others default to their extractor's longest clip
CLIP_SECONDS = {"wav2vec2": 0.5, "hubert": 0.5}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny random model and feature extractor, saved as transformers saves them."""
    root = tmp_path_factory.mktemp("hf_audio")
    folders = {}
    for i, (name, make) in enumerate(MAKERS.items()):
        torch.manual_seed(i)
        model, extractor = make()
        model.save_pretrained(root / name)
        extractor.save_pretrained(root / name)
        folders[name] = root / name
    return folders


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tower_cfg(folder: Path, **audio) -> AudioTowerConfig:
    seconds = CLIP_SECONDS.get(folder.name)
    return AudioTowerConfig(
        tower="hf", hf_model=str(folder), **({"clip_seconds": seconds} if seconds else {}), **audio
    )


def clips(cfg: AudioTowerConfig, n: int = 3, seed: int = 0) -> torch.Tensor:
    """Noise plus a tone: a spectrum with both loud and quiet bins."""
    rng = np.random.default_rng(seed)
    t = np.arange(cfg.clip_samples) / cfg.sample_rate
    waves = [
        0.05 * rng.standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * (300 + 200 * i) * t) for i in range(n)
    ]
    return torch.tensor(np.stack(waves), dtype=torch.float32)


def extractor_inputs(folder: Path, wave: torch.Tensor, rate: int) -> dict[str, torch.Tensor]:
    extractor = transformers.AutoFeatureExtractor.from_pretrained(folder)
    return extractor([w.numpy() for w in wave], sampling_rate=rate, return_tensors="pt")


def reference_encoder(folder: Path) -> torch.nn.Module:
    """The encoder as transformers itself loads it from the folder."""
    if folder.name == "clap-model":
        return transformers.ClapModel.from_pretrained(folder).audio_model.eval()
    if folder.name == "clap-projection":
        return transformers.ClapAudioModelWithProjection.from_pretrained(folder).audio_model.eval()
    if folder.name.startswith("clap"):
        return transformers.ClapAudioModel.from_pretrained(folder).eval()
    if folder.name == "whisper":
        return transformers.WhisperForConditionalGeneration.from_pretrained(folder).model.encoder.eval()
    return transformers.AutoModel.from_pretrained(folder).eval()


@pytest.mark.parametrize(
    "name, audio",
    [
        ("clap", {}),
        ("clap", {"clip_seconds": 0.3}),  # shorter clips are padded as the extractor pads ("repeatpad")
        ("clap-fusion", {}),
        ("ast", {}),
        ("ast", {"clip_seconds": 0.5}),  # fbank frames zero-padded to max_length
        ("whisper", {}),
        ("whisper", {"clip_seconds": 0.7}),  # zero-padded to the 2 s chunk
        ("wav2vec2", {}),
        ("hubert", {}),
    ],
)
def test_features_equal_the_feature_extractors(encoders, name: str, audio: dict) -> None:
    cfg = tower_cfg(encoders[name], **audio)
    tower = build_hf_audio_tower(cfg, 16).eval()
    wave = clips(cfg)
    ours = tower.encoder_inputs(wave)[tower.input_name]
    theirs = extractor_inputs(encoders[name], wave, cfg.sample_rate)[tower.input_name].float()
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(MAKERS))
def test_pooled_output_equals_the_transformers_models(encoders, name: str) -> None:
    cfg = tower_cfg(encoders[name])
    tower = build_hf_audio_tower(cfg, 16).eval()
    wave = clips(cfg)
    inputs = dict(extractor_inputs(encoders[name], wave, cfg.sample_rate))
    if name == "clap-fusion":  # the extractor marks a random clip "longer"; none of these is
        inputs["is_longer"] = torch.zeros_like(inputs["is_longer"])
    with torch.no_grad():
        ours = tower.pooled(wave)
        out = reference_encoder(encoders[name])(**inputs)
    pooler = getattr(out, "pooler_output", None)  # CLAP's and AST's; the others are mean-pooled
    assert tower.pooling == ("mean" if pooler is None else "pooler")
    expected = out.last_hidden_state.mean(dim=1) if pooler is None else pooler
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert tower(wave).shape == (3, 16)


def test_pooling_choices(encoders) -> None:
    cfg = tower_cfg(encoders["ast"], hf_pooling="cls")
    tower = build_hf_audio_tower(cfg, 16).eval()
    wave = clips(cfg)
    with torch.no_grad():
        hidden = reference_encoder(encoders["ast"])(**extractor_inputs(encoders["ast"], wave, 16000))
        torch.testing.assert_close(tower.pooled(wave), hidden.last_hidden_state[:, 0], atol=1e-5, rtol=0)
        tower.pooling = "mean"
        torch.testing.assert_close(tower.pooled(wave), hidden.last_hidden_state.mean(1), atol=1e-5, rtol=0)
    # a Whisper clip shorter than the chunk: the mean covers only the positions of the clip
    short = build_hf_audio_tower(tower_cfg(encoders["whisper"], clip_seconds=0.5), 16)
    assert short.valid_positions == 25  # 50 frames of 10 ms, halved by the encoder's strided conv


def model_cfg(folder: Path, **overrides) -> ModelConfig:
    audio = {"tower": "hf", "hf_model": str(folder), **overrides.pop("audio", {})}
    if folder.name in CLIP_SECONDS:
        audio["clip_seconds"] = CLIP_SECONDS[folder.name]
    return ModelConfig(modality="audio", open_clip_name="mmcl-micro-vit", audio=audio, **overrides)


def one_step(model) -> tuple[set[str], set[str]]:
    """One AdamW step on the symmetric contrastive loss: the parameters it changed, and those that took
    part in it (got a gradient)."""
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wave = clips(model.audio, n=len(CAPTIONS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(wave, model.tokenizer(CAPTIONS))
    logits = out["logit_scale"] * out["media_features"] @ out["text_features"].T
    labels = torch.arange(len(CAPTIONS))
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    optimizer.step()
    params = dict(model.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(before[n], p.detach())}
    return changed, {n for n, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("name", ["clap-model", "clap-fusion", "ast", "whisper", "wav2vec2"])
@pytest.mark.parametrize("freeze", [False, True])
def test_a_training_step_changes_the_unfrozen_weights_only(encoders, name: str, freeze: bool) -> None:
    torch.manual_seed(0)
    model = build_model(model_cfg(encoders[name], freeze_media=freeze))
    changed, took_part = one_step(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    audio = {n for n, _ in model.named_parameters() if n.startswith("audio.")}
    assert changed <= trainable and any(n.startswith("text.") for n in changed)
    if freeze:  # LiT: the encoder is locked, and in eval mode; its new projection trains
        assert changed & audio == {"audio.proj.weight", "audio.proj.bias"}
        assert not model.audio.encoder.training and model.audio.proj.training
    else:
        # the tower trains but what transformers keeps frozen (Whisper's sinusoidal positions) and what
        # a tiny model at init gives an exactly zero gradient (zero cls tokens, zero biases)
        assert len(changed & audio) >= 0.8 * len(audio & trainable)
        # every trainable parameter takes part, as DDP requires (a fusion model's long-clip branch,
        # which never runs here, is frozen for that)
        assert took_part == trainable
        assert {"audio.proj.weight", "audio.proj.bias"} <= changed
        assert any(n.startswith("audio.encoder.") for n in changed)


@pytest.mark.parametrize("name", ["clap", "ast"])
def test_gradient_checkpointing_gives_the_same_gradients(encoders, name: str) -> None:
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(model_cfg(encoders[name], grad_checkpointing=checkpointing)).train()
        for module in model.modules():  # dropout off, so both passes compute the same function
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        out = model(clips(model.audio), model.tokenizer(CAPTIONS))
        (out["media_features"] @ out["text_features"].T).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("audio.encoder") for k in grads[0])
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], msg=key)


def test_features_stay_float32_under_mixed_precision(encoders) -> None:
    tower = build_hf_audio_tower(tower_cfg(encoders["clap"]), 16).eval()
    wave = clips(tower_cfg(encoders["clap"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tower.encoder_inputs(wave)["input_features"].dtype == torch.float32
        out = tower(wave)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_tower_built_from_its_config_alone_takes_the_trained_weights(encoders, name: str) -> None:
    cfg = tower_cfg(encoders[name])
    pretrained = build_hf_audio_tower(cfg, 16).eval()
    fresh = build_hf_audio_tower(cfg, 16, pretrained=False).eval()  # as checkpoints rebuild it
    assert pretrained.state_dict().keys() == fresh.state_dict().keys()
    fresh.load_state_dict(pretrained.state_dict())
    wave = clips(cfg)
    with torch.no_grad():
        torch.testing.assert_close(fresh(wave), pretrained(wave), atol=0, rtol=0)


def test_checkpoint_config_rebuilds_the_tower_without_the_weights_folder(encoders, tmp_path: Path) -> None:
    folder = tmp_path / "whisper"
    shutil.copytree(encoders["whisper"], folder)
    cfg = model_cfg(folder)
    model = build_model(cfg).eval()
    saved = json.loads(json.dumps(cfg.model_dump(mode="json", exclude_defaults=True)))  # as in model.json
    assert saved["audio"]["hf_config"]["model_type"] == "whisper"
    assert saved["audio"]["hf_features"]["feature_extractor_type"] == "WhisperFeatureExtractor"
    shutil.rmtree(folder)
    saved["audio"]["hf_model"] = None  # what mmcl.eval.loading.checkpoint_config does
    rebuilt = build_model(ModelConfig.model_validate(saved)).eval()
    wave = clips(model.audio)
    assert not torch.allclose(model.encode_media(wave), rebuilt.encode_media(wave))  # fresh weights
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.encode_media(wave), rebuilt.encode_media(wave))
    # model.pretrained (a whole mmcl checkpoint) replaces the encoder's weights: they are not loaded
    with pytest.raises(UsageError, match="checkpoint file, which does not exist"):
        build_model(model_cfg(encoders["whisper"], pretrained=str(tmp_path / "missing.safetensors")))


@pytest.mark.parametrize(
    "audio, message",
    [
        ({"sample_rate": 44100}, "model.audio.sample_rate=44100 differs from the 16000 Hz"),
        ({"clip_seconds": 3}, "model.audio.clip_seconds=3 is longer than the 1 s"),
        ({"hf_pooling": "cls"}, "model.audio.hf_pooling='cls' does not apply to clap encoders"),
        ({"hf_model": None}, "model.audio.hf_model is not set"),
        ({"tower": "cnn"}, "model.audio.hf_model is set but model.audio.tower is 'cnn'"),
    ],
)
def test_config_errors_name_the_key(encoders, audio: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        AudioTowerConfig(**{"tower": "hf", "hf_model": str(encoders["clap"]), **audio})


def test_folder_problems_are_usage_errors(encoders, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no config.json"):
        AudioTowerConfig(tower="hf", hf_model=str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "wav2vec2"}')
    with pytest.raises(ValueError, match="has no preprocessor_config.json"):
        AudioTowerConfig(tower="hf", hf_model=str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text('{"feature_extractor_type": "SeamlessM4T"}')
    with pytest.raises(ValueError, match="feature extractor 'SeamlessM4T' is not supported"):
        AudioTowerConfig(tower="hf", hf_model=str(tmp_path))
    with pytest.raises(ValueError, match="is not a folder"):
        AudioTowerConfig(tower="hf", hf_model=str(tmp_path / "absent"))
    # weights that do not fit the config are refused (transformers would only warn and leave them random)
    shutil.copytree(encoders["ast"], tmp_path / "ast")
    config = json.loads((tmp_path / "ast" / "config.json").read_text())
    (tmp_path / "ast" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(UsageError, match="its weights lack .* tensors of the ASTModel"):
        build_hf_audio_tower(AudioTowerConfig(tower="hf", hf_model=str(tmp_path / "ast")), 16)


def test_without_transformers_the_error_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(UsageError, match=r"pip install 'mmcl\[hf\]'"):
        require_transformers()


def test_trained_run_is_evaluated_from_its_checkpoint(encoders, tmp_path: Path) -> None:
    """mmcl train with a CLAP tower on real audio shards, then mmcl eval zero-shot on ESC-50's layout
    from the checkpoint alone (the pretrained folder is gone by then)."""
    root = tmp_path / "audio"
    for i in range(48):
        freq = [220, 440, 880][i % 3]
        make_tone(root / f"t{i:02d}.flac", freq + i, seconds=0.6 + 0.1 * (i % 7), rate=22050)
        (root / f"t{i:02d}.txt").write_text(f"a tone at {freq} hertz")
    source = {"input": {"modality": "audio", "path": root}, "output": tmp_path / "shards", "shard_size": 8}
    run_sharding(build_config({**source, "workers": 1}), progress=False)
    weights = tmp_path / "clap"
    shutil.copytree(encoders["clap"], weights)
    config = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"modality": "audio", "audio": {"tower": "hf", "hf_model": str(weights)}},
        "data": {"sources": [{"urls": str(tmp_path / "shards")}], "batch_size": 8, "workers": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": 4, "log_every": 1, "checkpoint_every": 4},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run_mmcl("train", "--config", tmp_path / "c.yaml", env=env)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    print("data_wait_fraction per step:", [round(r["data_wait_fraction"], 3) for r in rows])
    shutil.rmtree(weights)
    esc = tmp_path / "ESC-50-master"
    table = ["filename,fold,target,category,esc10,src_file,take"]
    for i, (target, category) in enumerate([(0, "dog"), (1, "rooster"), (0, "dog"), (2, "crow")]):
        make_tone(esc / "audio" / f"1-{i}-A-{target}.wav", 300 + 100 * i, seconds=1.5, rate=44100)
        table.append(f"1-{i}-A-{target}.wav,1,{target},{category},False,{i},A")
    (esc / "meta").mkdir()
    (esc / "meta" / "esc50.csv").write_text("\n".join(table) + "\n")
    output = tmp_path / "report"
    run_mmcl(
        "eval", "zero-shot", "--checkpoint", tmp_path / "run", "--data", esc, "--output", output,
        "--workers", "1", "--quiet", env=env,
    )  # fmt: skip
    report = json.loads((output / "results.json").read_text())
    assert report["num_samples"] == 4 and report["task"] == "zeroshot_classification"
