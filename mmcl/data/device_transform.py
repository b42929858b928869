"""Image preprocessing on the training device, batched: what follows the uint8 hand-over of the image loader.

Two hand-overs, both uint8 (a quarter of float32's bytes), chosen by `choose_image_path`: the workers resize
(Pillow, exactly as open_clip's transform) and only the uint8 -> float conversion and the normalisation run
here (`images_to_model_input`: the transform's own tensors, bit for bit); or the device path below, where the
resize runs here too.

Why. At 224 px a loader worker running open_clip's train transform spends most of its time after the decode:
Pillow's bicubic resize of the crop (about half of the time for a 256-px JPEG), then ToTensor and Normalize
in float32. With `data.image_on_device` a worker only decodes the image (with JPEG draft when the crop
allows), cuts out the crop and hands over uint8 pixels (mmcl.data.image.image_crop); the resize, the uint8
-> float conversion and the normalisation run here, on the whole batch at once, on the device that trains.

Hand-over. Crops differ in size (random area and aspect ratio, images of any size), so a batch carries them
zero-padded to the largest ("media" uint8 [B, H, W, 3]), with each crop's valid size ("media_sizes" int32
[B, 2]: height, width) and its crop box inside that ("media_boxes" float32 [B, 4]: left, top, right, bottom;
fractional where a JPEG was decoded at a reduced DCT scale). Resizing to a fixed intermediate size in the
worker would keep the very cost this path removes; padding costs one copy.

Resize. A separable linear map per axis, out = Wy @ X @ Wx^T, with per-sample weight matrices built from the
bicubic (a = -0.5) antialiasing filter exactly as Pillow and torch.nn.functional.interpolate(
mode="bicubic", antialias=True) build theirs (same support, centre, clamping at the crop's edges and
normalisation; tests/test_image_device_path.py checks it against interpolate), so every sample has its own
box and scale and the batch is resized in two batched matmuls. interpolate itself takes one input size and
one box (the whole tensor), so it could only resize a padded batch of different crops one sample at a time.
Cost: about 2 * 3 * S * H * (W + S) flops a sample for an S x S output from an H x W crop, ~0.2 GFLOP at 224
px from a 280 px crop: nothing for a GPU, milliseconds per image on one CPU core, which is why CPU training
keeps the worker-side transform (data.image_on_device: auto).

Agreement with the CPU path: the crop box is the one open_clip's transform draws for the same sample and
seed; the filter is Pillow's, evaluated in float32 without Pillow's rounding to 8 bits after each of its two
passes. A crop decoded at a reduced JPEG scale, or reduced by an integer factor because it was still twice
the output size, has been box-filtered first, which blurs very slightly more than Pillow's single bicubic
pass. The test file states the tolerances.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mmcl.data.batch_buffers import BatchBuffers
from mmcl.data.common import logger
from mmcl.errors import UsageError

BICUBIC_A = -0.5  # Pillow's bicubic, which interpolate(antialias=True) reproduces (its plain bicubic: -0.75)
BICUBIC_SUPPORT = 2.0
# batch keys of the hand-over (besides "media"); a batch without them holds the model's input already
BOXES, SIZES = "media_boxes", "media_sizes"


@dataclass(frozen=True)
class DeviceImageSpec:
    """What the device path takes from the model's train transform: size, crop sampling, normalisation."""

    size: tuple[int, int]  # (height, width) of the model's input
    scale: tuple[float, float]  # RandomResizedCrop's range of the crop's area, as a fraction of the image
    ratio: tuple[float, float]  # and of its aspect ratio (width / height)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # False: the workers resize as well and hand over the model-size image as uint8; only the uint8 -> float
    # conversion and the normalisation run on the device (`images_to_model_input`)
    resize_on_device: bool = True


class UnsupportedTransform(ValueError):
    """The model's train transform does something the device path does not reproduce."""


