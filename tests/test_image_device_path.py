"""Images handed over as uint8: loader workers decode, crop (and resize, on the CPU path), the training
device converts and normalises (data.image_on_device: where the resize runs).

Real JPEG and PNG bytes written here with Pillow, the real open_clip train transform as the reference (the
CPU path), real shards and a real one-step training run of the micro model; no mocks.

Tolerances, in the model's input units (after normalisation; one 8-bit level is 1/255/std ~ 0.015). The
device path evaluates Pillow's bicubic filter in float32 where Pillow rounds to 8 bits after each of its two
passes: with the crop decoded at full scale the mean absolute difference per image stays under 0.01, 99.9 %
of the values within 0.03 and all within 0.08 (seen: 0.0042, 0.014, 0.055). When the worker decodes a JPEG
at a reduced DCT scale (draft) or shrinks a crop twice the output size by an integer factor, the picture
was box-filtered before the bicubic resize, which blurs edges a little more: mean under 0.015, 99 % within
0.15, single pixels on the hardest edges up to 0.75 (seen: 0.0094, 0.111, 0.53). A crop box off by one
pixel would move the mean far past these bounds.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from open_clip.transform import MaybeConvertMode, MaybeToTensor, image_transform
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, IterableDataset
from torchvision.transforms import ColorJitter, Compose, InterpolationMode, Normalize, RandomResizedCrop

from mmcl.config import load_train_config
from mmcl.data import DataConfig, DataProgress, build_loader, build_train_stream
from mmcl.data.batch_buffers import BatchBuffers
from mmcl.data.common import call_seeded
from mmcl.data.device_transform import (
    DeviceImageSpec,
    UnsupportedTransform,
    batch_to_model_input,
    choose_image_path,
    crops_to_model_input,
    device_image_spec,
    pad_crops,
)
from mmcl.data.image import decode_image, image_crop, sample_crop_box
from mmcl.data.pipeline import init_loader_worker
from mmcl.errors import UsageError
from shards_tools.writer import sample_bytes, tar_end

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")  # the bundled SimpleTokenizer: works offline


def photo(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    """A photo-like picture: smooth colour gradients, an oriented texture, hard-edged shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(60, 190, 3).astype(np.float32)
    angle, freq = rng.uniform(0, math.pi), rng.uniform(0.02, 0.15)
    img = (
        base + 50 * np.sin(xx / width * 3 + rng.uniform(0, 6))[..., None] * np.cos(yy / height * 2)[..., None]
    )
    img += (20 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy)))[..., None]
    pil = Image.fromarray(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(4):
        x0, y0 = rng.uniform(0, 0.8, 2) * (width, height)
        w, h = rng.uniform(0.1, 0.4, 2) * (width, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    out = io.BytesIO()
    pil.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def cpu_path(transform, data: bytes, seed: int) -> torch.Tensor:
    """What a worker computes without the device path: open_clip's transform on the full decode, seeded."""
    return call_seeded(transform, decode_image(data, "k"), seed)


def device_path(spec: DeviceImageSpec, images: list[bytes], seeds: list[int]) -> torch.Tensor:
    """Worker half per sample, padded into one batch, then the batched device half (here on the CPU)."""
    crops = [
        image_crop({"__key__": "k", "jpg": data}, spec, seed)
        for data, seed in zip(images, seeds, strict=True)
    ]
    batch, _ = pad_crops([c for c, _ in crops], [box for _, box in crops], BatchBuffers(0))
    return crops_to_model_input(batch["media"], batch["media_boxes"], batch["media_sizes"], spec)


# (mean, 99th or 99.9th percentile, max) of |device - CPU| per image, see the module docstring
FULL_SCALE = {"mean": 0.01, "quantile": (0.999, 0.03), "max": 0.08}  # seen: 0.0042, 0.014, 0.055
REDUCED = {"mean": 0.015, "quantile": (0.99, 0.15), "max": 0.75}  # seen: 0.0094, 0.111, 0.53


@pytest.mark.parametrize(
    ("size", "shape", "fmt", "bounds"),
    [
        (224, (342, 256), "JPEG", FULL_SCALE),  # 256 px short side at 224: decoded and cropped at full scale
        (64, (300, 40), "JPEG", FULL_SCALE),  # a strip: RandomResizedCrop's fallback box, enlarged
        (224, (1600, 1200), "JPEG", REDUCED),  # JPEG draft at 1/4 or 1/2
        (224, (600, 450), "JPEG", REDUCED),  # draft at 1/2 leaves crops barely above 224
        (64, (342, 256), "JPEG", REDUCED),  # draft at 1/4
        (224, (1000, 700), "PNG", REDUCED),  # no draft for PNG: the crop is reduced by 3 in the worker
    ],
)
def test_device_path_matches_open_clip_train_transform(size, shape, fmt, bounds) -> None:
    transform = image_transform(size, is_train=True)
    spec = device_image_spec(transform)
    # one batch of landscape and portrait images: padding to the largest crop must not leak into the others
    shapes = [shape if i % 2 else shape[::-1] for i in range(8)]
    images = [photo(w, h, seed=i, fmt=fmt) for i, (w, h) in enumerate(shapes)]
    seeds = [1000 + i for i in range(len(images))]
    device = device_path(spec, images, seeds)
    assert device.shape == (len(images), 3, size, size) and device.dtype == torch.float32
    q, q_bound = bounds["quantile"]
    for k, (data, seed) in enumerate(zip(images, seeds, strict=True)):
        diff = (device[k] - cpu_path(transform, data, seed)).abs().flatten()
        assert diff.mean() < bounds["mean"], (k, diff.mean())
        assert diff.quantile(q) < q_bound, (k, diff.quantile(q))
        assert diff.max() < bounds["max"], (k, diff.max())


def test_a_crop_twice_the_output_is_reduced_in_the_worker() -> None:
    """A PNG (no DCT scaling) is shrunk by an integer factor: hand-over near the output size, never below."""
    spec = device_image_spec(image_transform(64, is_train=True))
    crop, box = image_crop({"__key__": "k", "png": photo(500, 380, seed=3, fmt="PNG")}, spec, seed=5)
    top, left, height, width = sample_crop_box(500, 380, spec, seed=5)
    assert min(height, width) > 5 * 64 and max(crop.shape[:2]) < 2 * 64 * 4 / 3
    assert box[2] - box[0] >= 64 and box[3] - box[1] >= 64


def test_uint8_hand_over_is_exact_for_an_identity_resize() -> None:
    """A crop of exactly the output size: the device path equals ToTensor + Normalize bit for bit."""
    height, width = 48, 64
    transform = Compose(
        [
            RandomResizedCrop((height, width), scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3),
                              interpolation=InterpolationMode.BICUBIC),
            MaybeConvertMode(),
            MaybeToTensor(),
            Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
        ]
    )  # fmt: skip
    spec = device_image_spec(transform)
    images = [photo(width, height, seed=s) for s in range(3)] + [photo(30, 20, seed=9)]
    device = device_path(spec, images, [0, 1, 2, 3])  # padded beside a smaller crop
    for k in range(3):
        assert torch.equal(device[k], cpu_path(transform, images[k], k))


def test_resize_weights_are_interpolates_antialiased_bicubic() -> None:
    """On whole images the batched resize is F.interpolate(bicubic, antialias=True), shrinking and growing."""
    pixels = torch.randint(0, 256, (2, 70, 90, 3), dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 90.0, 70.0]] * 2)
    sizes = torch.tensor([[70, 90]] * 2, dtype=torch.int32)
    for out in [(32, 45), (64, 64), (120, 100)]:
        spec = DeviceImageSpec(out, (1.0, 1.0), (1.0, 1.0), (0.0, 0.0, 0.0), (1 / 255,) * 3)  # no scaling
        ours = crops_to_model_input(pixels, boxes, sizes, spec)
        theirs = F.interpolate(pixels.permute(0, 3, 1, 2).float(), size=out, mode="bicubic", antialias=True)
        assert (ours - theirs.clamp(0, 255)).abs().max() < 1e-3


