"""Deterministic request payloads for the load tests: scenes drawn in-process with PIL/numpy, texts
from templates, multipart bodies encoded once per request. Nothing is downloaded.

The mix is meant to look like real traffic rather than one repeated request: images from thumbnails
to phone photos, square, landscape, portrait and panorama shapes, PNG (RGB, grayscale, RGBA) and
JPEG; questions and statements from three words to well past the model's maximum text length (so
the truncation path runs too); retrieval requests with a varying number of candidates.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from urllib3 import encode_multipart_formdata

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 170), "white": (245, 245, 245), "black": (20, 20, 20), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
# (width, height, share of the pool): thumbnails, square crops, camera and phone shapes, a panorama
# and a tall strip (elongated images take the service's padding path), one large photo.
IMAGE_SHAPES = ((48, 48, 1), (96, 96, 2), (160, 120, 3), (224, 224, 3), (320, 240, 3), (240, 320, 2),
                (384, 384, 2), (640, 480, 2), (480, 640, 1), (800, 200, 1), (150, 600, 1), (1024, 768, 1))
# (pixel mode, file format, share): most uploads are RGB JPEG or PNG; some grayscale or with alpha.
IMAGE_KINDS = (("RGB", "JPEG", 5), ("RGB", "PNG", 3), ("L", "PNG", 1), ("RGBA", "PNG", 1))
# The endpoint mix: task name (as in LOADTEST_WEIGHTS) -> route.
ENDPOINT_TASKS = {"vqa": "/vqa", "nlvr2": "/nlvr2", "retrieval_texts": "/retrieval/texts",
                  "retrieval_images": "/retrieval/images"}
DEFAULT_WEIGHTS = "vqa=4,nlvr2=2,retrieval_texts=2,retrieval_images=1"


def parse_weights(text: str) -> dict[str, int]:
    """``"vqa=4,nlvr2=2"`` -> {"vqa": 4, "nlvr2": 2, "retrieval_texts": 0, "retrieval_images": 0}."""
    weights = dict.fromkeys(ENDPOINT_TASKS, 0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in weights or not value.isdigit():
            raise ValueError(f"weights: expected NAME=INT with NAME in {', '.join(ENDPOINT_TASKS)}, got {item!r}")
        weights[name] = int(value)
    if not any(weights.values()):
        raise ValueError(f"weights {text!r} give every endpoint weight 0")
    return weights


def parse_range(text: str, kind: type = float) -> tuple:
    """``"2-20"`` -> (2, 20); ``"5"`` -> (5, 5)."""
    try:
        low, high = (kind(v) for v in text.split("-", 1)) if "-" in text else (kind(text),) * 2
    except ValueError:
        raise ValueError(f"expected LOW-HIGH, got {text!r}") from None
    if not 0 <= low <= high:
        raise ValueError(f"expected 0 <= LOW <= HIGH, got {text!r}")
    return low, high


@dataclass(frozen=True)
class EncodedImage:
    """One image file as a client would upload it."""

    filename: str
    content_type: str
    data: bytes
    width: int
    height: int


@dataclass(frozen=True)
class Body:
    """A ready multipart/form-data request body and what the response must reflect."""

    data: bytes
    content_type: str
    candidates: int = 0  # retrieval: how many candidates the ranking must hold


def draw_scene(rng: random.Random, width: int, height: int) -> Image.Image:
    """A noisy background with one to six coloured shapes, like the synthetic world the shipped plans learned."""
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 8, size=(height, width, 3))
    base = np.array(rng.choice(list(COLORS.values())), dtype=np.float64) * 0.35 + 90
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 6)):
        side = max(4, int(min(width, height) * rng.uniform(0.12, 0.4)))
        x, y = rng.randint(0, max(0, width - side)), rng.randint(0, max(0, height - side))
        color, shape = rng.choice(list(COLORS.values())), rng.choice(SHAPES)
        box = (x, y, x + side, y + side)
        if shape == "circle":
            draw.ellipse(box, fill=color)
        elif shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=color)
    return image


def _weighted(rng: random.Random, options):
    return rng.choices(options, weights=[o[-1] for o in options])[0]


def encode_image(image: Image.Image, mode: str, fmt: str, index: int) -> EncodedImage:
    converted = image.convert(mode)
    buffer = io.BytesIO()
    converted.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    suffix, content_type = ("jpg", "image/jpeg") if fmt == "JPEG" else ("png", "image/png")
    return EncodedImage(f"scene-{index}.{suffix}", content_type, buffer.getvalue(), image.width, image.height)


def image_pool(count: int, seed: int) -> list[EncodedImage]:
    """``count`` encoded scenes; the same seed gives byte-identical files."""
    rng = random.Random(seed)
    pool = []
    for index in range(count):
        width, height, _ = _weighted(rng, IMAGE_SHAPES)
        mode, fmt, _ = _weighted(rng, IMAGE_KINDS)
        pool.append(encode_image(draw_scene(rng, width, height), mode, fmt, index))
    return pool


def _phrase(rng: random.Random) -> str:
    return f"{rng.choice(SIZES)} {rng.choice(list(COLORS))} {rng.choice(SHAPES)}"


def _text_length(rng: random.Random) -> str:
    """Most texts are short, some medium, one in ten runs past the model's text limit."""
    return rng.choices(("short", "medium", "long"), weights=(6, 3, 1))[0]


