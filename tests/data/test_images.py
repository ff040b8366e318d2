import numpy as np
import pytest
from PIL import Image

from data.images import ImageError, ImageSettings, process_image, smart_resize

transformers_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


def _image(h, w, mode, seed):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P+transparency":
        im = im.convert("RGB").convert("P")
        im.info["transparency"] = 3
        return im
    return im if mode == "RGBA" else im.convert(mode)


CASES = [
    # (height, width, mode, min_pixels, max_pixels, patch, merge)
    (56, 56, "RGB", 784, 12544, 14, 2),  # the demo's digit images: kept as is
    (8, 8, "L", 784, 12544, 14, 2),  # upscaled to the minimum
    (100, 37, "RGBA", 3136, 1003520, 14, 2),  # transparency composited onto white
    (600, 900, "RGB", 3136, 50000, 14, 2),  # downscaled to the budget
    (30, 300, "P", 784, 12544, 14, 2),  # palette, wide
    (45, 61, "P+transparency", 3136, 28 * 28 * 1280, 14, 2),
    (113, 97, "LA", 56 * 56, 28 * 28 * 1280, 14, 2),
    (129, 250, "RGB", 1024, 65536, 16, 2),  # other patch sizes follow the same rule
]


@pytest.mark.parametrize("h,w,mode,min_pixels,max_pixels,patch,merge", CASES)
def test_matches_transformers_qwen2vl_pil_processor(h, w, mode, min_pixels, max_pixels, patch, merge):
    image = _image(h, w, mode, seed=h * w)
    reference = transformers_pil.Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch, temporal_patch_size=2, merge_size=merge
    )(images=[image], return_tensors="np")
    settings = ImageSettings(min_pixels, max_pixels, patch, 2, merge)
    pixels, grid = process_image(image, settings)
    assert pixels.dtype == np.float32
    assert grid == tuple(reference["image_grid_thw"][0])
    assert pixels.shape == reference["pixel_values"].shape == (grid[1] * grid[2], 3 * 2 * patch * patch)
    assert np.array_equal(pixels, reference["pixel_values"])  # bit for bit
    assert settings.num_tokens(h, w) == grid[1] * grid[2] // merge**2


def test_resize_rule_keeps_budget_and_multiples():
    for h, w in [(8, 8), (56, 56), (1000, 300), (4000, 3000), (29, 29)]:
        rh, rw = smart_resize(h, w, 28, 784, 12544)
        assert rh % 28 == 0 and rw % 28 == 0
        assert 784 <= rh * rw <= 12544
    assert smart_resize(56, 56, 28, 784, 12544) == (56, 56)
    assert smart_resize(8, 8, 28, 784, 12544) == (28, 28)
    with pytest.raises(ImageError):
        smart_resize(1, 300, 28, 784, 12544)  # aspect ratio over 200