@pytest.mark.parametrize(
    ("scale", "ratio"),
    [((0.9, 1.0), (3 / 4, 4 / 3)), ((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.0), (0.5, 2.0))],
)
def test_crop_box_is_torchvisions_draw_under_the_sample_seed(scale, ratio) -> None:
    """sample_crop_box is RandomResizedCrop.get_params on the full image's geometry under the same seed,
    bit for bit, fallback included (strips, tiny images): the same boxes, so the same scale and aspect
    distribution. open_clip's scale (0.9-1) and torchvision's default (0.08-1)."""
    spec = replace(device_image_spec(image_transform(224, is_train=True)), scale=scale, ratio=ratio)
    sizes = [(342, 256), (256, 342), (4000, 3000), (300, 40), (40, 300), (7, 5), (224, 224), (256, 256)]
    for n in range(4000):
        width, height = sizes[n % len(sizes)]
        torch.manual_seed(n)
        want = RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio))
        assert sample_crop_box(width, height, spec, n) == want


def test_worker_crop_is_the_region_the_cpu_path_crops() -> None:
    """At full decode scale the worker hands over exactly the pixels of the drawn box, with the whole of
    them as the box to resize (the comparisons with the CPU path above check the box against its own)."""
    spec = device_image_spec(image_transform(224, is_train=True))
    for seed in range(40):
        data = photo(342 - seed, 256 + seed, seed=seed)
        crop, box = image_crop({"__key__": "k", "jpg": data}, spec, seed)
        top, left, height, width = sample_crop_box(342 - seed, 256 + seed, spec, seed)
        full = np.asarray(decode_image(data, "k"))
        assert np.array_equal(crop, full[top : top + height, left : left + width])
        assert box == (0.0, 0.0, float(width), float(height))


