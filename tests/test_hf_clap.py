"""Whole transformers CLAP models (model.hf_clap, --hf-clap) on tiny random ClapModels saved with
save_pretrained: embeddings equal transformers' own, long clips (fusion, window averages), what a training
step changes, a fine-tuned run evaluated from its checkpoint alone and exported to a ClapModel folder, the
LAION-CLAP evaluation protocol against a reference computed with transformers, and LAION-CLAP's own
checkpoint format converted."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import hf_models
import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from mmcl.cli import main
from mmcl.config import load_train_config
from mmcl.data.audio import load_clip
from mmcl.errors import UsageError
from mmcl.eval.loading import load_eval_model
from mmcl.eval.protocols import caption_ranks, retrieval_rank_metrics
from mmcl.models import ModelConfig, build_model
from mmcl.models.hf_clap import require_transformers
from mmcl.train.trainer import run_training
from shards_tools.config import build_config
from shards_tools.run import run_sharding

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

RATE = 16000
SENTENCES = ["this is a sound of dog", "a rooster crows", "sea waves", "crackling fire", "a low tone"]
CAPTIONS = ["a low tone", "a high tone", "a rising tone"]
EXTRACTOR = {"sampling_rate": RATE, "hop_length": 160, "fft_window_size": 512, "max_length_s": 1}
TOLERANCE = 1e-5


def tiny_clap(folder: Path, fusion: bool, seed: int) -> None:
    """A byte-level BPE (RobertaTokenizerFast), a random ClapModel and its ClapProcessor, saved; distinct
    temperatures, to see which one goes where."""
    extractor = {**EXTRACTOR, "frequency_max": 8000}
    hf_models.tiny_clap(
        folder, SENTENCES, seed=seed, fusion=fusion, extractor=extractor, logit_scales=(2.5, 1.5)
    )


@pytest.fixture(scope="module")
def claps(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_clap")
    for seed, name in enumerate(["unfused", "fused"]):
        tiny_clap(root / name, fusion=name == "fused", seed=seed)
    return {name: root / name for name in ("unfused", "fused")}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def waves(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    """Noise plus a chirp: both loud and quiet bins, and different content along each clip."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        t = np.arange(n) / RATE
        out.append(0.05 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * (300 + 150 * i) * t * (1 + t)))
    return [w.astype(np.float32) for w in out]


def marked(clips: list[np.ndarray], samples: int) -> torch.Tensor:
    """Clips NaN-padded to `samples`, as the data pipeline hands long clips over."""
    batch = torch.full((len(clips), samples), float("nan"))
    for i, clip in enumerate(clips):
        batch[i, : len(clip)] = torch.from_numpy(clip)
    return batch


def reference(folder: Path) -> tuple:
    return (
        transformers.ClapModel.from_pretrained(folder).eval(),
        transformers.ClapProcessor.from_pretrained(folder),
    )


