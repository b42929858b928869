"""Pretrained transformers text towers (model.hf_text): tiny random RoBERTa, BERT and T5 encoders with their
own tokenizers, saved with save_pretrained, used by image and audio models; features against transformers'
own outputs, what a training step changes, a training run evaluated and loaded by open_clip, and the
config errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import hf_models
import huggingface_hub
import open_clip
import pytest
import torch
import torch.nn.functional as F
from media_files import COLOURS, make_image
from pydantic import ValidationError
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5Model,
    T5TokenizerFast,
)

from mmcl.cli import main as mmcl_main
from mmcl.config import load_train_config
from mmcl.errors import UsageError
from mmcl.eval.loading import load_eval_model
from mmcl.losses.contrastive import contrastive_loss
from mmcl.models import ModelConfig, build_model, get_tokenizer
from mmcl.models.factory import BUNDLED_CONFIG_DIR
from mmcl.train.optim import param_groups
from mmcl.train.trainer import run_training
from shards_tools.config import build_config
from shards_tools.run import run_sharding

SENTENCES = [
    "a photo of a red square",
    "a dog barks loudly in the park",
    "the sound of rain on a window",
    "people talking in a crowded room",
    "birds sing in the morning",
    "a blue circle on a white background",
]
CAPTIONS = ["a red square", "a dog barks", "the sound of heavy rain", "zebra xylophone"]  # + unseen words
CONTEXT = 32  # mmcl-micro-vit's text_cfg.context_length
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
MICRO_AUDIO = {"clip_seconds": 1.0, "n_mels": 32, "patch_size": (8, 10), "width": 64, "layers": 2, "heads": 2}
# Each encoder with the pooler and projection it is tested with (BERT: its own pooler output, linear).
MICRO_VIT = json.loads((BUNDLED_CONFIG_DIR / "mmcl-micro-vit.json").read_text())
ARCHS = {"roberta": ("mean_pooler", "mlp"), "bert": ("cls_pooler", "linear"), "t5": ("mean_pooler", "mlp")}


def tiny_roberta(folder: Path) -> None:
    """A byte-level BPE trained on the sentences, as RobertaTokenizerFast, and a random RobertaModel."""
    hf_models.tiny_roberta(folder, SENTENCES, context=CONTEXT, sizes=TINY)


def tiny_bert(folder: Path) -> None:
    """A WordPiece vocabulary file (words and letters) as BertTokenizerFast, and a random BertModel."""
    words = sorted({w for s in SENTENCES for w in s.split()})
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters, *(f"##{c}" for c in letters)]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=64, **TINY)).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)


def tiny_t5(folder: Path) -> None:
    """A Unigram (SentencePiece-style) tokenizer as T5TokenizerFast, and a random T5Model (the text tower
    uses its encoder)."""
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    unigram.train_from_iterator(SENTENCES, trainer)
    eos = unigram.token_to_id("</s>")
    unigram.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    tokenizer = T5TokenizerFast(
        tokenizer_object=unigram, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    T5Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    folders = {name: root / name for name in ARCHS}
    tiny_roberta(folders["roberta"])
    tiny_bert(folders["bert"])
    tiny_t5(folders["t5"])
    return folders


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_cfg(modality: str, folder: Path, arch: str = "roberta", **overrides) -> ModelConfig:
    pooler, proj = ARCHS[arch]
    if modality == "audio":
        overrides.setdefault("audio", MICRO_AUDIO)
    return ModelConfig(
        modality=modality,
        open_clip_name="mmcl-micro-vit",
        hf_text=str(folder),
        hf_text_pooler=pooler,
        hf_text_proj=proj,
        **overrides,
    )


def text_tower(model) -> torch.nn.Module:
    return model.clip.text if model.modality == "image" else model.text


def media_for(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if model.modality == "image":
        return torch.randn(len(CAPTIONS), 3, 64, 64, generator=gen)
    return 0.1 * torch.randn(len(CAPTIONS), 16000, generator=gen)


def reference_features(folder: Path, arch: str, proj: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and unnormalised text features computed with transformers alone: its tokenizer, its
    encoder's output pooled as open_clip's poolers do, then the tower's own projection weights."""
    ids = AutoTokenizer.from_pretrained(folder)(
        CAPTIONS, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt"
    ).input_ids
    mask = (ids != AutoTokenizer.from_pretrained(folder).pad_token_id).long()
    encoder = (T5EncoderModel if arch == "t5" else AutoModel).from_pretrained(folder).eval()
    with torch.no_grad():
        out = encoder(input_ids=ids, attention_mask=mask)
        if ARCHS[arch][0] == "cls_pooler":
            pooled = out.pooler_output
        else:
            pooled = (out.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        if ARCHS[arch][1] == "linear":
            return ids, F.linear(pooled, proj.weight)
        return ids, F.linear(F.gelu(F.linear(pooled, proj[0].weight)), proj[2].weight)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("modality", ["image", "audio"])
def test_text_features_equal_transformers_own_outputs(encoders, arch, modality):
    model = build_model(hf_cfg(modality, encoders[arch], arch)).eval()
    assert type(model.tokenizer).__name__ == "HFTokenizer"
    assert type(text_tower(model)).__name__ == "HFTextEncoder"
    tokens = model.tokenizer(CAPTIONS)
    ids, expected = reference_features(encoders[arch], arch, text_tower(model).proj)
    assert torch.equal(tokens, ids) and tokens.shape == (len(CAPTIONS), CONTEXT)
    assert torch.equal(get_tokenizer(hf_cfg(modality, encoders[arch], arch))(CAPTIONS), ids)
    with torch.no_grad():
        features = model.encode_text(tokens, normalize=False)
        normalized = model.encode_text(tokens)
    assert features.shape == (len(CAPTIONS), model.embed_dim)
    print(f"{arch} {modality}: max |mmcl - transformers| = {(features - expected).abs().max().item():.2e}")
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(normalized, F.normalize(expected, dim=-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("freeze_text", [False, True])
@pytest.mark.parametrize("modality", ["image", "audio"])
def test_a_training_step_changes_the_unfrozen_weights_and_only_those(encoders, modality, freeze_text):
    torch.manual_seed(0)
    model = build_model(hf_cfg(modality, encoders["roberta"], freeze_text=freeze_text)).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    out = model(media_for(model), model.tokenizer(CAPTIONS))
    loss = contrastive_loss(out["media_features"], out["text_features"], out["logit_scale"], gather=False)
    loss["loss"].backward()
    optimizer.step()

    params = dict(model.named_parameters())
    changed = {name for name, p in params.items() if not torch.equal(p, before[name])}
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert changed == trainable
    prefix = "clip.text." if modality == "image" else "text."
    encoder = {name for name in params if name.startswith(prefix + "transformer.")}
    projection = {name for name in params if name.startswith(prefix + "proj.")}
    assert encoder and projection and projection <= changed  # the new projection trains in both cases
    if freeze_text:
        assert not encoder & changed and not encoder & trainable
        assert all(params[name].grad is None for name in encoder)
        assert not any(m.training for m in text_tower(model).transformer.modules())
        model.eval().train()
        assert not text_tower(model).transformer.training
    else:
        assert encoder <= changed
        assert text_tower(model).transformer.training


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_grad_checkpointing_gives_the_same_gradients(encoders, modality):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        overrides = {"audio": {**MICRO_AUDIO, "spec_augment": {"freq_masks": 0, "time_masks": 0}}}
        model = build_model(
            hf_cfg(
                modality,
                encoders["bert"],
                "bert",
                grad_checkpointing=checkpointing,
                **(overrides if modality == "audio" else {}),
            )
        ).train()
        modules = text_tower(model).transformer.modules()
        assert any(getattr(m, "gradient_checkpointing", False) for m in modules) == checkpointing
        out = model(media_for(model), model.tokenizer(CAPTIONS))
        (out["media_features"] @ out["text_features"].T).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_an_audio_model_rebuilds_from_its_saved_config_without_the_encoder_weights(encoders, tmp_path):
    folder = tmp_path / "encoder"
    shutil.copytree(encoders["t5"], folder)
    torch.manual_seed(0)
    model = build_model(hf_cfg("audio", folder, "t5")).eval()
    state = model.state_dict()
    (folder / "model.safetensors").unlink()  # only the config and tokenizer are needed from here on
    rebuilt = build_model(hf_cfg("audio", folder, "t5", hf_text_pretrained=False)).eval()
    assert rebuilt.state_dict().keys() == state.keys()
    tokens = model.tokenizer(CAPTIONS)
    with torch.no_grad():
        assert not torch.equal(rebuilt.encode_text(tokens), model.encode_text(tokens))  # random weights
        rebuilt.load_state_dict(state)
        assert torch.equal(rebuilt.encode_text(tokens), model.encode_text(tokens))
    with pytest.raises(UsageError, match="model.hf_text=.* holds a config but no weights"):
        build_model(hf_cfg("audio", folder, "t5"))


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_text_images")
    rows = []
    for i in range(48):
        colour = COLOURS[i % len(COLOURS)]
        make_image(root / "in" / f"{i:03d}.png", colour, size=(40, 40), seed=i)
        rows.append(f"{i:03d}.png,a photo of a {colour} square\n")
    (root / "in" / "m.csv").write_text("path,caption\n" + "".join(rows))
    config = {"input": {"modality": "image", "path": root / "in" / "m.csv"}, "output": root / "shards"}
    run_sharding(build_config({**config, "shard_size": 12, "workers": 1}), progress=False)
    return root / "shards"


def test_a_trained_run_evaluates_and_loads_in_open_clip(encoders, image_shards, tmp_path, capsys):
    encoder = tmp_path / "roberta"
    shutil.copytree(encoders["roberta"], encoder)
    config = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"modality": "image", "open_clip_name": "mmcl-micro-vit", "hf_text": str(encoder)},
        "data": {
            "sources": [{"urls": str(image_shards)}],
            "batch_size": 8,
            "workers": 0,
            "shuffle_buffer": 20,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": 3, "log_every": 1, "checkpoint_every": 3},
    }
    (tmp_path / "train.yaml").write_text(json.dumps(config))
    run_training(load_train_config(tmp_path / "train.yaml"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    weights = load_file(checkpoint / "model.safetensors")
    assert any(k.startswith("text.transformer.") for k in weights)  # open_clip's CustomTextCLIP layout

    # Evaluation rebuilds the tower from the encoder's config and tokenizer alone: its weights are not read.
    (encoder / "model.safetensors").unlink()
    argv = ["eval", "retrieval", "--checkpoint", str(tmp_path / "run"), "--data", str(image_shards)]
    assert mmcl_main([*argv, "--output", str(tmp_path / "eval"), "--workers", "0", "--quiet"]) == 0
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["num_items"] == 48 and 0 <= report["metrics"]["text_retrieval_recall@1"] <= 1

    # open_clip loads the checkpoint with the same config written as an open_clip hf_model_name config.
    text_cfg = {"hf_model_name": str(encoder), "hf_tokenizer_name": str(encoder), "context_length": CONTEXT}
    text_cfg |= {"hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp"}
    (tmp_path / "micro-vit-roberta.json").write_text(json.dumps({**MICRO_VIT, "text_cfg": text_cfg}))
    open_clip.add_model_config(tmp_path / "micro-vit-roberta.json")
    theirs, _, _ = open_clip.create_model_and_transforms(
        "micro-vit-roberta", pretrained=str(checkpoint / "model.safetensors")
    )
    theirs.eval()
    ours = load_eval_model(checkpoint=tmp_path / "run")
    tokens = open_clip.get_tokenizer("micro-vit-roberta")(CAPTIONS)
    assert torch.equal(tokens, ours.tokenizer(CAPTIONS))
    with torch.no_grad():
        assert torch.equal(theirs.encode_text(tokens), ours.encode_text(tokens, normalize=False))
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in weights.items())

    # mmcl export writes an open_clip folder that carries the tokenizer open_clip's local-dir reads.
    assert mmcl_main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'exported'}")
    exported.eval()
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{tmp_path / 'exported'}")(CAPTIONS), tokens)
    with torch.no_grad():
        assert torch.equal(exported.encode_text(tokens), ours.encode_text(tokens, normalize=False))

    shutil.rmtree(encoder)
    capsys.readouterr()
    assert mmcl_main([*argv, "--output", str(tmp_path / "eval2"), "--quiet"]) == 2
    assert f"model.hf_text={str(encoder)!r}: no such folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hf_text_pooler": "cls_pooler"}, "model.hf_text_pooler is set but model.hf_text is not"),
        (
            {"modality": "audio", "hf_text": "roberta-base", "text_pretrained": "x.safetensors"},
            "model.hf_text (a transformers text tower) and model.text_pretrained",
        ),
        ({"hf_text": "roberta-base", "open_clip_name": "hf-hub:org/model"}, "use a named or inline"),
        (
            {
                "hf_text": "roberta-base",
                "open_clip_config": {
                    "embed_dim": 64,
                    "vision_cfg": {"layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
                    "text_cfg": {"hf_model_name": "bert-base-uncased"},
                },
            },
            "model.open_clip_config.text_cfg.hf_model_name both choose",
        ),
        ({"hf_text": "roberta-base", "hf_text_pooler": "max_pooler"}, "hf_text_pooler"),
        ({"hf_text": ""}, "hf_text"),
    ],
)
def test_contradicting_settings_are_validation_errors_naming_the_keys(kwargs, message):
    with pytest.raises(ValidationError) as info:
        ModelConfig(**kwargs)
    assert message in str(info.value)