def device_image_spec(transform: Callable[[Any], Tensor]) -> DeviceImageSpec:
    """The device path's parameters, read from open_clip's train transform (a torchvision Compose of
    RandomResizedCrop(bicubic), MaybeConvertMode("RGB"), ToTensor, Normalize), so the two paths never disagree
    on size, crop range or normalisation. Raises UnsupportedTransform for any other transform (colour jitter,
    grayscale, timm's augmentations, bilinear resizing): those stay on the CPU path."""
    from open_clip.transform import MaybeConvertMode
    from torchvision.transforms import Compose, InterpolationMode, Normalize, RandomResizedCrop, ToTensor

    steps = transform.transforms if isinstance(transform, Compose) else [transform]
    kinds = (RandomResizedCrop, ToTensor, Normalize)  # in this order; MaybeToTensor is a ToTensor
    kept = [t for t in steps if not (isinstance(t, MaybeConvertMode) and t.mode == "RGB")]
    if len(kept) != len(kinds) or not all(isinstance(t, kind) for t, kind in zip(kept, kinds, strict=True)):
        names = " + ".join(type(t).__name__ for t in steps)
        raise UnsupportedTransform(
            "the device path does RandomResizedCrop + ToTensor + Normalize only, the model's train "
            f"transform is {names}"
        )
    crop, _, norm = kept
    if crop.interpolation != InterpolationMode.BICUBIC:
        raise UnsupportedTransform(
            f"the device path resizes bicubic, the model's transform resizes {crop.interpolation.value}"
        )
    if len(norm.mean) != 3 or len(norm.std) != 3:
        raise UnsupportedTransform(f"Normalize with {len(norm.mean)} channel means, the device path takes 3")
    height, width = crop.size
    return DeviceImageSpec(
        size=(int(height), int(width)),
        scale=(float(crop.scale[0]), float(crop.scale[1])),
        ratio=(float(crop.ratio[0]), float(crop.ratio[1])),
        mean=tuple(float(m) for m in norm.mean),
        std=tuple(float(s) for s in norm.std),
    )


def choose_image_path(
    setting: bool | Literal["auto"], device_type: str, transform: Callable[[Any], Tensor]
) -> DeviceImageSpec | None:
    """Resolve data.image_on_device for a run training on `device_type` ("cpu", "cuda", ...).

    With open_clip's plain train transform the workers always hand over uint8 and the device normalises:
    the spec's `resize_on_device` says whether the resize runs there too (auto: on any accelerator; true:
    anywhere) or in the workers (auto on a CPU, false), where it is Pillow's, exactly as open_clip's
    transform runs it. Any other transform returns None: the workers run it whole and hand over float
    tensors; with `true` that is a UsageError instead."""
    try:
        spec = device_image_spec(transform)
    except UnsupportedTransform as err:
        if setting is True:
            raise UsageError(
                f"data.image_on_device: true, but {err}; set data.image_on_device: auto"
            ) from None
        logger.info("data.image_on_device: the workers run the model's whole train transform: %s", err)
        return None
    on_device = setting is True or (setting == "auto" and device_type != "cpu")
    return replace(spec, resize_on_device=on_device)


def pad_crops(
    crops: list[np.ndarray], boxes: list[tuple[float, float, float, float]], buffers: BatchBuffers
) -> tuple[dict[str, Tensor], tuple | None]:
    """Worker side: crops (uint8 [h, w, 3], sizes differ) and their boxes -> the batch's hand-over tensors
    ("media" zero-padded to the largest crop, "media_boxes", "media_sizes"; see the module docstring), and
    the ticket of the buffer "media" lies in (`buffers.allocate`)."""
    height = max(c.shape[0] for c in crops)
    width = max(c.shape[1] for c in crops)
    media, ticket = buffers.allocate((len(crops), height, width, 3), torch.uint8)
    padded = media.numpy()
    for k, crop in enumerate(crops):
        padded[k, : crop.shape[0], : crop.shape[1]] = crop
        padded[k, : crop.shape[0], crop.shape[1] :] = 0  # a reused buffer holds an earlier batch
        padded[k, crop.shape[0] :] = 0
    tensors = {
        "media": media,
        BOXES: torch.tensor(boxes, dtype=torch.float32),
        SIZES: torch.tensor([c.shape[:2] for c in crops], dtype=torch.int32),
    }
    return tensors, ticket


