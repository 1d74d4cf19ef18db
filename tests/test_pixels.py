"""The backbones' image tensors come without calling transformers' PIL image processors
(models/backbones/pixels.py); they must be the processors' numbers bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

from helpers import random_image
from models.backbones.meter.image_processing import meter_pixels
from models.backbones.meter.modeling import default_image_processor
from models.backbones.vilt.image_processing import vilt_pixels

# shrunk, enlarged, kept, long and narrow: (height, width)
SIZES = [(384, 384), (300, 500), (40, 70), (1000, 333), (129, 128)]


def images():
    return [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]


@pytest.mark.parametrize("shortest_edge", [64, 384])
def test_vilt_pixels_equal_the_processor(shortest_edge):
    """Same values, padding and mask, for one image and for a batch of mixed sizes."""
    processor = ViltImageProcessorPil(size={"shortest_edge": shortest_edge})
    for batch in (images()[:1], images()):
        expected = processor(batch, return_tensors="pt")
        got = vilt_pixels(processor, batch)
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
        assert torch.equal(got["pixel_mask"], expected["pixel_mask"])


@pytest.mark.parametrize("resolution", [32, 128, 288])
def test_meter_pixels_equal_the_processor(resolution):
    processor = default_image_processor(resolution)
    for batch in (images()[:1], images()):
        assert torch.equal(meter_pixels(processor, batch), processor(batch, return_tensors="pt")["pixel_values"])


def test_other_processor_setups_are_handed_to_the_processor():
    """A processor without normalisation, or whose crop is larger than the resized image (it pads),
    is called as it is: the same numbers whatever its setup."""
    batch = images()
    plain = ViltImageProcessorPil(size={"shortest_edge": 64}, do_normalize=False)
    assert torch.equal(vilt_pixels(plain, batch)["pixel_values"], plain(batch, return_tensors="pt")["pixel_values"])
    padded = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 48, "width": 48})
    assert torch.equal(meter_pixels(padded, batch), padded(batch, return_tensors="pt")["pixel_values"])
    unscaled = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_rescale=False)
    assert torch.equal(meter_pixels(unscaled, batch), unscaled(batch, return_tensors="pt")["pixel_values"])