def test_choosing_the_path() -> None:
    plain = image_transform(64, is_train=True)
    jitter = Compose([*plain.transforms[:2], ColorJitter(0.4), *plain.transforms[2:]])
    # a plain transform always hands over uint8; the setting and the device say where the resize runs
    assert not choose_image_path("auto", "cpu", plain).resize_on_device
    assert not choose_image_path(False, "cuda", plain).resize_on_device
    assert choose_image_path("auto", "cuda", plain) == choose_image_path(True, "cpu", plain)
    assert choose_image_path(True, "cpu", plain).resize_on_device
    assert choose_image_path(True, "cpu", plain).size == (64, 64)
    assert choose_image_path("auto", "cuda", jitter) is None  # the whole transform in the workers
    assert choose_image_path(False, "cpu", jitter) is None
    with pytest.raises(UsageError, match="image_on_device: true.*ColorJitter"):
        choose_image_path(True, "cuda", jitter)
    with pytest.raises(UnsupportedTransform):
        device_image_spec(image_transform(64, is_train=False))  # eval keeps the CPU path


def write_shards(folder: Path, count: int, per_shard: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, count, per_shard):
        body = b"".join(
            sample_bytes(
                {
                    "__key__": f"{i:05d}",
                    "jpg": photo(90 + 7 * (i % 5), 70 + 5 * (i % 3), seed=i),
                    "txt": f"picture number {i}".encode(),
                }
            )  # fmt: skip
            for i in range(start, min(start + per_shard, count))
        )
        (folder / f"shard-{start // per_shard:06d}.tar").write_bytes(body + tar_end(len(body)))


def test_uint8_hand_over_equals_the_whole_transform_in_the_workers(tmp_path: Path) -> None:
    """The CPU path's uint8 hand-over (crop and resize in the worker, ToTensor + Normalize on the device)
    gives the model the same tensors, bit for bit, as open_clip's whole transform run in the worker, over
    real shards: the same crops under the same seeds, the same Pillow resize, the same float32 operations."""
    write_shards(tmp_path / "shards", count=24, per_shard=6)
    cfg = DataConfig(sources=[{"urls": str(tmp_path / "shards")}], batch_size=4, workers=0, shuffle_buffer=8)
    transform = image_transform(64, is_train=True)
    spec = choose_image_path(False, "cpu", transform)

    def batches(device_images):
        stream = iter(
            build_train_stream(cfg, modality="image", media_transform=transform, tokenizer=TOKENIZER,
                               device_images=device_images)
        )  # fmt: skip
        return [next(stream) for _ in range(6)]

    for handed, whole in zip(batches(spec), batches(None), strict=True):
        assert handed["media"].dtype == torch.uint8 and handed["media"].shape == (4, 64, 64, 3)
        assert whole["media"].dtype == torch.float32
        assert handed["keys"] == whole["keys"] and torch.equal(handed["text"], whole["text"])
        model_input = batch_to_model_input(handed, torch.device("cpu"), spec)["media"]
        assert model_input.is_contiguous() and torch.equal(model_input, whole["media"])
    with pytest.raises(ValueError, match="needs the DeviceImageSpec"):
        batch_to_model_input(handed, torch.device("cpu"), None)