def _bicubic(x: Tensor) -> Tensor:
    x = x.abs()
    a = BICUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start: Tensor, end: Tensor, valid: Tensor, padded: int, out: int) -> Tensor:
    """Per-sample resampling matrices [B, out, padded] for one axis: output pixel i of sample b is
    sum_x W[b, i, x] * input[b, x], resizing the span [start, end) of its first `valid` pixels to `out`
    pixels with Pillow's antialiasing bicubic filter (widened by the scale when shrinking). Pixels at or past
    `valid` (the padding) get weight 0, and the weights are renormalised at the crop's edges as Pillow's
    are."""
    scale = (end - start) / out
    filter_scale = scale.clamp(min=1.0)
    support = BICUBIC_SUPPORT * filter_scale
    positions = torch.arange(out, device=start.device, dtype=start.dtype) + 0.5
    centre = start[:, None] + positions * scale[:, None]  # [B, out], in input pixels
    first = (centre - support[:, None] + 0.5).floor().clamp(min=0)
    stop = torch.minimum((centre + support[:, None] + 0.5).floor(), valid[:, None].to(start.dtype))
    x = torch.arange(padded, device=start.device, dtype=start.dtype)
    weights = _bicubic((x - centre[..., None] + 0.5) / filter_scale[:, None, None])
    weights = weights * ((x >= first[..., None]) & (x < stop[..., None]))
    return weights / weights.sum(-1, keepdim=True)


def crops_to_model_input(crops: Tensor, boxes: Tensor, sizes: Tensor, spec: DeviceImageSpec) -> Tensor:
    """Device side: the padded uint8 crops [B, H, W, 3] with their boxes and sizes -> the model's input
    [B, 3, height, width] float32: each box resized (bicubic, antialiased), scaled to [0, 1] and normalised
    with the model's mean and std, on the tensors' device, in float32 even inside autocast."""
    batch, height, width, _ = crops.shape
    out_h, out_w = spec.size
    device_type = crops.device.type
    no_autocast = (
        torch.autocast(device_type, enabled=False)
        if torch.amp.is_autocast_available(device_type)
        else contextlib.nullcontext()
    )
    with no_autocast:
        boxes = boxes.to(torch.float32)
        rows = resize_weights(boxes[:, 1], boxes[:, 3], sizes[:, 0], height, out_h)  # [B, out_h, H]
        cols = resize_weights(boxes[:, 0], boxes[:, 2], sizes[:, 1], width, out_w)  # [B, out_w, W]
        pixels = crops.permute(0, 3, 1, 2).to(torch.float32)  # [B, 3, H, W]
        # contract the axis whose first pass leaves fewer products to compute
        if height * out_w * (width + out_h) <= width * out_h * (height + out_w):
            resized = rows[:, None] @ (pixels @ cols.transpose(1, 2)[:, None])
        else:
            resized = (rows[:, None] @ pixels) @ cols.transpose(1, 2)[:, None]
        return normalise(resized.clamp_(0, 255), spec)


def normalise(pixels: Tensor, spec: DeviceImageSpec) -> Tensor:
    """Float pixels in [0, 255], [B, 3, H, W] -> the model's input, in place: ToTensor's division by 255,
    then Normalize's mean and std, as the same float32 operations in the same order, so uint8 pixels give
    the worker-side transform's result bit for bit."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return pixels.div_(255).sub_(mean).div_(std)


def images_to_model_input(images: Tensor, spec: DeviceImageSpec) -> Tensor:
    """Device side of the worker-resized hand-over: uint8 images at the model's size [B, H, W, 3] -> the
    model's input [B, 3, H, W] float32 (contiguous, as ToTensor leaves it), equal to open_clip's train
    transform's output for the same crop."""
    pixels = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return normalise(pixels, spec)


def batch_to_model_input(
    batch: Mapping[str, Any], device: torch.device, spec: DeviceImageSpec | None
) -> dict:
    """The batch with its media as the model's input on `device`: uint8 images are moved there as uint8 and
    converted there (a batch with "media_boxes" has crops to resize first and loses its hand-over keys);
    float media are only moved. Applying it twice changes nothing more."""
    media = batch["media"].to(device, non_blocking=True)
    if media.dtype == torch.uint8 and spec is None:
        raise ValueError("a uint8 image batch needs the DeviceImageSpec its stream was built with")
    if BOXES in batch:
        media = crops_to_model_input(media, batch[BOXES].to(device), batch[SIZES].to(device), spec)
    elif media.dtype == torch.uint8:
        media = images_to_model_input(media, spec)
    return {**{k: v for k, v in batch.items() if k not in (BOXES, SIZES)}, "media": media}
