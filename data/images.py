"""Images -> vision patches, exactly as transformers' `Qwen2VLImageProcessorPil` (EXAONE 4.5's processor).

One image: convert to RGB (transparency composited onto white), resize with PIL bicubic to the pixel
budget (`smart_resize`: both sides multiples of patch*merge, area within [min_pixels, max_pixels]),
rescale by 1/255, normalize with the CLIP mean/std (one table lookup per value,
bit-identical to transformers' arithmetic), then flatten into rows of
3 * temporal_patch_size * patch * patch values ordered (merge block row, merge block col, row in
block, col in block), the single frame repeated temporal_patch_size times. The grid is (1, h, w) in
patches; the language model sees h*w/merge^2 image tokens. `tests/data/test_images.py` checks
equality with the transformers processor built from the same arguments.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image that cannot be decoded or processed."""


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept (transformers' rule)."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class PatchGeometry:
    """The vision tower's patch layout (the model's vision config); defaults are EXAONE 4.5's."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2


@dataclass(frozen=True)
class ImageSettings:
    """The numbers that decide patches; defaults are EXAONE 4.5's (transformers' Qwen2-VL defaults)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) in patches for an image of this size."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def num_tokens(self, height: int, width: int) -> int:
        t, h, w = self.grid(height, width)
        return t * h * w // (self.merge_size**2)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (what transformers' convert_to_rgb does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises many types for bad files
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None
    if image.width < 1 or image.height < 1:
        raise ImageError("empty image")
    return image


def process_image(image: Image.Image | bytes, settings: ImageSettings = ImageSettings()) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel_values float32 [h*w, patch_dim], grid (1, h, w))."""
    if isinstance(image, (bytes, bytearray)):
        image = decode_image(bytes(image))
    rgb = to_rgb(image)
    height, width = smart_resize(rgb.height, rgb.width, settings.factor, settings.min_pixels, settings.max_pixels)
    if (width, height) != rgb.size:  # PIL returns a plain copy for an unchanged size
        rgb = rgb.resize((width, height), resample=Image.BICUBIC)
    patches = patchify(np.asarray(rgb).transpose(2, 0, 1), settings)  # uint8 rows
    table, channel_offset = _normalize_table(settings)
    return table[patches + channel_offset], (1, height // settings.patch_size, width // settings.patch_size)


@lru_cache(maxsize=8)
def _normalize_table(settings: ImageSettings) -> tuple[np.ndarray, np.ndarray]:
    """Every uint8 value of every channel rescaled and normalized with transformers' arithmetic
    (x * 1/255 in float64, cast to float32, then (x - mean) / std in float32), so a lookup gives
    bit-identical values: (table float32 [3 * 256], offset of each row element's channel)."""
    x = (np.arange(256, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean32, std32 = np.asarray(settings.image_mean, dtype=np.float32), np.asarray(settings.image_std, dtype=np.float32)
    table = np.concatenate([(x - mean32[c]) / std32[c] for c in range(3)])
    per_channel = settings.temporal_patch_size * settings.patch_size**2
    return table, (np.arange(settings.patch_dim) // per_channel * 256).astype(np.intp)


def patchify(x: np.ndarray, settings: ImageSettings) -> np.ndarray:
    """(C, H, W) -> [grid_h * grid_w, C * T * p * p] rows in the vision tower's order (any dtype)."""
    p, m, t = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    c, height, width = x.shape
    gh, gw = height // p, width // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p)
