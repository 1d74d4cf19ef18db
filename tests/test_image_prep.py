"""Image preparation costs bounded memory for any allowed upload (both backbones), and photos come
out upright. Sizes are checked, not time: what reaches the pixel functions (the image processors'
numbers, models/backbones/pixels.py), the tensors they make, and the peak of numpy's allocations
(tracemalloc sees them; the resize works in PIL and numpy, the batch tensors are bounded by the
shapes asserted)."""

from __future__ import annotations

import io
import tracemalloc

import pytest
from PIL import Image

from helpers import WORDS, random_image
from models.backbones.base import limit_aspect_ratio
from models.backbones.meter.configuration import MeterConfig, meter_text_defaults, meter_vision_defaults
from models.backbones.meter.convert import build_roberta_tokenizer
from models.backbones.meter import modeling as meter_modeling
from models.backbones.meter.modeling import MeterBackbone
from models.backbones.vilt import modeling as vilt_modeling
from service.inputs import load_image

# 1 x N, N x 1 and a large photo, all within the default upload limits (40 megapixels)
EXTREMES = [(1, 5000), (5000, 1), (3, 2000), (2000, 3), (4000, 3000)]
PEAK_BYTES = 20 * 1024 * 1024
# the bounds: ViLT's processor gets at most twice the side it resizes to; METER's at most 2x its
# resolution on the shorter side and 8x on the longer (models/meter.py: SHRINK_TO, LARGE_SIDE)
METER_SHORTER, METER_LONGER = 2, 8


def vilt_longer_side(backbone) -> int:
    """The longest side ViLT's processor resizes to: 106 for the tiny checkpoint's 64 px processor."""
    return int(1333 / 800 * backbone.processor.image_processor.size["shortest_edge"])


def drawn(width: int, height: int) -> Image.Image:
    """A cheap large image with some content (a random image of 12 megapixels takes a while)."""
    image = Image.new("RGB", (width, height), (200, 30, 30))
    image.paste(random_image(min(height, 64), min(width, 64), seed=1), (0, 0))
    return image


@pytest.fixture(scope="module")
def vilt(backbones):
    return backbones["vqa"]


@pytest.fixture(scope="module")
def meter():
    tokenizer = build_roberta_tokenizer(WORDS, max_length=12)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text = {**meter_text_defaults(), **small, "vocab_size": len(tokenizer), "max_position_embeddings": 16}
    config = MeterConfig(vision={**meter_vision_defaults(32), **small}, text=text, hidden_size=32, num_fusion_layers=1,
                         num_attention_heads=2, intermediate_size=64, max_text_len=12)
    return MeterBackbone(config, tokenizer=tokenizer)


def prepared(backbone, images, module, name: str):
    """Preprocess ``images``; the sizes reaching the backbone's pixel function (``module.name``,
    which stands in for transformers' image processor with the same numbers) and numpy's peak."""
    original, sizes = getattr(module, name), []

    def recording(processor, given):
        sizes.extend(image.size for image in given)
        return original(processor, given)

    setattr(module, name, recording)
    try:
        tracemalloc.start()
        batch = backbone.preprocess(images, ["what color"] * len(images))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        setattr(module, name, original)
    return batch, sizes, peak


def vilt_prepared(backbone, images):
    return prepared(backbone, images, vilt_modeling, "vilt_pixels")


def meter_prepared(backbone, images):
    return prepared(backbone, images, meter_modeling, "meter_pixels")


@pytest.mark.parametrize("width, height", EXTREMES)
def test_vilt_preparation_is_bounded(vilt, width, height):
    longer = vilt_longer_side(vilt)
    batch, sizes, peak = vilt_prepared(vilt, [drawn(width, height)])
    assert max(sizes[0]) <= 2 * longer, sizes  # shrunk before padding, not padded to 5000 x 1563
    assert max(sizes[0]) / min(sizes[0]) <= longer / 33 + 1e-6  # and still padded to the ratio (size_divisor 32)
    assert max(batch.pixel_values.shape[-2:]) <= longer
    assert peak < PEAK_BYTES, peak


@pytest.mark.parametrize("width, height", EXTREMES)
def test_meter_preparation_is_bounded(meter, width, height):
    resolution = meter.config.image_size
    batch, sizes, peak = meter_prepared(meter, [drawn(width, height)])
    assert min(sizes[0]) <= METER_SHORTER * resolution, sizes
    assert max(sizes[0]) <= METER_LONGER * resolution, sizes
    assert tuple(batch.pixel_values.shape) == (1, 3, resolution, resolution)
    assert peak < PEAK_BYTES, peak


def test_small_images_reach_the_processors_unchanged(vilt, meter):
    """Images within the bounds are exactly what transformers' processors get without this guard."""
    image = random_image(40, 70, seed=3)
    assert vilt_prepared(vilt, [image])[1] == [(70, 40)]
    assert meter_prepared(meter, [image])[1] == [(70, 40)]
    assert meter_prepared(meter, [random_image(2, 100)])[1] == [(100, 4)]  # padded to 32:1 as before


def test_shrinking_keeps_the_image_where_padding_put_it():
    """Shrink-then-pad gives what pad-then-shrink would, without making the padded image."""
    image = Image.new("RGB", (4000, 10), (255, 0, 0))
    fitted = limit_aspect_ratio(image, 4.0, max_side=400)
    assert fitted.size == (400, 100)
    assert fitted.getpixel((200, 0)) == (255, 0, 0) and fitted.getpixel((200, 50)) == (0, 0, 0)
    assert limit_aspect_ratio(image, 4.0).size == (4000, 1000)  # without max_side: padding only, as before


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("width, height", [(40_000, 1), (1, 40_000)])
def test_a_tiny_file_of_a_long_image_is_cheap_to_prepare(vilt, meter, tmp_path, width, height):
    """The issue's case: a 199-byte PNG of 40000 x 1 pixels OOM-killed a worker."""
    path = tmp_path / "long.png"
    path.write_bytes(_png(Image.new("RGB", (width, height), (0, 0, 255))))
    assert path.stat().st_size < 1000
    image = load_image(path, "image")
    assert image.size == (width, height)
    for prepared, bound in ((vilt_prepared(vilt, [image]), 2 * vilt_longer_side(vilt)),
                            (meter_prepared(meter, [image]), METER_LONGER * meter.config.image_size)):
        batch, sizes, peak = prepared
        assert max(sizes[0]) <= bound and peak < PEAK_BYTES, (sizes, peak)


def _jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation, red_corner", [(6, "top-right"), (8, "bottom-left"), (1, "top-left")])
def test_exif_orientation_is_applied(tmp_path, orientation, red_corner):
    stored = Image.new("RGB", (60, 40), (0, 0, 255))  # landscape as stored, red block at its top left
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg_with_orientation(stored, orientation))
    image = load_image(path, "image")
    width, height = image.size
    assert (width, height) == ((60, 40) if orientation == 1 else (40, 60))  # 6 and 8: turned a quarter
    corners = {"top-left": (5, 5), "top-right": (width - 6, 5), "bottom-left": (5, height - 6)}
    for name, point in corners.items():
        red, _, blue = image.getpixel(point)
        assert (red > 200 and blue < 60) == (name == red_corner), (name, image.getpixel(point))
