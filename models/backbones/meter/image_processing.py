"""METER's image preprocessing: the numbers of transformers' ``CLIPImageProcessorPil`` (shorter side
resized, centre crop, CLIP normalisation) without its per-image float64 passes (see
``models.backbones.pixels``). A processor set up otherwise, or a crop larger than the resized
image (the processor pads it), is simply handed to the processor."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.image_transforms import get_resize_output_image_size

from models.backbones.pixels import pixel_batch, plain_steps


def resized_and_cropped(processor, image: Image.Image) -> np.ndarray | None:
    """The processor's resize (shorter side to ``size["shortest_edge"]``, PIL's resampling) and
    centre crop, as an (H, W, 3) uint8 array; None when the crop would need padding."""
    shape_only = np.empty((1, image.height, image.width), dtype=np.uint8)  # channels first, as the processor asks
    height, width = get_resize_output_image_size(
        shape_only, size=processor.size.get("shortest_edge"), default_to_square=False, input_data_format="channels_first",
    )
    if (width, height) != image.size:
        image = image.resize((width, height), resample=processor.resample)
    crop_height, crop_width = int(processor.crop_size.height), int(processor.crop_size.width)
    top, left = (height - crop_height) // 2, (width - crop_width) // 2  # transformers' center_crop
    if top < 0 or left < 0:
        return None
    return np.array(image)[top:top + crop_height, left:left + crop_width]  # a numpy view: PIL's crop is slower


def meter_pixels(processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) float32 pixel values for RGB ``images``, as ``processor(images)["pixel_values"]``."""
    crop = getattr(processor, "crop_size", None)
    if plain_steps(processor, "do_center_crop") and crop is not None and crop.height and crop.width:
        cropped = [resized_and_cropped(processor, image) for image in images]
        if all(image is not None for image in cropped):
            return pixel_batch(processor, cropped)[0]
    return processor(list(images), return_tensors="pt")["pixel_values"]