class _SharedProbe(IterableDataset):
    """Runs a stream in a loader worker and says, per batch, whether its tensors were built in shared memory
    (before the DataLoader sends them, which puts every tensor there)."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream

    def __iter__(self):
        for batch in self.stream:
            yield batch, [n for n, v in batch.items() if isinstance(v, torch.Tensor) and not v.is_shared()]


HAND_OVERS = ["device path", "CPU path", "whole transform"]


def hand_over_stream(shards: Path, hand_over: str, workers: int, *, loader: bool = False):
    """A stream of 64 px images over `shards` with one of HAND_OVERS (batches of 4), built for `workers`
    loader workers; with `loader`, build_loader's DataLoader over it."""
    transform = image_transform(64, is_train=True)
    spec = {
        "device path": choose_image_path(True, "cpu", transform),
        "CPU path": choose_image_path(False, "cpu", transform),
        "whole transform": None,
    }[hand_over]
    cfg = DataConfig(sources=[{"urls": str(shards)}], batch_size=4, workers=workers, shuffle_buffer=8)
    build = build_loader if loader else build_train_stream
    return build(cfg, modality="image", media_transform=transform, tokenizer=TOKENIZER, device_images=spec)


def assert_same_batch(batch: dict, want: dict) -> None:
    """`batch` has `want`'s keys and media, and a device-path batch's padding reads as zeros."""
    assert batch["keys"] == want["keys"] and torch.equal(batch["media"], want["media"])
    if "media_sizes" in batch:
        for crop, (height, width) in zip(batch["media"], batch["media_sizes"].tolist(), strict=True):
            assert not crop[height:].any() and not crop[:, width:].any()


@pytest.mark.parametrize("hand_over", HAND_OVERS)
def test_a_worker_builds_its_batch_where_sending_copies_nothing(tmp_path: Path, hand_over: str) -> None:
    """A loader worker stacks a batch's media straight into shared memory, as torch's default_collate does,
    instead of a private array that the DataLoader would copy there to send it (~22 MB a device-path batch
    of 64 at 224 px). The batches are those an in-process stream gives, and the device path's padding reads
    as zeros."""
    shards = tmp_path / "shards"
    write_shards(shards, count=24, per_shard=6)
    in_process = iter(hand_over_stream(shards, hand_over, 0))
    loader = DataLoader(
        _SharedProbe(hand_over_stream(shards, hand_over, 1)),
        batch_size=None,
        num_workers=1,
        worker_init_fn=init_loader_worker,
    )
    for batch, private in itertools.islice(loader, 5):
        assert "media" not in private
        assert_same_batch(batch, next(in_process))


def _segment(tensor: torch.Tensor) -> int:
    """The shared-memory segment a received tensor lies in (its inode)."""
    fd, _ = tensor.untyped_storage()._share_fd_cpu_()
    return os.fstat(fd).st_ino


