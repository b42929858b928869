"""mmcl.eval: the classifier agrees with open_clip, metrics agree with brute force and hand-made cases,
every data layout reads correctly, and a model trained by the project on real data (scikit-learn's
handwritten digits) classifies held-out digits zero-shot far above chance through `mmcl eval`."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
import yaml
from media_files import make_image, make_tone
from PIL import Image
from processes import run_mmcl
from pydantic import ValidationError

from mmcl.cli import main as mmcl_main
from mmcl.errors import UsageError
from mmcl.eval.config import EvalConfig
from mmcl.eval.datasets import MediaDecoder, open_classification, open_retrieval
from mmcl.eval.loading import load_eval_model, model_source
from mmcl.eval.periodic import check_eval_data, evaluate_during_training
from mmcl.eval.retrieval import media_to_text_ranks, retrieval_metrics, text_to_media_ranks
from mmcl.eval.templates import OPENAI_IMAGENET_TEMPLATES, SHORT_IMAGE_TEMPLATES, load_templates
from mmcl.eval.zero_shot import (
    build_classifier,
    classification_metrics,
    debias_logits,
    evaluate_zero_shot,
    extract_features,
)
from mmcl.models import ModelConfig, build_model, save_open_clip_weights
from shards_tools.config import build_config
from shards_tools.run import run_sharding

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# mmcl-micro-vit at 32 px with 16 text tokens: the 8x8 digits need no more, and it trains ~2x faster.
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def micro_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(open_clip_name="mmcl-micro-vit")).eval()


def pixels(image: Image.Image) -> torch.Tensor:
    """A transform that keeps the exact pixels [H, W, 3], to check how layouts store images."""
    return torch.from_numpy(np.asarray(image).copy())


def items_of(data, decoder: MediaDecoder, max_samples: int | None = None) -> list[dict]:
    return [item for item in data.dataset(decoder, max_samples) if item is not None]


# ------------------------------------------------------------------------------------ classifier
def test_classifier_agrees_with_open_clip(micro_model) -> None:
    names = ["cat", "dog", "red car", "tree", "digit seven", "boat", "cloud"]
    templates = list(SHORT_IMAGE_TEMPLATES)
    ours = build_classifier(micro_model, names, templates, batch_size=5)  # batches cut across classes
    theirs = open_clip.build_zero_shot_classifier(
        micro_model.clip, micro_model.tokenizer, names, templates, num_classes_per_batch=3
    )
    assert ours.shape == (micro_model.embed_dim, len(names))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.norm(dim=0), torch.ones(len(names)))


def test_builtin_and_file_templates(tmp_path: Path) -> None:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as OPEN_CLIP_TEMPLATES

    assert [t.format("cat") for t in OPENAI_IMAGENET_TEMPLATES] == [t("cat") for t in OPEN_CLIP_TEMPLATES]
    assert load_templates(None, "image") == list(OPENAI_IMAGENET_TEMPLATES)
    assert load_templates("auto", "audio")[0] == "This is a sound of {}."
    good = tmp_path / "t.txt"
    good.write_text("# digits\na photo of the digit {}.\n\nthe number {} written by hand\n")
    assert load_templates(str(good), "image") == ["a photo of the digit {}.", "the number {} written by hand"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {label}\n")
    with pytest.raises(UsageError, match="not a format string"):
        load_templates(str(bad), "image")
    bad.write_text("a photo\n")
    with pytest.raises(UsageError, match="exactly once"):
        load_templates(str(bad), "image")
    with pytest.raises(UsageError, match="neither a built-in set"):
        load_templates("fancy", "image")


# ------------------------------------------------------------------------------------ metrics
def test_classification_metrics_on_hand_made_logits() -> None:
    names = ["a", "b", "c", "d", "e", "f"]
    # Rows are items; the true class is `labels[i]`; class f has no items.
    logits = torch.tensor(
        [
            [9, 1, 0, 0, 0, 0],  # a -> a (top1)
            [1, 9, 0, 0, 0, 0],  # a -> b, a is 2nd (top5 hit)
            [0, 9, 1, 0, 0, 0],  # b -> b
            [0, 0, 9, 0, 0, 0],  # c -> c
            [0, 0, 5, 9, 0, 0],  # c -> d, c is 2nd
            [9, 8, 7, 6, 5, 0],  # d -> a, d is 4th (top5 hit)
            [9, 8, 7, 6, 5, 0],  # e -> a, e is 5th (top5 hit)
            [1, 1, 1, 1, 0, 9],  # e -> f, e is last (top5 miss)
        ],
        dtype=torch.float,
    )
    labels = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])
    m = classification_metrics(logits, labels, names)
    assert m["acc1"] == pytest.approx(3 / 8)
    assert m["acc5"] == pytest.approx(7 / 8)
    assert m["per_class_recall"] == {"a": 0.5, "b": 1.0, "c": 0.5, "d": 0.0, "e": 0.0, "f": None}
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 1 + 0.5 + 0 + 0) / 5)  # f has no items
    confusion = np.zeros((6, 6), dtype=int)
    for true, pred in [(0, 0), (0, 1), (1, 1), (2, 2), (2, 3), (3, 0), (4, 0), (4, 5)]:
        confusion[true, pred] += 1
    assert m["confusion_matrix"] == confusion.tolist()
    few = classification_metrics(logits[:, :4], torch.tensor([0, 1, 1, 2, 2, 3, 3, 0]), names[:4])
    assert "acc5" not in few  # fewer than 5 classes: top-5 is meaningless


def test_debias_removes_a_class_prior_without_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(200)  # balanced
    logits = 3.0 * torch.nn.functional.one_hot(labels, 5) + torch.randn(1000, 5, generator=gen)
    logits[:, 0] += 3.0  # a prior that pulls most predictions to class 0
    before = classification_metrics(logits, labels, list("abcde"))
    fixed = debias_logits(logits)
    after = classification_metrics(fixed, labels, list("abcde"))
    marginal = torch.softmax(fixed, dim=1).mean(dim=0)
    torch.testing.assert_close(marginal, torch.full((5,), 0.2), atol=1e-4, rtol=0)
    assert before["acc1"] < 0.6 and after["acc1"] > before["acc1"] + 0.2
    # per-class offsets only: each row keeps its own ranking shifted by the same vector
    torch.testing.assert_close(logits - fixed, (logits - fixed)[:1].expand_as(logits), atol=1e-4, rtol=0)


def brute_force_counts(media: torch.Tensor, text: torch.Tensor, owner: list[int]) -> tuple[list, list]:
    """(better, tied) per query by plain loops: negatives scored above / equal to the (best) positive."""
    sims = (media @ text.T).tolist()
    t2m = []
    for j in range(len(text)):
        positive = sims[owner[j]][j]
        others = [sims[i][j] for i in range(len(media)) if i != owner[j]]
        t2m.append((sum(s > positive for s in others), sum(s == positive for s in others)))
    m2t = []
    for i in range(len(media)):
        best = max(sims[i][j] for j in range(len(text)) if owner[j] == i)
        others = [sims[i][j] for j in range(len(text)) if owner[j] != i]
        m2t.append((sum(s > best for s in others), sum(s == best for s in others)))
    return t2m, m2t


def expected_recall(counts: list, k: int) -> float:
    """Recall@k under random tie-breaking, by enumerating every place the positive can take in its tie
    group."""
    return float(
        np.mean([np.mean([better + 1 + p <= k for p in range(tied + 1)]) for better, tied in counts])
    )


def test_retrieval_matches_brute_force_and_chunking_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(1)
    counts = [1, 3, 2, 1, 5, 2, 1, 1, 4, 2, 1, 3, 2]  # captions per item
    owner = [i for i, c in enumerate(counts) for _ in range(c)]
    media = torch.nn.functional.normalize(torch.randn(len(counts), 8, generator=gen), dim=-1)
    # captions near their item's features, so ranks spread over 1..N
    text = torch.nn.functional.normalize(
        media[owner] + 0.9 * torch.randn(len(owner), 8, generator=gen), dim=-1
    )
    t2m_expected, m2t_expected = brute_force_counts(media, text, owner)
    owner_t = torch.tensor(owner)
    better, tied = text_to_media_ranks(text, media, owner_t)
    assert list(zip(better.tolist(), tied.tolist(), strict=True)) == t2m_expected
    better, tied = media_to_text_ranks(media, text, owner_t)
    assert list(zip(better.tolist(), tied.tolist(), strict=True)) == m2t_expected
    t2m_ranks = [b + 1 + t / 2 for b, t in t2m_expected]
    assert min(t2m_ranks) == 1 and max(t2m_ranks) > 5 and max(b for b, _ in m2t_expected) > 4
    metrics = retrieval_metrics(media, text, owner_t)
    for k in (1, 5, 10):
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(expected_recall(t2m_expected, k))
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(expected_recall(m2t_expected, k))
    assert metrics["image_retrieval_mean_rank"] == pytest.approx(np.mean(t2m_ranks))
    assert metrics["text_retrieval_median_rank"] == pytest.approx(
        np.median([b + 1 + t / 2 for b, t in m2t_expected])
    )
    for chunk in (1, 2, 5, 100):
        assert retrieval_metrics(media, text, owner_t, chunk_size=chunk) == metrics
    audio = retrieval_metrics(media, text, owner_t, modality="audio")
    assert audio["audio_retrieval_recall@5"] == metrics["image_retrieval_recall@5"]

    # A collapsed model (all scores equal) scores chance, neither perfect nor zero.
    n = len(counts)
    flat = retrieval_metrics(torch.ones(n, 8), torch.ones(len(owner), 8), owner_t)
    assert flat["image_retrieval_recall@1"] == pytest.approx(1 / n)
    assert flat["image_retrieval_recall@5"] == pytest.approx(5 / n)
    assert flat["image_retrieval_mean_rank"] == pytest.approx((n + 1) / 2)
    # Captions repeated word for word (class templates): the tie order decides nothing.
    same = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=-1
    )
    twins = retrieval_metrics(same, same, torch.arange(4))
    assert (
        twins["image_retrieval_recall@1"] == pytest.approx(0.5) and twins["image_retrieval_recall@5"] == 1.0
    )
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(media, text[:3], owner_t[:3])


# ------------------------------------------------------------------------------------ data layouts
def write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the protocol of the published files


def test_cifar10_and_cifar100_pickles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
    names10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_pickle(
        tmp_path / "c10" / "cifar-10-batches-py" / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [3, 8, 8, 0, 6, 6],
            "data": data,
            "filenames": [f"img{i}.png" for i in range(6)],
        },
    )
    write_pickle(
        tmp_path / "c10" / "cifar-10-batches-py" / "batches.meta",
        {"num_cases_per_batch": 10000, "label_names": names10, "num_vis": 3072},
    )
    c10 = open_classification(tmp_path / "c10", "image")
    assert (c10.format, c10.name, c10.class_names) == ("cifar10", "cifar10", tuple(names10))
    items = items_of(c10, MediaDecoder("image", image_transform=pixels))
    assert [item["target"] for item in items] == [3, 8, 8, 0, 6, 6]
    first = items[0]["media"]  # rows are 1024 red, 1024 green, 1024 blue values, row-major 32x32
    assert first.shape == (32, 32, 3)
    assert first[0, 0].tolist() == [data[0, 0], data[0, 1024], data[0, 2048]]
    assert first[1, 2].tolist() == [data[0, 34], data[0, 1024 + 34], data[0, 2048 + 34]]

    fine = ["apple", "aquarium_fish", "baby"]
    write_pickle(
        tmp_path / "c100" / "cifar-100-python" / "test",
        {
            "filenames": ["x"] * 6,
            "batch_label": "testing batch 1 of 1",
            "fine_labels": [2, 1, 0, 0, 1, 2],
            "coarse_labels": [0] * 6,
            "data": data,
        },
    )
    write_pickle(
        tmp_path / "c100" / "cifar-100-python" / "meta",
        {"fine_label_names": fine, "coarse_label_names": ["fruit"]},
    )
    c100 = open_classification(tmp_path / "c100" / "cifar-100-python", "image")  # the folder itself works too
    assert c100.format == "cifar100" and c100.class_names == ("apple", "aquarium fish", "baby")
    assert [item["target"] for item in items_of(c100, MediaDecoder("image", image_transform=pixels))] == [
        2,
        1,
        0,
        0,
        1,
        2,
    ]

    # A pickle that would run code while loading is refused, not executed.
    write_pickle(tmp_path / "evil" / "cifar-10-batches-py" / "batches.meta", {"label_names": names10})
    (tmp_path / "evil" / "cifar-10-batches-py" / "test_batch").write_bytes(
        b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR."
    )
    with pytest.raises(UsageError, match="os.system is not allowed"):
        open_classification(tmp_path / "evil", "image")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(UsageError, match="cifar10 holds image data"):
        open_classification(tmp_path / "c10", "audio")


def write_esc50(esc: Path) -> Path:
    """Five 0.2 s clips at 8 kHz in ESC-50's layout, three categories over folds 1, 2 and 5."""
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for i, (fold, target, category) in enumerate(
        [(1, 1, "rooster"), (1, 0, "dog"), (2, 0, "dog"), (5, 2, "chirping_birds"), (5, 1, "rooster")]
    ):
        make_tone(esc / "audio" / f"{fold}-{i}-A-{target}.wav", 300 + 100 * i, seconds=0.2, rate=8000)
        rows.append(f"{fold}-{i}-A-{target}.wav,{fold},{target},{category},False,{i},A")
    (esc / "meta").mkdir()
    (esc / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return esc


def test_esc50_and_urbansound8k_with_folds(tmp_path: Path) -> None:
    esc = write_esc50(tmp_path / "ESC-50-master")
    decoder = MediaDecoder("audio", sample_rate=16000, clip_seconds=0.25)
    data = open_classification(esc, "audio", folds=[5])
    assert (data.format, data.name) == ("esc50", "esc50-fold5")
    assert data.class_names == ("dog", "rooster", "chirping birds")  # ordered by target, all folds
    items = items_of(data, decoder)
    assert [item["target"] for item in items] == [2, 1]
    assert all(item["media"].shape == (4000,) for item in items)  # resampled 8 -> 16 kHz, 0.25 s
    assert len(open_classification(esc / "meta" / "esc50.csv", "audio").listing) == 5
    with pytest.raises(UsageError, match="no audio files in fold"):
        open_classification(esc, "audio", folds=[3])

    us8k = tmp_path / "UrbanSound8K"
    rows = ["slice_file_name,fsID,start,end,salience,fold,classID,class"]
    for i, (fold, class_id, name) in enumerate(
        [(1, 3, "dog_bark"), (2, 0, "air_conditioner"), (2, 3, "dog_bark"), (10, 1, "car_horn")]
    ):
        make_tone(
            us8k / "audio" / f"fold{fold}" / f"{i}-{class_id}-0-0.wav", 500 + 50 * i, seconds=0.3, rate=8000
        )
        rows.append(f"{i}-{class_id}-0-0.wav,{i},0.0,0.3,1,{fold},{class_id},{name}")
    (us8k / "metadata").mkdir()
    (us8k / "metadata" / "UrbanSound8K.csv").write_text("\n".join(rows) + "\n")
    data = open_classification(us8k, "audio", folds=[2, 10])
    assert data.format == "urbansound8k" and data.class_names == ("air conditioner", "car horn", "dog bark")
    assert [item["target"] for item in items_of(data, decoder)] == [0, 2, 1]
    with pytest.raises(UsageError, match="--folds selects folds"):
        open_classification(us8k, "audio", format="class-folder", folds=[1])


def test_class_folders_sorted_like_imagefolder(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for i, label in enumerate(["dog", "cat", "red_panda", "cat", "dog", "dog"]):
        make_image(root / label / f"{i}.png", ["red", "blue", "green"][i % 3], size=(20, 16), seed=i)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    data = open_classification(root, "image")
    assert (data.format, data.name, data.class_names) == ("class-folder", "pets", ("cat", "dog", "red panda"))
    assert data.task == "zeroshot_classification"
    batches = list(data.loader(MediaDecoder("image", image_transform=pixels), batch_size=4, workers=0))
    targets = [t for b in batches for t in b["targets"]]
    assert targets == [0, 0, 1, 1, 1, 2] and sum(b["skipped"] for b in batches) == 1  # the broken jpg
    subset = items_of(data, MediaDecoder("image", image_transform=pixels), max_samples=3)
    assert [item["target"] for item in subset] == [0, 1, 2]  # an even subset keeps every class
    names = tmp_path / "names.txt"
    names.write_text("Felis catus\nCanis familiaris\nAilurus fulgens\n")
    assert open_classification(root, "image", classes_file=names).class_names[0] == "Felis catus"
    names.write_text("cat\ndog\n")
    with pytest.raises(UsageError, match="lists 2 classes, but"):
        open_classification(root, "image", classes_file=names)

    sounds = tmp_path / "sounds"
    make_tone(sounds / "low" / "a.wav", 200, seconds=0.1, rate=8000)
    make_tone(sounds / "high" / "b.flac", 2000, seconds=0.1, rate=8000)
    audio = open_classification(sounds, "audio")
    assert audio.class_names == ("high", "low")
    assert [
        i["media"].shape for i in items_of(audio, MediaDecoder("audio", sample_rate=8000, clip_seconds=0.5))
    ] == [(4000,)] * 2
    with pytest.raises(UsageError, match="no image files"):
        open_classification(sounds, "image")
    with pytest.raises(UsageError, match="does not exist"):
        open_classification(tmp_path / "nope", "image")


def png_bytes(colour: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (colour, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_shards_with_labels_and_with_several_captions(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    for i, label in enumerate(["b_class", "a_class", "b_class", "a_class", "b_class"]):
        make_image(
            folder / label / f"{i}.png", "red" if label == "a_class" else "blue", size=(16, 16), seed=i
        )
    run_sharding(
        build_config(
            {
                "input": {"modality": "image", "path": folder},
                "output": tmp_path / "sh",
                "shard_size": 2,
                "workers": 1,
            }
        ),
        progress=False,
    )
    data = open_classification(tmp_path / "sh", "image")
    assert (data.format, data.class_names, data.size()) == ("shards", ("a class", "b class"), 5)
    items = items_of(data, MediaDecoder("image", image_transform=pixels))
    assert sorted(item["target"] for item in items) == [0, 0, 1, 1, 1]
    assert all(
        item["target"] == (0 if item["media"][0, 0, 0] > item["media"][0, 0, 2] else 1) for item in items
    )
    assert (
        len(items_of(data, MediaDecoder("image", image_transform=pixels), max_samples=3)) == 3
    )  # 3 of 5, spread
    one_shard = open_classification(tmp_path / "sh" / "shard-000001.tar", "image")
    assert len(items_of(one_shard, MediaDecoder("image", image_transform=pixels))) == 2
    with pytest.raises(
        UsageError, match="shards hold image-text pairs, but the model is an audio-text model"
    ):
        open_classification(tmp_path / "sh", "audio")

    # Hand-written shards (webdataset's TarWriter), no manifest: class names must come from --classes.
    plain = tmp_path / "plain"
    plain.mkdir()
    with wds.TarWriter(str(plain / "part-0.tar")) as sink:
        sink.write({"__key__": "x0", "png": png_bytes(10), "cls": b"1"})
        sink.write({"__key__": "x1", "png": png_bytes(20), "json": json.dumps({"label_index": 0}).encode()})
        sink.write({"__key__": "x2", "png": png_bytes(30)})  # no label: skipped
    with pytest.raises(UsageError, match="pass --classes"):
        open_classification(plain, "image")
    names = tmp_path / "names.txt"
    names.write_text("zero\none\n")
    labelled = open_classification(f"{plain}/part-{{0..0}}.tar", "image", classes_file=names)
    batches = list(labelled.loader(MediaDecoder("image", image_transform=pixels), batch_size=8, workers=0))
    assert batches[0]["targets"] == [1, 0] and batches[0]["skipped"] == 1

    captions = [["a red square"], ["a dark square", "a very dark square", "almost black"], [], ["two"] * 2]
    with wds.TarWriter(str(plain / "part-1.tar")) as sink:
        for i, texts in enumerate(captions):
            sink.write(
                {"__key__": f"c{i}", "png": png_bytes(40 * i), "json": json.dumps({"text": texts}).encode()}
            )
        sink.write({"__key__": "c9", "png": b"broken", "txt": b"a caption"})
    retrieval = open_retrieval(plain / "part-1.tar", "image")
    assert retrieval.task == "zeroshot_retrieval"
    batches = list(retrieval.loader(MediaDecoder("image", image_transform=pixels), batch_size=8, workers=0))
    assert batches[0]["targets"] == [captions[0], captions[1], captions[3]] and batches[0]["skipped"] == 2


# ------------------------------------------------------------------------------------ models
def test_load_eval_model_from_open_clip_weights_and_errors(tmp_path: Path, micro_model) -> None:
    weights = save_open_clip_weights(micro_model, tmp_path / "micro.safetensors")
    loaded = load_eval_model(open_clip_name="mmcl-micro-vit", pretrained=str(weights))
    assert not loaded.training
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), micro_model.state_dict().values(), strict=True)
    )
    assert model_source(open_clip_name="mmcl-micro-vit", pretrained=str(weights)).pretrained == str(weights)
    with pytest.raises(UsageError, match="weights file not found"):
        load_eval_model(open_clip_name="mmcl-micro-vit", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(UsageError, match="does not exist"):
        load_eval_model(checkpoint=tmp_path / "no_run")
    with pytest.raises(UsageError, match="no complete checkpoint"):
        load_eval_model(checkpoint=tmp_path)
    with pytest.raises(UsageError, match="exactly one model"):
        load_eval_model()
    with pytest.raises(UsageError, match="exactly one model"):
        load_eval_model(checkpoint=tmp_path, open_clip_name="mmcl-micro-vit")


def test_evaluators_on_a_random_model_count_what_they_read(tmp_path: Path, micro_model) -> None:
    root = tmp_path / "colours"
    for i, colour in enumerate(["red", "green", "blue"] * 3):
        make_image(root / colour / f"{i}.png", colour, size=(24, 24), seed=i)
    data = open_classification(root, "image")
    results = evaluate_zero_shot(
        micro_model, data, ["a {} square."], batch_size=4, debias=True, max_samples=6
    )
    assert results["num_samples"] == 6 and results["skipped"] == 0
    assert {
        "acc1",
        "mean_per_class_recall",
        "acc1_without_debias",
    } <= results.keys() and "acc5" not in results
    features = extract_features(micro_model, data.loader(MediaDecoder.for_model(micro_model), 4, 0))
    assert features.media.shape == (9, micro_model.embed_dim) and features.targets == [
        0,
        0,
        0,
        1,
        1,
        1,
        2,
        2,
        2,
    ]


def test_audio_model_zero_shot_on_esc50(tmp_path: Path) -> None:
    torch.manual_seed(0)
    audio = {"tower": "cnn", "sample_rate": 16000, "clip_seconds": 0.5, "n_mels": 32, "cnn_channels": [8, 16]}
    model = build_model(ModelConfig(modality="audio", audio=audio)).eval()
    decoder = MediaDecoder.for_model(model)
    assert (decoder.modality, decoder.sample_rate, decoder.clip_seconds) == ("audio", 16000, 0.5)
    data = open_classification(write_esc50(tmp_path / "esc"), "audio")
    results = evaluate_zero_shot(model, data, load_templates("auto", "audio"), batch_size=2, debias=True)
    assert results["num_samples"] == 5 and len(results["per_class_recall"]) == 3
    with pytest.raises(UsageError, match="esc50 holds audio data, but the model is an image-text model"):
        open_classification(tmp_path / "esc", "image")


# ------------------------------------------------------------------------------------ end to end on digits
@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """scikit-learn's 1,797 handwritten digits as class folders (3 in 4 for training, every 4th held out),
    training shards captioned "a photo of the digit NAME.", held-out shards with two captions each, and a
    micro image-text model (an inline open_clip config) trained on them by the project's trainer."""
    from sklearn.datasets import load_digits

    from mmcl.config import load_train_config
    from mmcl.train.trainer import run_training

    root = tmp_path_factory.mktemp("digits")
    bunch = load_digits()
    for i, (image, target) in enumerate(zip(bunch.images, bunch.target, strict=True)):
        split = "test" if i % 4 == 0 else "train"
        path = root / split / DIGIT_NAMES[target] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).convert("RGB").resize(
            (32, 32), Image.BILINEAR
        ).save(path)
    run_sharding(
        build_config(
            {
                "input": {
                    "modality": "image",
                    "path": root / "train",
                    "templates": ["a photo of the digit {label}."],
                },
                "output": root / "train_shards",
                "shard_size": 200,
                "workers": 1,
                "shuffle": True,
            }
        ),
        progress=False,
    )
    run_sharding(
        build_config(
            {
                "input": {
                    "modality": "image",
                    "path": root / "test",
                    "templates": ["a photo of the digit {label}.", "the handwritten number {label}"],
                },
                "output": root / "test_shards",
                "shard_size": 100,
                "workers": 1,
            }
        ),
        progress=False,
    )
    config = {
        "run": {"output_dir": str(root / "run"), "seed": 0},
        "model": {"modality": "image", "open_clip_config": TINY_CLIP},
        "data": {
            "sources": [{"urls": str(root / "train_shards")}],
            "batch_size": 64,
            "workers": 0,
            "shuffle_buffer": 500,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 10},
        "train": {"steps": 100, "log_every": 50, "checkpoint_every": 100},
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    run_training(load_train_config(root / "train.yaml"))
    (root / "templates.txt").write_text("a photo of the digit {}.\n")
    return {"root": root, "checkpoint": root / "run" / "checkpoints" / "step-00000100"}


def test_trained_model_classifies_held_out_digits_zero_shot(digits: dict[str, Path]) -> None:
    root, output = digits["root"], digits["root"] / "report"
    result = run_mmcl(
        "eval",
        "zero-shot",
        "--checkpoint",
        digits["checkpoint"],
        "--data",
        root / "test",
        "--templates",
        root / "templates.txt",
        "--output",
        output,
        "--workers",
        "1",
        "--quiet",
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    report = json.loads((output / "results.json").read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= report.keys()
    assert report["task"] == "zeroshot_classification" and report["model"].startswith("mmcl-inline-")
    assert set(report["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert report["num_samples"] == 450 and report["class_names"] == sorted(DIGIT_NAMES)
    print(f"held-out digits, zero-shot: {report['metrics']}")
    assert report["metrics"]["acc1"] >= 0.5  # chance is 0.1
    assert sum(map(sum, report["confusion_matrix"])) == 450
    for name in ("confusion_matrix.png", "per_class_recall.png"):
        assert (output / name).read_bytes().startswith(b"\x89PNG") and (output / name).stat().st_size > 5000
    assert "![confusion matrix](confusion_matrix.png)" in (output / "report.md").read_text()
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("acc1 ") and lines[-1].startswith(f"report: {output / 'report.md'}")


def test_retrieval_cli_and_errors_on_held_out_shards(digits: dict[str, Path], capsys) -> None:
    output = digits["root"] / "retrieval"
    code = mmcl_main(
        [
            "eval",
            "retrieval",
            "--checkpoint",
            str(digits["root"] / "run"),  # run folder: newest step
            "--data",
            str(digits["root"] / "test_shards"),
            "--output",
            str(output),
            "--workers",
            "0",
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads((output / "results.json").read_text())
    assert (
        report["task"] == "zeroshot_retrieval"
        and report["num_items"] == 450
        and report["num_captions"] == 900
    )
    keys = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert keys <= report["metrics"].keys()
    # Every caption is shared by ~45 held-out digits of its class, so recall is low by construction
    # (ties are broken at random): check the contract, not the values.
    assert all(0 <= v <= 1 for k, v in report["metrics"].items() if "recall@" in k)
    assert 1 <= report["metrics"]["image_retrieval_median_rank"] <= 450
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("report: ")

    missing = digits["root"] / "missing"
    argv = [
        "eval",
        "zero-shot",
        "--checkpoint",
        str(missing),
        "--data",
        str(digits["root"] / "test"),
        "--output",
        str(output),
    ]
    assert mmcl_main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"mmcl eval zero-shot: error: --checkpoint {missing} does not exist; give "
        "RUN/checkpoints/step-NNNNNNNN or a run folder"
    ]
    for argv, message in [
        (["--open-clip", "mmcl-micro-vit", "--checkpoint", str(digits["checkpoint"])], "exactly one model"),
        (["--checkpoint", str(digits["checkpoint"]), "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--checkpoint", str(digits["checkpoint"]), "--folds", "1"], "--folds selects folds"),
    ]:
        assert (
            mmcl_main(
                ["eval", "zero-shot", *argv, "--data", str(digits["root"] / "test"), "--output", str(output)]
            )
            == 2
        )
        assert message in capsys.readouterr().err


def test_periodic_evaluation_during_training(digits: dict[str, Path]) -> None:
    root = digits["root"]
    cfg = EvalConfig.model_validate(
        {
            "every_steps": 100,
            "zero_shot": [
                {"name": "digits", "data": str(root / "test"), "templates": str(root / "templates.txt")}
            ],
            "retrieval": [{"name": "digits-captions", "data": str(root / "test_shards")}],
            "max_samples": 200,
        }
    )
    check_eval_data(cfg, "image")
    model = load_eval_model(checkpoint=digits["checkpoint"]).train()
    metrics = evaluate_during_training(model, cfg)
    assert model.training  # put back as found
    assert metrics["digits/acc1"] >= 0.5
    assert {
        "digits/acc1",
        "digits/acc5",
        "digits/mean_per_class_recall",
        "digits-captions/image_retrieval_recall@1",
        "digits-captions/text_retrieval_recall@10",
    } <= metrics.keys()
    assert all(isinstance(v, float) for v in metrics.values())
    with pytest.raises(ValidationError, match="unique"):
        EvalConfig.model_validate(
            {"zero_shot": [{"name": "a", "data": "x"}], "retrieval": [{"name": "a", "data": "y"}]}
        )
    with pytest.raises(ValidationError, match="Extra inputs"):
        EvalConfig.model_validate({"every_step": 10})
    with pytest.raises(UsageError, match="does not exist"):
        check_eval_data(
            EvalConfig.model_validate({"retrieval": [{"name": "r", "data": str(root / "nope")}]}), "image"
        )