def test_bad_references_are_usage_errors_naming_the_key(encoders, tmp_path, monkeypatch):
    roberta = str(encoders["roberta"])
    cases = [
        (hf_cfg("image", tmp_path / "missing" / "encoder"), "model.hf_text=.*: no such folder"),
        (hf_cfg("audio", tmp_path), "model.hf_text=.* holds no config.json"),
        (
            ModelConfig(open_clip_name="roberta-ViT-B-32", hf_text=str(encoders["bert"])),
            "text_cfg.hf_model_name is 'roberta-base'\\) both choose",
        ),
        (hf_cfg("image", encoders["bert"], "bert", pretrained="openai"), "'openai' is an open_clip tag"),
        (
            ModelConfig(open_clip_config={**MICRO_VIT, "text_cfg": {"context_length": 33}}, hf_text=roberta),
            "model.hf_text=.* takes at most 32 tokens, but .* text_cfg.context_length is 33",
        ),
    ]
    if huggingface_hub.constants.HF_HUB_OFFLINE:  # never reach for the network
        cases.append(
            (hf_cfg("image", Path("no-such-org/no-such-model")), "model.hf_text=.* cannot be loaded")
        )
    for cfg, message in cases:
        with pytest.raises(UsageError, match=message):
            build_model(cfg)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec",
        lambda name, *a: None if name == "transformers" else real_find_spec(name, *a),
    )
    with pytest.raises(UsageError, match=r"needs Hugging Face transformers: pip install 'mmcl\[hf\]'"):
        build_model(hf_cfg("image", encoders["roberta"]))


def test_a_relative_folder_is_recorded_as_an_absolute_path(encoders, monkeypatch):
    monkeypatch.chdir(encoders["roberta"].parent)
    assert ModelConfig(hf_text="roberta").hf_text == str(encoders["roberta"])
    assert ModelConfig(hf_text="FacebookAI/roberta-base").hf_text == "FacebookAI/roberta-base"