@pytest.mark.parametrize("hand_over", HAND_OVERS)
def test_a_worker_reuses_the_memory_of_batches_given_back(tmp_path: Path, hand_over: str) -> None:
    """A loader worker fills a batch's shared memory again once the consumer gives the batch back (as the
    trainer does after each step), and never while the consumer holds it: batches held through later
    ones still equal an in-process stream's, and so does every batch whose memory was reused (the device
    path's padding zeroed again). A consumer that gives nothing back gets a fresh segment per batch."""
    shards = tmp_path / "shards"
    write_shards(shards, count=24, per_shard=6)
    in_process = iter(hand_over_stream(shards, hand_over, 0))
    wanted = [next(in_process) for _ in range(14)]

    loader = hand_over_stream(shards, hand_over, 1, loader=True)
    held, segments = [], []
    for i, batch in enumerate(itertools.islice(loader, 14)):
        assert_same_batch(batch, wanted[i])
        segments.append(_segment(batch["media"]))
        if i < 3:
            held.append(batch)
        else:
            loader.dataset.give_back([batch])
    for i, batch in enumerate(held):
        assert_same_batch(batch, wanted[i])
    # the held three, the one in hand and the two the DataLoader has asked for (a segment has room for a
    # batch a quarter larger than the largest before it: these padded batches never outgrow one)
    assert len(set(segments)) <= 3 + 3
    kept = loader.dataset
    loader.dataset.give_back(held)

    never_given_back = hand_over_stream(shards, hand_over, 1, loader=True)
    assert never_given_back.dataset is not kept
    fresh = [_segment(batch["media"]) for batch in itertools.islice(never_given_back, 10)]
    assert len(set(fresh)) == 10


def test_device_path_stream_resumes_exactly(tmp_path: Path) -> None:
    """Crops are seeded per sample like the CPU path's augmentation: a resumed stream yields the same
    hand-over tensors, and the device half turns them into the model's input."""
    write_shards(tmp_path / "shards", count=24, per_shard=6)
    cfg = DataConfig(sources=[{"urls": str(tmp_path / "shards")}], batch_size=4, workers=0, shuffle_buffer=8)
    transform = image_transform(64, is_train=True)
    spec = device_image_spec(transform)

    def stream(resume=None):
        return iter(
            build_train_stream(cfg, modality="image", media_transform=transform, tokenizer=TOKENIZER,
                               resume=resume, device_images=spec)
        )  # fmt: skip

    fresh = stream()
    batches = [next(fresh) for _ in range(5)]
    first = batches[0]
    assert (
        first["media"].dtype == torch.uint8 and first["media"].shape[0] == 4 and first["media"].shape[3] == 3
    )
    assert first["media_boxes"].shape == (4, 4) and first["media_sizes"].shape == (4, 2)
    state = build_train_stream(
        cfg, modality="image", media_transform=transform, tokenizer=TOKENIZER
    ).new_state()
    for batch in batches[:3]:
        state.update(batch)
    progress = DataProgress(world_size=1, num_workers=1, resampled=False)
    progress.record(3, [state.state_dict()], [state.take_consumed()])
    resumed = stream(json.loads(json.dumps(progress.state_dict())))
    for want in batches[3:]:
        got = next(resumed)
        assert got["keys"] == want["keys"]
        for name in ("media", "media_boxes", "media_sizes", "text"):
            assert torch.equal(got[name], want[name]), name
    model_batch = batch_to_model_input(first, torch.device("cpu"), spec)
    assert model_batch["media"].shape == (4, 3, 64, 64) and "media_boxes" not in model_batch
    assert batch_to_model_input(model_batch, torch.device("cpu"), spec)["media"] is model_batch["media"]


def test_one_training_step_on_the_device_path(tmp_path: Path) -> None:
    from mmcl.train.trainer import Trainer

    write_shards(tmp_path / "shards", count=16, per_shard=8)
    config = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"modality": "image", "open_clip_name": "mmcl-micro-vit"},  # 64 px
        "data": {"sources": [{"urls": str(tmp_path / "shards")}], "batch_size": 8, "workers": 1,
                 "shuffle_buffer": 8, "image_on_device": True},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"steps": 1, "log_every": 1, "checkpoint_every": 1},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    trainer = Trainer(load_train_config(tmp_path / "c.yaml"))
    trainer.setup()
    try:
        assert trainer.device_images is not None and trainer.device_images.size == (64, 64)
        state = trainer.train()
    finally:
        trainer.cleanup()
    assert state.step == 1
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and math.isfinite(row["loss"]) and row["negatives"] == 7
    assert (tmp_path / "run" / "checkpoints" / "step-00000001" / "model.safetensors").exists()