def question(rng: random.Random) -> str:
    length = _text_length(rng)
    if length == "short":
        return rng.choice([f"what color is the {rng.choice(SHAPES)}?", f"how many {rng.choice(SHAPES)}s?",
                           f"is there a {rng.choice(list(COLORS))} {rng.choice(SHAPES)}?"])
    if length == "medium":
        return (f"is the {_phrase(rng)} {rng.choice(RELATIONS)} the {_phrase(rng)}, "
                f"and how many {rng.choice(list(COLORS))} shapes are there in the image?")
    clauses = [f"the {_phrase(rng)} {rng.choice(RELATIONS)} the {_phrase(rng)}" for _ in range(rng.randint(6, 12))]
    return "looking at " + ", then at ".join(clauses) + ", what color is the largest shape?"


def statement(rng: random.Random) -> str:
    length = _text_length(rng)
    if length == "short":
        return f"both images contain a {rng.choice(list(COLORS))} {rng.choice(SHAPES)}"
    if length == "medium":
        return (f"the left image has more {rng.choice(SHAPES)}s than the right image, "
                f"and the right image contains a {_phrase(rng)} {rng.choice(RELATIONS)} a {_phrase(rng)}")
    clauses = [f"a {_phrase(rng)} {rng.choice(RELATIONS)} a {_phrase(rng)}" for _ in range(rng.randint(6, 12))]
    return "one image shows " + " and ".join(clauses) + " while the other image shows none of them"


def caption(rng: random.Random) -> str:
    length = _text_length(rng)
    if length == "short":
        return f"a {_phrase(rng)}"
    if length == "medium":
        return f"a {_phrase(rng)} {rng.choice(RELATIONS)} a {_phrase(rng)} on a plain background"
    return " and ".join(f"a {_phrase(rng)} {rng.choice(RELATIONS)} a {_phrase(rng)}" for _ in range(rng.randint(6, 10)))


def _file(field: str, image: EncodedImage) -> tuple[str, tuple[str, bytes, str]]:
    return field, (image.filename, image.data, image.content_type)


def _body(fields: list, candidates: int = 0) -> Body:
    data, content_type = encode_multipart_formdata(fields)
    return Body(data, content_type, candidates)


class PayloadMix:
    """Request bodies for every endpoint, drawn from one shared image pool with a caller's RNG."""

    def __init__(self, pool: list[EncodedImage], candidates: tuple[int, int] = (2, 20)) -> None:
        if not pool:
            raise ValueError("the image pool is empty")
        low, high = candidates
        if not 1 <= low <= high:
            raise ValueError(f"candidate counts must satisfy 1 <= low <= high, got {low}-{high}")
        self.pool = pool
        self.candidates = candidates

    def vqa(self, rng: random.Random) -> Body:
        fields = [_file("image", rng.choice(self.pool)), ("question", question(rng))]
        if rng.random() < 0.3:  # some clients ask for a different number of answers
            fields.append(("top_k", str(rng.choice((1, 3, 10)))))
        return _body(fields)

    def nlvr2(self, rng: random.Random) -> Body:
        left, right = rng.choice(self.pool), rng.choice(self.pool)
        return _body([_file("image_left", left), _file("image_right", right), ("statement", statement(rng))])

    def retrieval_texts(self, rng: random.Random) -> Body:
        count = rng.randint(*self.candidates)
        texts = [caption(rng) for _ in range(count)]
        return _body([_file("image", rng.choice(self.pool)), *[("texts", t) for t in texts]], count)

    def retrieval_images(self, rng: random.Random) -> Body:
        count = rng.randint(*self.candidates)
        images = [_file("images", rng.choice(self.pool)) for _ in range(count)]
        return _body([("text", caption(rng)), *images], count)
