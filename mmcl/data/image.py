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

import functools
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
            return as_rgb(image)
    except DecodeError as err:
        raise _bad_image(key, err) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise _bad_image(key, err) from err


def as_rgb(image: Image.Image) -> Image.Image:
    """The decoded image in RGB: `image` itself when it decodes to RGB (most JPEGs), where convert("RGB")
    would copy it (~60 us at 342 x 256)."""
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


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
    """(top, left, crop height, crop width) in a width x height image: the box torchvision's
    RandomResizedCrop.get_params draws under `seed`, as the CPU path runs open_clip's transform, so a
    sample gets the box it would get there (the crop is that transform's first random draw)."""
    scale, ratio = spec.scale, spec.ratio
    return call_seeded(lambda _: _crop_box(width, height, scale, ratio), None, seed, torch_only=True)


CROP_ATTEMPTS = 10  # RandomResizedCrop.get_params's tries before its central-crop fallback
NEAR_HALF = 1e-4  # pixels: a side this close to rounding either way is left to get_params itself


@functools.cache
def _log_bounds(ratio: tuple[float, float]) -> tuple[float, float]:
    """get_params's torch.log(torch.tensor(ratio)), float32 as it has it."""
    low, high = torch.log(torch.tensor(ratio)).tolist()
    return low, high


def _crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params's box from torch's CPU generator, at a fraction of its cost.

    get_params draws a scale and a log-ratio per attempt with a torch call each (up to 10 attempts: ~0.2 ms
    an image, a tenth of the device path worker's time). The generator gives one 32-bit
    number per float whatever the bounds, so the attempts' scales are the even draws of one call with the
    scale bounds and their log-ratios the odd draws of one with the ratio bounds, replayed from the same
    state. The side lengths are then get_params's arithmetic; the one step that may differ by an ulp
    (exp over ten values against exp of one) cannot change a side that is not within NEAR_HALF of rounding
    the other way, and such an attempt goes to get_params itself. The offsets of a fitting box are
    get_params's own torch.randint calls from the same generator position. Bit for bit get_params
    (tests/test_image_device_path.py, over many seeds, sizes and scales)."""
    generator = torch.default_generator
    start = generator.get_state()
    scales = torch.empty(2 * CROP_ATTEMPTS).uniform_(scale[0], scale[1])[0::2].tolist()
    generator.set_state(start)
    aspects = torch.exp(torch.empty(2 * CROP_ATTEMPTS).uniform_(*_log_bounds(ratio))[1::2]).tolist()
    area = width * height
    for attempt in range(CROP_ATTEMPTS):
        target_area = area * scales[attempt]
        exact_w = math.sqrt(target_area * aspects[attempt])
        exact_h = math.sqrt(target_area / aspects[attempt])
        if abs(exact_w % 1 - 0.5) < NEAR_HALF or abs(exact_h % 1 - 0.5) < NEAR_HALF:
            generator.set_state(start)
            return RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, height, width), scale, ratio)
        w, h = int(round(exact_w)), int(round(exact_h))
        if 0 < w <= width and 0 < h <= height:
            generator.set_state(start)
            torch.empty(2 * (attempt + 1)).uniform_()  # the draws get_params made before its randint calls
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    in_ratio = width / height  # get_params's fallback: the central crop at the nearest allowed ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


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
            rgb = as_rgb(image)
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