def reference_audio(
    folder: Path, clips: list[np.ndarray], is_longer: list[bool] | None = None
) -> torch.Tensor:
    """get_audio_features of the clips as transformers' extractor prepares them; the fusion crops at the
    middle of each third (the extractor draws them at random; mmcl takes the middle in evaluation)."""
    clap, processor = reference(folder)
    choice = np.random.choice
    np.random.choice = lambda values: values[len(values) // 2]
    try:
        inputs = processor.feature_extractor(clips, sampling_rate=RATE, return_tensors="pt")
    finally:
        np.random.choice = choice
    if is_longer is not None:  # it marks a random clip "longer" when none is
        inputs["is_longer"] = torch.tensor(is_longer)[:, None]
    with torch.no_grad():
        return clap.get_audio_features(**inputs).pooler_output


def reference_text(folder: Path, texts: list[str]) -> torch.Tensor:
    clap, processor = reference(folder)
    with torch.no_grad():
        return clap.get_text_features(
            **processor.tokenizer(texts, padding=True, return_tensors="pt")
        ).pooler_output


# ------------------------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("name, seconds", [("unfused", None), ("unfused", 0.6), ("fused", None)])
def test_embeddings_equal_transformers_own(claps, name: str, seconds: float | None, capsys) -> None:
    audio = {} if seconds is None else {"clip_seconds": seconds}  # shorter clips: the extractor's repeatpad
    model = build_model(ModelConfig(hf_clap=str(claps[name]), audio=audio)).eval()
    assert model.audio.sample_rate == RATE and model.audio.clip_samples == round(RATE * (seconds or 1))
    clips = waves([model.audio.clip_samples] * 3)
    with torch.no_grad():
        ours = model.encode_media(torch.from_numpy(np.stack(clips)))
        text = model.encode_text(model.tokenizer(CAPTIONS))
    theirs = reference_audio(claps[name], clips, is_longer=[False] * 3)
    audio_diff = float((ours - theirs).abs().max())
    text_diff = float((text - reference_text(claps[name], CAPTIONS)).abs().max())
    with capsys.disabled():
        print(
            f"\n{name} clip {seconds or 1} s: max |audio diff| {audio_diff:.2e}, |text diff| {text_diff:.2e}"
        )
    assert audio_diff < TOLERANCE and text_diff < TOLERANCE
    # the dual encoder's one temperature is logit_scale_a; logit_scale_t is kept, untrained
    assert float(model.logit_params()[0].detach()) == 2.5 and float(model.logit_scale_t) == 1.5
    assert "logit_scale_t" not in dict(model.named_parameters())


def test_fusion_of_long_clips_equals_the_extractors(claps, capsys) -> None:
    model = build_model(
        ModelConfig(hf_clap=str(claps["fused"]), audio={"long_clips": "fusion", "max_seconds": 3})
    ).eval()
    # shorter than the window, 2.5 windows, one window, longer than one window by less than a hop
    lengths = [int(0.6 * RATE), int(2.5 * RATE), RATE, RATE + 80]
    clips = waves(lengths, seed=1)
    features, is_longer = model.audio.features.fusion(marked(clips, model.max_samples), random=False)
    assert is_longer.flatten().tolist() == [False, True, False, False]
    with torch.no_grad():
        ours = model.encode_media(marked(clips, model.max_samples))
    diff = float(
        (ours - reference_audio(claps["fused"], clips, is_longer=[False, True, False, False])).abs().max()
    )
    with capsys.disabled():
        print(f"\nfusion of long clips: max |audio diff| {diff:.2e}")
    assert diff < TOLERANCE
    # in training the crops are drawn, and a batch without a long clip still uses the fusion branch
    model.train()
    _, drawn = model.audio.features.fusion(marked(clips[:1], model.max_samples), random=True)
    assert drawn.tolist() == [[True]]


def test_long_clips_averaged_over_windows(claps) -> None:
    average = build_model(
        ModelConfig(hf_clap=str(claps["unfused"]), audio={"long_clips": "average", "max_seconds": 3})
    ).eval()
    crop = build_model(ModelConfig(hf_clap=str(claps["unfused"]))).eval()
    long, short = waves([int(2.5 * RATE), int(0.4 * RATE)], seed=2)
    with torch.no_grad():
        ours = average.encode_media(marked([long, short], average.max_samples), normalize=False)
        windows = torch.from_numpy(np.stack([long[:RATE], long[RATE : 2 * RATE], long[-RATE:]]))
        expected_long = crop.encode_media(windows).mean(dim=0)
        expected_short = crop.encode_media(torch.from_numpy(np.tile(short, 3)[:RATE])[None])[0]
    torch.testing.assert_close(ours[0], expected_long, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(ours[1], expected_short, atol=TOLERANCE, rtol=0)


def test_every_audio_tower_averages_windows(tmp_path: Path) -> None:
    audio = {"tower": "cnn", "clip_seconds": 0.5, "n_mels": 32, "cnn_channels": [8, 16]}
    torch.manual_seed(0)
    crop = build_model(ModelConfig(modality="audio", audio=audio)).eval()
    average = build_model(
        ModelConfig(modality="audio", audio={**audio, "long_clips": "average", "max_seconds": 2})
    )
    average.load_state_dict(crop.state_dict())
    (clip,) = waves([int(1.2 * RATE)], seed=4)
    with torch.no_grad():
        ours = average.eval().encode_media(marked([clip], 2 * RATE))
        windows = torch.from_numpy(np.stack([clip[: RATE // 2], clip[RATE // 2 : RATE], clip[-RATE // 2 :]]))
        expected = F.normalize(crop.encode_media(windows).mean(dim=0), dim=-1)
    torch.testing.assert_close(ours[0], expected, atol=TOLERANCE, rtol=0)


def test_the_pipeline_hands_long_clips_over_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    soundfile.write(path, waves([int(1.3 * RATE)])[0], RATE)
    data = path.read_bytes()
    whole = load_clip(data, "a", sample_rate=RATE, clip_seconds=1.0, rng=None, max_seconds=2.0)
    assert whole.shape == (2 * RATE,) and int((~whole.isnan()).sum()) == int(1.3 * RATE)
    padded = load_clip(data, "a", sample_rate=RATE, clip_seconds=2.0, rng=None, padding="repeatpad")
    assert torch.equal(padded[int(1.3 * RATE) :], torch.zeros(2 * RATE - int(1.3 * RATE)))


# ------------------------------------------------------------------------------------------- training
def one_step(model) -> set[str]:
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scale_t = model.logit_scale_t.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(torch.from_numpy(np.stack(waves([RATE] * 3))), model.tokenizer(CAPTIONS))
    logits = out["logit_scale"] * out["media_features"] @ out["text_features"].T
    labels = torch.arange(3)
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    optimizer.step()
    assert torch.equal(model.logit_scale_t, scale_t)
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("freeze", [None, "media", "text"])
def test_a_training_step_changes_the_unfrozen_weights_and_only_those(claps, freeze: str | None) -> None:
    torch.manual_seed(0)
    flags = {"freeze_media": freeze == "media", "freeze_text": freeze == "text"}
    model = build_model(ModelConfig(hf_clap=str(claps["unfused"]), **flags))
    changed = one_step(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    audio = {n for n, _ in model.named_parameters() if n.startswith("audio.")}
    text = {n for n, _ in model.named_parameters() if n.startswith("text.")}
    assert changed <= trainable and "logit_scale" in changed
    if freeze == "media":  # the whole pretrained tower, projection included, is locked (and in eval mode)
        assert not changed & audio and not model.audio.training and not audio & trainable
    else:
        assert {"audio.proj.linear1.weight", "audio.proj.linear2.weight"} <= changed
        assert any(n.startswith("audio.encoder.") for n in changed)
    if freeze == "text":
        assert not changed & text and not model.text.training and not text & trainable
    else:
        assert any(n.startswith("text.encoder.") for n in changed) and "text.proj.linear2.weight" in changed


def test_gradient_checkpointing_gives_the_same_gradients(claps) -> None:
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(hf_clap=str(claps["unfused"]), grad_checkpointing=checkpointing))
        for module in model.modules():  # dropout off, so both passes compute the same function
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        out = model.train()(torch.from_numpy(np.stack(waves([RATE] * 2))), model.tokenizer(CAPTIONS[:2]))
        (out["media_features"] @ out["text_features"].T).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert model.text.encoder.encoder.gradient_checkpointing
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("text.encoder") for k in grads[0])
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], msg=key)


def test_config_conflicts_are_validation_errors_naming_the_keys(claps, tmp_path: Path) -> None:
    folder = str(claps["unfused"])
    for values, message in [
        ({"hf_text": "roberta-base"}, "model.hf_text and model.hf_clap"),
        ({"open_clip_name": "ViT-B-32"}, "model.open_clip_name and model.hf_clap"),
        ({"siglip": True}, "model.siglip and model.hf_clap"),
        ({"modality": "image"}, "model.modality is 'image'"),
        ({"audio": {"n_mels": 32}}, "model.audio.n_mels does not apply with model.hf_clap"),
        ({"audio": {"tower": "cnn"}}, "model.audio.tower does not apply with model.hf_clap"),
        ({"audio": {"clip_seconds": 3}}, "clip_seconds=3 is longer than the 1 s"),
        ({"audio": {"long_clips": "fusion"}}, "long_clips: fusion needs a CLAP model with enable_fusion"),
    ]:
        with pytest.raises(ValidationError, match=message):
            ModelConfig(hf_clap=folder, **values)
    with pytest.raises(ValidationError, match="model.hf_clap_pretrained is set but model.hf_clap is not"):
        ModelConfig(modality="audio", hf_clap_pretrained=False)
    (tmp_path / "config.json").write_text('{"model_type": "roberta"}')
    with pytest.raises(ValidationError, match="holds a 'roberta' model, not a whole ClapModel"):
        ModelConfig(hf_clap=str(tmp_path))
    with pytest.raises(ValidationError, match="model.hf_clap=.* is not a folder"):
        ModelConfig(hf_clap=str(tmp_path / "absent"))
    with pytest.raises(ValidationError, match="long_clips: fusion needs a CLAP fusion model"):
        ModelConfig(modality="audio", audio={"long_clips": "fusion"})


def test_without_transformers_the_error_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UsageError, match=r"model.hf_clap needs .* pip install 'mmcl\[hf\]'"):
        require_transformers()


# --------------------------------------------------------------------------------- train, eval, export
def tone_shards(root: Path) -> Path:
    audio = root / "audio"
    audio.mkdir(parents=True)
    for i in range(24):
        seconds = 0.6 + 0.25 * (i % 7)  # some shorter than the window, some longer than two
        soundfile.write(audio / f"t{i:02d}.wav", waves([int(seconds * 22050)], seed=i)[0], 22050)
        (audio / f"t{i:02d}.txt").write_text(f"a tone at {[220, 440, 880][i % 3]} hertz")
    source = {"input": {"modality": "audio", "path": audio}, "output": root / "shards", "shard_size": 8}
    run_sharding(build_config({**source, "workers": 1}), progress=False)
    return root / "shards"


def test_a_fine_tuned_run_evaluates_from_its_checkpoint_and_exports_a_clap_model(
    claps, tmp_path: Path, capsys
) -> None:
    weights = tmp_path / "clap"
    shutil.copytree(claps["unfused"], weights)
    config = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"hf_clap": str(weights), "audio": {"long_clips": "average", "max_seconds": 2.5}},
        "data": {"sources": [{"urls": str(tone_shards(tmp_path))}], "batch_size": 8, "workers": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": 2, "log_every": 1, "checkpoint_every": 2},
    }
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    loaded = load_train_config(tmp_path / "c.yaml")
    assert (loaded.data.sample_rate, loaded.data.clip_seconds, loaded.data.max_seconds) == (RATE, 1.0, 2.5)
    run_training(loaded)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert (checkpoint / "hf" / "config.json").is_file() and (checkpoint / "hf" / "tokenizer.json").is_file()
    shutil.rmtree(weights)  # from here on the original folder is gone
    ours = load_eval_model(checkpoint=tmp_path / "run")
    assert ours.long_clips == "average" and ours.max_samples == int(2.5 * RATE)

    out = tmp_path / "exported"
    assert main(["export", "--format", "hf", str(tmp_path / "run"), str(out)]) == 0
    capsys.readouterr()
    clips = waves([RATE] * 3, seed=5)
    with torch.no_grad():
        mine = ours.encode_media(marked(clips, ours.max_samples))  # one window each
        text = ours.encode_text(ours.tokenizer(CAPTIONS))
    audio_diff = float((mine - reference_audio(out, clips, is_longer=[False] * 3)).abs().max())
    text_diff = float((text - reference_text(out, CAPTIONS)).abs().max())
    with capsys.disabled():
        print(f"\nexported ClapModel: max |audio diff| {audio_diff:.2e}, |text diff| {text_diff:.2e}")
    assert audio_diff < TOLERANCE and text_diff < TOLERANCE
    exported = transformers.ClapModel.from_pretrained(out)
    assert float(exported.logit_scale_a.detach()) == float(ours.logit_scale.detach()) != 2.5  # trained
    assert float(exported.logit_scale_t.detach()) == 1.5  # kept

    esc = esc50_folder(tmp_path / "ESC-50-master", folds=(1,))
    assert main(["eval", "zero-shot", "--checkpoint", str(tmp_path / "run"), "--data", str(esc),
                 "--output", str(tmp_path / "report"), "--workers", "0", "--quiet"]) == 0  # fmt: skip
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["num_samples"] == 3 and Path(results["model"]).name == "clap"


def test_audio_runs_of_other_towers_are_refused_by_export_with_the_reason(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "checkpoints" / "step-00000001"
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps({"modality": "audio"}))
    (folder / "COMPLETE").write_text("ok\n")
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "towers no transformers class loads" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the LAION-CLAP protocol
ESC_CLASSES = [(0, "dog"), (11, "sea_waves"), (12, "crackling_fire")]


def esc50_folder(root: Path, folds=(1, 2)) -> Path:
    """ESC-50's layout: meta/esc50.csv + audio/, real clips at 16 kHz (some shorter than the 1 s window,
    one longer), in folds 1 and 2."""
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    lengths = [0.5, 0.7, 1.6]
    for fold in folds:
        for i, (target, category) in enumerate(ESC_CLASSES):
            name = f"{fold}-{100 + i}-A-{target}.wav"
            seconds = lengths[(i + fold) % 3]
            clip = waves([int(seconds * RATE)], seed=10 * fold + i)[0]
            (root / "audio").mkdir(parents=True, exist_ok=True)
            soundfile.write(root / "audio" / name, clip, RATE, subtype="FLOAT")
            rows.append(f"{name},{fold},{target},{category},False,{i},A")
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return root


def reference_zero_shot(folder: Path, esc: Path) -> tuple[np.ndarray, np.ndarray]:
    """Fold 1 of ESC-50 classified with transformers alone, as LAION-CLAP's protocol says: prompts
    "This is a sound of <name with spaces>"; a clip shorter than the window repeatpad-ded (the extractor),
    a longer one cut to its centre window, or for a fusion model given whole to the extractor's fusion;
    the clips' logits over the classes and their true classes."""
    table = [line.split(",") for line in (esc / "meta" / "esc50.csv").read_text().splitlines()[1:]]
    rows = [row for row in table if row[1] == "1"]
    names = {t: c.replace("_", " ") for t, c in ESC_CLASSES}
    targets = sorted(names)
    fusion = folder.name == "fused"
    clips = []
    for row in rows:
        clip, _ = soundfile.read(esc / "audio" / row[0], dtype="float32")
        excess = len(clip) - RATE
        clips.append(clip[excess // 2 : excess // 2 + RATE] if excess > 0 and not fusion else clip)
    audio = reference_audio(folder, clips)  # one clip is longer: the extractor marks no other
    text = reference_text(folder, [f"This is a sound of {names[t]}" for t in targets])
    logits = (audio @ text.T).numpy()
    labels = np.array([targets.index(int(row[2])) for row in rows])
    return logits, labels


@pytest.mark.parametrize("name", ["unfused", "fused"])
def test_laion_clap_protocol_matches_a_transformers_reference(claps, name: str, tmp_path: Path) -> None:
    esc = esc50_folder(tmp_path / "ESC-50-master")
    out = tmp_path / "report"
    assert main(["eval", "zero-shot", "--hf-clap", str(claps[name]), "--protocol", "laion-clap", "--data",
                 str(esc), "--output", str(out), "--workers", "0", "--quiet"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    logits, labels = reference_zero_shot(claps[name], esc)
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    assert results["num_samples"] == 3 and results["options"]["folds"] == [1]
    assert results["class_names"] == ["dog", "sea waves", "crackling fire"]
    assert results["options"]["templates"] == "This is a sound of {}"
    assert results["confusion_matrix"] == confusion.tolist()  # the same prediction for every clip
    ranks = (logits > logits[np.arange(3), labels][:, None]).sum(axis=1)
    metrics = results["metrics"]
    assert metrics["acc1"] == pytest.approx(np.mean(ranks < 1))
    assert metrics["mean_rank"] == pytest.approx(ranks.mean() + 1)
    assert metrics["median_rank"] == np.floor(np.median(ranks)) + 1
    assert metrics["map@10"] == pytest.approx(np.mean(1 / (ranks + 1)))
    assert metrics["acc10"] == 1.0
    assert results["options"]["audio"] == {"long_clips": "fusion" if name == "fused" else "crop"}


def test_laion_clap_protocol_refuses_what_conflicts_with_it(claps, tmp_path: Path, capsys) -> None:
    esc = esc50_folder(tmp_path / "ESC-50-master", folds=(1,))
    base = ["eval", "zero-shot", "--hf-clap", str(claps["unfused"]), "--protocol", "laion-clap", "--data",
            str(esc), "--output", str(tmp_path / "r"), "--workers", "0", "--quiet"]  # fmt: skip
    for extra, message in [
        (["--templates", "short"], "--templates conflicts with --protocol laion-clap"),
        (["--debias"], "--debias conflicts"),
        (["--folds", "2"], "--folds conflicts"),
        (["--max-samples", "2"], "--max-samples conflicts"),
        (["--long-clips", "average"], "--long-clips average conflicts with --protocol laion-clap"),
        (["--format", "class-folder"], "covers ESC-50 and UrbanSound8K"),
    ]:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err


def laion_code_metrics(audio: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
    """LAION-CLAP's evaluate_clotho_audiocaps (training/train.py), transcribed: 5 captions per clip."""
    n = len(audio)
    logits_per_audio = audio @ text.T
    logits_per_text = logits_per_audio.T
    pred_text = []
    for d in range(5):
        logit = logits_per_text.reshape(n, 5, n)[:, d, :]
        ranking = torch.argsort(logit, descending=True)
        pred_text.append(torch.where(ranking == torch.arange(n).view(-1, 1))[1].numpy())
    pred_text = np.concatenate(pred_text)
    metrics = {"audio_retrieval_mean_rank": pred_text.mean() + 1}
    metrics["audio_retrieval_median_rank"] = np.floor(np.median(pred_text)) + 1
    metrics |= {f"audio_retrieval_recall@{k}": np.mean(pred_text < k) for k in (1, 5, 10)}
    metrics["audio_retrieval_map@10"] = np.mean(np.where(pred_text < 10, 1 / (pred_text + 1), 0.0))
    map_all, best = [], []
    for d in range(n):
        ranking = torch.argsort(logits_per_audio[d], descending=True)
        truth = torch.arange(d * 5, d * 5 + 5)[None]
        all_pred = torch.where(torch.stack([ranking] * 5) == truth.view(-1, 1))[1]
        best.append(int(all_pred.min()))
        kept = all_pred[all_pred < 10].numpy()
        map_all.append(np.sum(np.arange(1, len(kept) + 1) / (kept + 1)) / 5)
    metrics["text_retrieval_map@10_laion_code"] = np.mean(map_all)
    metrics |= {f"text_retrieval_recall@{k}": np.mean(np.array(best) < k) for k in (1, 5, 10)}
    return metrics


def test_retrieval_metrics_are_laion_clap_s(capsys) -> None:
    generator = torch.Generator().manual_seed(0)
    audio = F.normalize(torch.randn(7, 8, generator=generator), dim=-1)
    text = F.normalize(
        audio.repeat_interleave(5, dim=0) + 0.9 * torch.randn(35, 8, generator=generator), dim=-1
    )
    owner = torch.arange(35) // 5
    scores = text @ audio.T
    text_ranks = (scores > scores.gather(1, owner[:, None])).sum(dim=1)
    ours = retrieval_rank_metrics(audio, text, text_ranks, "audio", 5)
    for key, value in laion_code_metrics(audio, text).items():
        assert ours[key] == pytest.approx(value), key
    # map@10 proper takes an item's captions in rank order (LAION-CLAP's docstring), hence never above 1
    ranks = caption_ranks(audio, text, 5).sort(dim=1).values.double()
    expected = torch.where(ranks < 10, torch.arange(1, 6) / (ranks + 1), 0.0).sum(dim=1) / 5
    assert ours["text_retrieval_map@10"] == pytest.approx(float(expected.mean()))


def test_retrieval_protocol_on_captioned_shards(claps, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    for i, clip in enumerate(waves([int(0.5 * RATE)] * 4 + [int(1.4 * RATE)] * 2, seed=3)):
        soundfile.write(folder / f"c{i}.wav", clip, RATE)
        count = 5 if i else 4  # the first clip has 4 captions
        (folder / f"c{i}.txt").write_text("\n".join(f"tone {i} take {j}" for j in range(count)) + "\n")
    source = {"input": {"modality": "audio", "path": folder}, "output": tmp_path / "shards", "shard_size": 3}
    run_sharding(build_config({**source, "workers": 1}), progress=False)
    command = ["eval", "retrieval", "--hf-clap", str(claps["unfused"]), "--protocol", "laion-clap",
               "--data", str(tmp_path / "shards"), "--output", str(tmp_path / "r"), "--workers", "0",
               "--quiet"]  # fmt: skip
    assert main(command) == 2
    assert "has 4 captions" in capsys.readouterr().err
    (folder / "c0.txt").write_text("\n".join(f"tone 0 take {j}" for j in range(5)) + "\n")
    shutil.rmtree(tmp_path / "shards")
    run_sharding(build_config({**source, "workers": 1}), progress=False)
    assert main(command) == 0
    metrics = json.loads((tmp_path / "r" / "results.json").read_text())["metrics"]
    expected = {
        "audio_retrieval_recall@1",
        "text_retrieval_recall@10",
        "audio_retrieval_map@10",
        "text_retrieval_map@10",
        "text_retrieval_map@10_laion_code",
        "audio_retrieval_median_rank",
    }
    assert expected <= set(metrics)


# ----------------------------------------------------------------------- LAION-CLAP's checkpoint format
def to_laion(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ClapModel's state dict under LAION-CLAP's names (clap_module/model.py, htsat.py): the inverse of
    transformers' renaming, plus the parts LAION-CLAP has and a ClapModel lacks."""
    laion = {}
    for key, value in state.items():
        audio = key.startswith("audio_model.")
        if audio and (".attention.self.key." in key or ".attention.self.value." in key):
            continue  # folded into qkv below
        if audio and ".attention.self.query." in key:
            value = torch.cat(
                [state[key.replace(".query.", f".{part}.")] for part in ("query", "key", "value")]
            )
            key = key.replace(".attention.self.query.", ".attn.qkv.")
        key = key.replace("text_model.", "text_branch.").replace(
            "audio_model.audio_encoder.", "audio_branch."
        )
        for projection in ("text_projection", "audio_projection"):
            key = key.replace(f"{projection}.linear1.", f"{projection}.0.")
            key = key.replace(f"{projection}.linear2.", f"{projection}.2.")
        if audio:
            for ours, theirs in [
                ("attention.output.dense", "attn.proj"), ("attention.self.", "attn."),
                ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"), ("layernorm_before", "norm1"),
                ("layernorm_after", "norm2"), ("batch_norm", "bn0"),
            ]:  # fmt: skip
                key = key.replace(ours, theirs)
        laion[key] = value
    extras = {
        "audio_branch.spectrogram_extractor.stft.conv_real.weight": torch.zeros(257, 1, 512),
        "audio_branch.logmel_extractor.melW": torch.zeros(257, 64),
        "audio_branch.tscam_conv.weight": torch.zeros(527, 128, 2, 3),
        "audio_branch.head.weight": torch.zeros(527, 527),
        "audio_branch.layers.0.blocks.0.attn_mask": torch.zeros(4, 64, 64),
        "text_transform.sequential.0.weight": torch.zeros(16, 16),
        "text_transform.sequential.3.weight": torch.zeros(16, 16),
        "audio_transform.sequential.0.bias": torch.zeros(16),
    }
    return {**laion, **extras}


def test_laion_clap_checkpoints_convert_to_clap_models(claps, tmp_path: Path, capsys) -> None:
    original = transformers.ClapModel.from_pretrained(claps["unfused"])
    state = original.state_dict()
    laion = to_laion(state)
    assert "audio_branch.layers.0.blocks.0.attn.qkv.weight" in laion and "text_projection.2.bias" in laion
    checkpoint = tmp_path / "630k-tiny.pt"  # as LAION-CLAP's trainer saves it: DDP keys, epoch, optimizer
    torch.save(
        {"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in laion.items()}}, checkpoint
    )
    out = tmp_path / "converted"
    assert main(["convert", "laion-clap", str(checkpoint), str(out), "--like", str(claps["unfused"])]) == 0
    converted = transformers.ClapModel.from_pretrained(out).state_dict()
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)
    model = load_eval_model(hf_clap=str(out))  # and mmcl loads the folder
    assert model.encode_text(model.tokenizer(CAPTIONS)).shape == (3, 16)
    # a checkpoint of another architecture is refused, naming what does not fit
    assert (
        main(["convert", "laion-clap", str(checkpoint), str(tmp_path / "x"), "--like", str(claps["fused"])])
        == 2
    )
    assert "lacks weights" in capsys.readouterr().err
