"""Scenes of the synthetic world: coloured shapes on a noisy background, sampled and drawn deterministically."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 70),
    "blue": (45, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
SIZE_RADIUS = {"small": 0.08, "large": 0.13}  # half-extent, as a fraction of the image side
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left", "right", "above", "below")
RELATION_TEXT = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
RELATION_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Relations are only asked about / stated when the centres differ by at least this much along the
# relevant axis (so they are visible), though their truth is the plain comparison of centres.
RELATION_MARGIN = 0.1



@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 96
    min_objects: int = 1
    max_objects: int = 4
    noise: int = 8  # per-pixel noise amplitude (uniform in [-noise, noise]) in 0-255 units

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 px, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 4, got {self.min_objects}, {self.max_objects}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")


# ---------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: float  # centre, fraction of the width (0 = left edge)
    y: float  # centre, fraction of the height (0 = top edge)

    @property
    def radius(self) -> float:
        return SIZE_RADIUS[self.size]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    noise_seed: int

    def find(self, color: str | None = None, shape: str | None = None, size: str | None = None) -> list[SceneObject]:
        return [o for o in self.objects if (color is None or o.color == color)
                and (shape is None or o.shape == shape) and (size is None or o.size == size)]

    def count(self, color: str | None = None, shape: str | None = None, size: str | None = None) -> int:
        return len(self.find(color, shape, size))

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "background": list(self.background),
                "noise_seed": self.noise_seed}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(objects=tuple(SceneObject(**o) for o in data["objects"]),
                   background=tuple(data["background"]), noise_seed=int(data["noise_seed"]))


def seeded_rng(seed: int, *parts: object) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: stable across runs and platforms.
    return random.Random(":".join(["das-world", str(seed), *map(str, parts)]))


def relation_holds(a: SceneObject, relation: str, b: SceneObject) -> bool:
    """Whether ``a`` is ``relation`` (left/right/above/below) of ``b``, comparing centres."""
    return {"left": a.x < b.x, "right": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[relation]


def relation_visible(a: SceneObject, relation: str, b: SceneObject) -> bool:
    axis = (a.x - b.x) if relation in ("left", "right") else (a.y - b.y)
    return abs(axis) >= RELATION_MARGIN


def sample_scene(rng: random.Random, config: WorldConfig = WorldConfig()) -> Scene:
    """A random scene: ``min_objects..max_objects`` non-overlapping objects, distinct (colour, shape)."""
    pairs = [(c, s) for c in COLOR_NAMES for s in SHAPES]
    while True:
        n = rng.randint(config.min_objects, config.max_objects)
        objects: list[SceneObject] = []
        for _ in range(n):
            used = {(o.color, o.shape) for o in objects}
            color, shape = rng.choice([p for p in pairs if p not in used])
            size = rng.choice(SIZES)
            r = SIZE_RADIUS[size]
            for _attempt in range(60):
                x = round(rng.uniform(r + 0.02, 1 - r - 0.02), 4)
                y = round(rng.uniform(r + 0.02, 1 - r - 0.02), 4)
                if all(math.hypot(x - o.x, y - o.y) >= r + o.radius + 0.03 for o in objects):
                    objects.append(SceneObject(shape, color, size, x, y))
                    break
            else:
                break  # no room: draw the scene again
        if len(objects) == n:
            grey = rng.randint(80, 135)
            background = tuple(min(255, max(0, grey + rng.randint(-10, 10))) for _ in range(3))
            return Scene(tuple(objects), background, rng.getrandbits(31))


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "diamond":
        r *= 1.15
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(shape)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, image_size: int, fill) -> None:
    cx, cy, r = obj.x * image_size, obj.y * image_size, obj.radius * image_size
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=fill)


def render_scene(scene: Scene, image_size: int = 96, noise: int = 8) -> Image.Image:
    """The scene as an RGB image of ``image_size`` x ``image_size`` pixels; deterministic."""
    image = Image.new("RGB", (image_size, image_size), tuple(scene.background))
    draw = ImageDraw.Draw(image)
    noise_rng = np.random.default_rng(scene.noise_seed)
    for obj in scene.objects:
        jitter = noise_rng.integers(-12, 13, size=3)
        fill = tuple(int(min(255, max(0, c + j))) for c, j in zip(COLORS[obj.color], jitter))
        _draw_object(draw, obj, image_size, fill)
    if noise:
        pixels = np.asarray(image, dtype=np.int16) + noise_rng.integers(
            -noise, noise + 1, size=(image_size, image_size, 3), dtype=np.int16)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image


# what patch-level pre-training objectives predict: the value, among these, of the object under a patch
PATCH_ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLOR_NAMES}


def patch_objects(scene: Scene, grid: int, patch_size: int, min_cover: float = 0.25) -> np.ndarray:
    """(grid * grid,) int64 in raster order: 1 + the index in ``scene.objects`` of the object covering the
    larger part of each patch of a ``grid`` x ``grid`` patching of the image, 0 where no object covers
    ``min_cover`` of it (objects never overlap)."""
    side = grid * patch_size
    best_cover = np.full((grid, grid), min_cover)
    labels = np.zeros((grid, grid), dtype=np.int64)
    for index, obj in enumerate(scene.objects):
        mask = Image.new("L", (side, side), 0)
        _draw_object(ImageDraw.Draw(mask), obj, side, 255)
        cover = (np.asarray(mask, dtype=np.float32) / 255).reshape(grid, patch_size, grid, patch_size).mean(axis=(1, 3))
        wins = cover >= best_cover
        labels[wins], best_cover[wins] = 1 + index, cover[wins]
    return labels.reshape(-1)


def patch_labels(scene: Scene, objects: np.ndarray, attribute: str) -> np.ndarray:
    """Per patch, 1 + the index in ``PATCH_ATTRIBUTES[attribute]`` of the value of the object
    :func:`patch_objects` put there (``objects``), 0 for background: what a patch-level objective predicts."""
    values = PATCH_ATTRIBUTES[attribute]
    table = np.array([0] + [1 + values.index(getattr(o, attribute)) for o in scene.objects], dtype=np.int64)
    return table[objects]
