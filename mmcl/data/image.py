"""Image samples: decode the stored bytes with Pillow (RGB) and apply the model's transform.

The transform (open_clip's train or eval preprocess) comes from the model, so the pipeline never
disagrees with it about size, crop or normalisation. Bytes are opened as the sharder opens them
(shards_tools.decode.open_image: allowed formats only, a pixel cap before decoding).

With open_clip's plain train transform a worker stops before ToTensor + Normalize and hands over uint8
pixels (a quarter of float32's bytes); mmcl.data.device_transform converts and normalises them on the
training device. Where the resize runs (data.image_on_device): in the worker, `image_resized` crops and
resizes exactly as open_clip's RandomResizedCrop does on PIL images; on the device, `image_crop` draws the
crop box from the full image's geometry, decodes no more pixels than the crop needs (JPEG draft) and hands
over the crop unresized.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.functional import resized_crop

from mmcl.data.common import BadSample, call_seeded
from mmcl.data.device_transform import DeviceImageSpec
from shards_tools.decode import DecodeError, open_image
from shards_tools.shard_format import IMAGE_EXTENSIONS

Box = tuple[float, float, float, float]  # left, top, right, bottom


def decode_image(data: bytes, key: str, size_hint: int | None = None) -> Image.Image:
    """Bytes -> RGB image, or BadSample. With `size_hint`, JPEGs are decoded at the smallest DCT
    scale (1/2, 1/4, 1/8) that keeps both sides >= the hint: several times faster for large photos."""
    try:
        with open_image(data) as image:
            if size_hint is not None:
                image.draft("RGB", (size_hint, size_hint))
            return image.convert("RGB")
    except DecodeError as err:
        raise _bad_image(key, err) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise _bad_image(key, err) from err


def _bad_image(key: str, err: Exception) -> BadSample:
    if isinstance(err, DecodeError):
        return BadSample(key, f"{'decompression bomb' if err.bomb else 'undecodable image'} ({err})")
    return BadSample(key, f"undecodable image ({err})")


def _image_bytes(sample: dict) -> bytes:
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample(sample["__key__"], f"no image file (.{', .'.join(IMAGE_EXTENSIONS)})")
    return sample[ext]


def image_media(
    sample: dict, transform: Callable[[Image.Image], torch.Tensor], seed: int, size_hint: int | None
) -> torch.Tensor:
    """The sample's image as the model's input tensor [3, H, W]; random augmentation seeded by `seed`."""
    image = decode_image(_image_bytes(sample), sample["__key__"], size_hint)
    return call_seeded(transform, image, seed)


def sample_crop_box(width: int, height: int, spec: DeviceImageSpec, seed: int) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) in a width x height image: torchvision's
    RandomResizedCrop.get_params itself, run under `seed` as the CPU path runs open_clip's transform, so a
    sample gets the box it would get there (the crop is that transform's first random draw)."""
    shape_only = torch.empty(1, 1, 1).expand(3, height, width)  # get_params reads the shape only
    scale, ratio = list(spec.scale), list(spec.ratio)
    return call_seeded(lambda image: RandomResizedCrop.get_params(image, scale, ratio), shape_only, seed)


def image_resized(sample: dict, spec: DeviceImageSpec, seed: int, size_hint: int | None) -> np.ndarray:
    """The sample's image as open_clip's train transform crops and resizes it, uint8 [height, width, 3]:
    RandomResizedCrop's box drawn under `seed` (`sample_crop_box`), then torchvision's own resized_crop, the
    call RandomResizedCrop makes with it. With ToTensor + Normalize on the device
    (device_transform.images_to_model_input) it is `image_media`'s tensor bit for bit."""
    image = decode_image(_image_bytes(sample), sample["__key__"], size_hint)
    top, left, crop_h, crop_w = sample_crop_box(image.width, image.height, spec, seed)
    size = list(spec.size)
    return np.asarray(resized_crop(image, top, left, crop_h, crop_w, size, InterpolationMode.BICUBIC))


def image_crop(sample: dict, spec: DeviceImageSpec, seed: int) -> tuple[np.ndarray, Box]:
    """The device path's worker half: the sample's crop as uint8 pixels [h, w, 3] and the crop box inside
    them (fractional where the decode was reduced), for mmcl.data.device_transform to resize and normalise.

    The box is drawn on the full image (`sample_crop_box`). A JPEG is then decoded at the smallest DCT
    scale (1/2, 1/4, 1/8) that keeps the crop at least the output size on both axes, and the box is mapped
    into that scale; a crop still twice the output size or more (a large PNG or WebP, a huge JPEG) is shrunk
    by the integer factor that keeps it at least the output size (Image.reduce, a box filter), so no worker
    hands over much more than the model will see."""
    key = sample["__key__"]
    out_h, out_w = spec.size
    try:
        with open_image(_image_bytes(sample)) as image:
            width, height = image.size
            top, left, crop_h, crop_w = sample_crop_box(width, height, spec, seed)
            # draft takes the strongest DCT reduction (1/2, 1/4, 1/8) that keeps the image >= this size,
            # which keeps the crop >= the output size
            at_least = (math.ceil(width * out_w / crop_w), math.ceil(height * out_h / crop_h))
            drafted = image.draft("RGB", at_least)
            scale = drafted[1][2] / width if drafted else 1.0  # decoded pixels per full-size pixel
            rgb = image.convert("RGB")
    except DecodeError as err:
        raise _bad_image(key, err) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise _bad_image(key, err) from err
    box = (left * scale, top * scale, (left + crop_w) * scale, (top + crop_h) * scale)
    x0, y0 = math.floor(box[0]), math.floor(box[1])
    x1, y1 = min(math.ceil(box[2]), rgb.width), min(math.ceil(box[3]), rgb.height)
    factor = int(min((box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h))
    if factor >= 2:
        pixels = np.asarray(rgb.reduce(factor, box=(x0, y0, x1, y1)))
    else:
        factor = 1
        pixels = np.asarray(rgb)[y0:y1, x0:x1]
    local = ((box[0] - x0) / factor, (box[1] - y0) / factor, (box[2] - x0) / factor, (box[3] - y0) / factor)
    return pixels, local
