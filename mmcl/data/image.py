"""Image samples: decode the stored bytes with Pillow (RGB) and apply the model's transform.

The transform (open_clip's train or eval preprocess) comes from the model, so the pipeline never
disagrees with it about size, crop or normalisation. Bytes are opened as the sharder opens them
(shards_tools.decode.open_image: allowed formats only, a pixel cap before decoding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from mmcl.data.common import BadSample, call_seeded
from shards_tools.decode import DecodeError, open_image
from shards_tools.shard_format import IMAGE_EXTENSIONS


def decode_image(data: bytes, key: str, size_hint: int | None = None) -> Image.Image:
    """Bytes -> RGB image, or BadSample. With `size_hint`, JPEGs are decoded at the smallest DCT
    scale (1/2, 1/4, 1/8) that keeps both sides >= the hint: several times faster for large photos."""
    try:
        with open_image(data) as image:
            if size_hint is not None:
                image.draft("RGB", (size_hint, size_hint))
            return image.convert("RGB")
    except DecodeError as err:
        raise BadSample(key, f"{'decompression bomb' if err.bomb else 'undecodable image'} ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise BadSample(key, f"undecodable image ({err})") from err


def image_media(
    sample: dict, transform: Callable[[Image.Image], torch.Tensor], seed: int, size_hint: int | None
) -> torch.Tensor:
    """The sample's image as the model's input tensor [3, H, W]; random augmentation seeded by `seed`."""
    key = sample["__key__"]
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample(key, f"no image file (.{', .'.join(IMAGE_EXTENSIONS)})")
    image = decode_image(sample[ext], key, size_hint)
    return call_seeded(transform, image, seed)
