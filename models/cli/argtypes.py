"""argparse types shared by the `das` commands (and light: no project imports)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type for counts and sizes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type for amounts such as epochs: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_int_list(text: str) -> list[int]:
    """argparse type for comma-separated positive integers, e.g. `--batch-sizes 1,32`."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,32; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,32; got {text!r}")
    return values


def stem_channels(text: str) -> tuple[int, ...]:
    """argparse type for a convolutional stem's widths, e.g. `--conv-stem 16,32,64,128`; `none` for the linear
    patch embedding."""
    if text.strip().lower() == "none":
        return ()
    return tuple(positive_int_list(text))


def layer_list(text: str) -> list[int]:
    """argparse type for comma-separated layer indices, e.g. `--skip 0,3,5` (range checked by the command)."""
    if not text.strip():
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,3,5; got {text!r}") from None


def image_size(text: str) -> tuple[int, int]:
    """argparse type for an image size: 384 (square) or HxW like 384x576, both sides positive."""
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            size = int(h), int(w)
        else:
            size = int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an image size like 384 or 384x576; got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected an image size of positive sides like 384 or 384x576; got {text!r}")
    return size


def fraction(text: str) -> float:
    """argparse type for a share in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def split_fraction(text: str) -> float:
    """argparse type for the share of a data set in one split: [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.1, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value
