"""Image tensors with the same numbers as transformers' PIL image processors, at a fraction of
their cost and memory (shared by the backbones' preprocessing).

The processors turn every image into a float64 numpy array and make several passes over it, in the
serving thread, before every forward pass: 4.5 ms for one 384 x 384 image on a 2-core EPYC. Here
the image stays uint8 through resize (PIL's, as the processors call it) and crop, and each pixel's
value is looked up in a 256-entry table per channel that holds the processors' arithmetic (rescale
in float64, cast to float32, normalise in float32) applied to every level. The values are the same
bit for bit (tests compare them with the processors).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def plain_steps(processor, *steps: str) -> bool:
    """Whether the processor runs exactly ``steps`` (do_* flags) besides resize, rescale and
    normalise, resizing by ``size["shortest_edge"]`` with PIL resampling, with a mean and std of 1
    or 3 values: the setups these fast paths reproduce."""
    optional = {"do_center_crop", "do_pad"}
    wanted = {"do_resize", "do_rescale", "do_normalize", *steps}
    size = getattr(processor, "size", None)
    return (
        all(bool(getattr(processor, flag, False)) for flag in wanted)
        and isinstance(size and size.get("shortest_edge"), int)
        and not any(bool(getattr(processor, flag, False)) for flag in optional - wanted)
        and isinstance(getattr(processor, "resample", None), int)
        and np.atleast_1d(processor.image_mean).size in (1, 3)
        and np.atleast_1d(processor.image_std).size in (1, 3)
    )


def value_tables(processor) -> torch.Tensor:
    """(3, 256) float32: the processor's value for every uint8 level of every channel, computed as
    it computes pixels (rescale in float64, cast to float32, normalise in float32): looking the
    levels up gives its numbers bit for bit, with no float64 image in memory."""
    levels = (np.arange(256, dtype=np.float64) * processor.rescale_factor).astype(np.float32)
    mean = np.broadcast_to(np.atleast_1d(np.asarray(processor.image_mean, dtype=np.float32)), (3,))
    std = np.broadcast_to(np.atleast_1d(np.asarray(processor.image_std, dtype=np.float32)), (3,))
    return torch.from_numpy((levels[None, :] - mean[:, None]) / std[:, None])


def pixel_batch(processor, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB images as (H, W, 3) uint8 arrays (already resized and cropped; writable) as the
    processor's (B, 3, H, W) float32 values, padded bottom/right with zeros to the largest (the
    processors pad after normalising), and the (B, H, W) int64 mask of real pixels. Memory: the
    output, and one image's levels at a time."""
    tables = value_tables(processor)
    height, width = max(image.shape[0] for image in images), max(image.shape[1] for image in images)
    pixels = torch.zeros(len(images), 3, height, width, dtype=torch.float32)
    mask = torch.zeros(len(images), height, width, dtype=torch.int64)
    for i, image in enumerate(images):
        levels = torch.from_numpy(image).to(torch.int32)  # (h, w, 3)
        h, w = levels.shape[:2]
        for c in range(3):
            pixels[i, c, :h, :w] = tables[c].index_select(0, levels[..., c].reshape(-1)).view(h, w)
        mask[i, :h, :w] = 1
    return pixels, mask
