"""A convolutional stem in place of the linear patch embedding (as ViT hybrids and Xiao et al.,
"Early Convolutions Help Transformers See Better", 2021).

A linear patch embedding trained from scratch at the embedded default's scale does not learn to tell
the synthetic world's shapes apart (docs/plans.md, "What limits the embedded model"), where a few 3x3
convolutions learn them within a few hundred steps. The stem is ``len(channels)`` 3x3 convolutions of
stride 2, each followed by GroupNorm and ReLU, then a 1x1 convolution to the hidden width, plus the linear
patch embedding beside it (its output added, for colour; see ``ConvStemPatchEmbeddings``): an image of
H x W pixels becomes an (H / 2^n) x (W / 2^n) grid of tokens, the grid of a patch size of 2^n, so the
position embeddings, pixel masks and image-token counts stay those of the linear embedding.

GroupNorm, not BatchNorm: a frozen backbone must compute the same thing in train and eval mode and
whatever the batch, and there are no running statistics to drift.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.backbones.base import BackboneError

STEM_GROUPS = 8  # GroupNorm groups of every stem convolution


def check_conv_stem(channels: Sequence[int], patch_size: int) -> None:
    """Refuse a stem that would not produce the patch grid: 2^len(channels) must be the patch size."""
    if not channels:
        raise ValueError("a convolutional stem needs at least one convolution")
    if 2 ** len(channels) != patch_size:
        raise ValueError(
            f"a stem of {len(channels)} stride-2 convolutions makes {2 ** len(channels)} px patches, "
            f"not the configured {patch_size} px (it needs log2(patch_size) convolutions)"
        )
    if any(c <= 0 or c % STEM_GROUPS for c in channels):
        raise ValueError(f"stem channels {list(channels)}: each must be a positive multiple of {STEM_GROUPS}")


def stem_widths(value: object) -> tuple[int, ...]:
    """Stem widths as a config.json stores them (a list of ints; absent or null: the linear embedding)."""
    return tuple(int(c) for c in (value or ()))


def checked_stem_widths(value: object, patch_size: int, where: str) -> tuple[int, ...]:
    """:func:`stem_widths` of a checkpoint's config value, refused (BackboneError naming ``where``) when
    they are no widths or cannot make the patch grid."""
    try:
        widths = stem_widths(value)
        if value is not None:
            check_conv_stem(widths, patch_size)
    except (TypeError, ValueError) as exc:
        raise BackboneError(f"{where} conv_stem_channels: {exc}") from None
    return widths


class ConvStemPatchEmbeddings(nn.Module):
    """Pixels (B, C, H, W) -> patch tokens (B, hidden, H / patch, W / patch), like ViltPatchEmbeddings."""

    def __init__(self, num_channels: int, channels: Sequence[int], hidden_size: int, patch_size: int) -> None:
        super().__init__()
        check_conv_stem(channels, patch_size)
        self.num_channels, self.patch_size = num_channels, patch_size
        layers: list[nn.Module] = []
        width = num_channels
        for out in channels:
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(STEM_GROUPS, out),
                       nn.ReLU()]
            width = out
        self.stem = nn.Sequential(*layers)
        self.projection = nn.Conv2d(width, hidden_size, kernel_size=1)
        # The linear patch embedding beside the stem, its output added: GroupNorm scores each response
        # against the whole image's, so the stem alone loses absolute colour (a linear probe of its output
        # tells an object's colour 24% right, of the patch's mean RGB 98%); this keeps it.
        self.patches = nn.Conv2d(num_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    @property
    def weight(self) -> torch.Tensor:
        """The projection's weight: transformers' CLIP embeddings read ``patch_embedding.weight.dtype``."""
        return self.projection.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        pixel_values = pixel_values.to(self.projection.weight.dtype)
        rows, cols = height // self.patch_size, width // self.patch_size
        # a side that is not a multiple of the patch size rounds up in the stride-2 convolutions; the linear
        # embedding rounds down, and so does the pixel mask's grid
        return self.projection(self.stem(pixel_values))[:, :, :rows, :cols] + self.patches(pixel_values)
