"""A deterministic synthetic vision-language world: coloured shapes on a noisy background.

Used to pre-train a tiny ViLT and to train DAS plans offline. A ``Scene`` is 1-4 objects, each a
shape (circle, square, triangle, diamond), a colour (red, green, blue, yellow, purple, orange), a
size (small, large) and a position (centre x, y in [0, 1], y downwards), on a grey background;
no two objects of a scene share both colour and shape, so "the red circle" always names one object.
``render_scene`` draws it (PIL) at any image size, with light per-pixel and per-object colour noise
that is itself fixed by the scene (``Scene.noise_seed``): the same scene always gives the same pixels.

Three task datasets are built from scenes; every label is a function of the Scene description alone:

* VQA (``generate_vqa``): questions about colour, shape, count, existence and relative position,
  answers from the fixed ``VQA_ANSWERS`` vocabulary, and 10 annotator answers per question (mostly
  the true answer, at most two deterministic wrong ones of the same kind) scored like VQAv2,
  ``min(1, count / 3)``; the true answer always scores 1, a wrong one at most 2/3.
* NLVR2 (``generate_nlvr2``): two scenes and one statement about them, true or false; statement i is
  true iff i is even (balanced), and by default two consecutive statements (one true, one false)
  share an image pair, as several sentences share a pair in NLVR2.
* Retrieval (``generate_retrieval``): 5 captions per scene, all true of it; ``hard_negatives(scene)``
  gives captions that change exactly one attribute of one object (colour, shape, size, or a
  left/right/above/below relation) and so are false for the scene.

Everything is deterministic: example ``i`` of a task is made from ``random.Random`` seeded with
(seed, task, i) alone, so a larger ``n`` extends a smaller one, and the train/val/test split of each
unit (VQA image, NLVR2 pair, retrieval image) is a permutation drawn from the seed. No global RNG is
used.

``das data synth --task vqa|nlvr2|retrieval --out DIR --n N --seed S`` writes a dataset in the file
formats of the real VQAv2 / NLVR2 / Flickr30K-Karpathy releases (``models/datasets.py`` reads both),
plus ``DIR/synth.json`` and ``DIR/README.md`` (what it is) and ``DIR/scenes.jsonl`` (the scene of
every image, by relative path; ``load_scenes`` reads it, e.g. for hard negatives while training).
``--n`` counts questions for VQA, statements for NLVR2 and images for retrieval.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
TASKS = ("vqa", "nlvr2", "retrieval")

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

QUESTION_TYPES = ("color", "shape", "count", "exist", "relation")
ANSWER_TYPES = {"color": "other", "shape": "other", "count": "number", "exist": "yes/no", "relation": "yes/no"}
COUNT_ANSWERS = tuple(str(i) for i in range(5))
VQA_ANSWERS: tuple[str, ...] = ("yes", "no") + COUNT_ANSWERS + COLOR_NAMES + SHAPES
ANNOTATORS = 10


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


def _rng(seed: int, *parts: object) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: stable across runs and platforms.
    return random.Random(":".join(["das-world", str(seed), *map(str, parts)]))


def relation_holds(a: SceneObject, relation: str, b: SceneObject) -> bool:
    """Whether ``a`` is ``relation`` (left/right/above/below) of ``b``, comparing centres."""
    return {"left": a.x < b.x, "right": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[relation]


def _visible(a: SceneObject, relation: str, b: SceneObject) -> bool:
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


def render_scene(scene: Scene, image_size: int = 96, noise: int = 8) -> Image.Image:
    """The scene as an RGB image of ``image_size`` x ``image_size`` pixels; deterministic."""
    image = Image.new("RGB", (image_size, image_size), tuple(scene.background))
    draw = ImageDraw.Draw(image)
    noise_rng = np.random.default_rng(scene.noise_seed)
    for obj in scene.objects:
        jitter = noise_rng.integers(-12, 13, size=3)
        fill = tuple(int(min(255, max(0, c + j))) for c, j in zip(COLORS[obj.color], jitter))
        cx, cy, r = obj.x * image_size, obj.y * image_size, obj.radius * image_size
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            s = r * 0.9
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=fill)
    if noise:
        pixels = np.asarray(image, dtype=np.int16) + noise_rng.integers(
            -noise, noise + 1, size=(image_size, image_size, 3), dtype=np.int16)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image


# ---------------------------------------------------------------------------------------------
# language helpers
# ---------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _plural(shape: str | None) -> str:
    return f"{shape}s" if shape else "shapes"


def _noun(color: str | None, shape: str | None, plural: bool) -> str:
    base = _plural(shape) if plural else (shape or "shape")
    return f"{color} {base}" if color else base


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _object_phrase(obj: SceneObject, with_size: bool = True) -> str:
    words = ([obj.size] if with_size else []) + [obj.color, obj.shape]
    return _with_article(" ".join(words))


def _count_phrase(count: int, color: str | None, shape: str | None) -> str:
    return f"{NUMBER_WORDS[count]} {_noun(color, shape, plural=count != 1)}"


# ---------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VQAQuestion:
    question: str
    answer: str
    question_type: str  # one of QUESTION_TYPES

    @property
    def answer_type(self) -> str:  # VQAv2's: yes/no, number, other
        return ANSWER_TYPES[self.question_type]


def vqa_candidates(scene: Scene) -> dict[str, list[VQAQuestion]]:
    """Every well-defined question about ``scene`` (referents unique), by question type."""
    out: dict[str, list[VQAQuestion]] = {t: [] for t in QUESTION_TYPES}
    yes_no = {True: "yes", False: "no"}
    for shape in SHAPES:
        if scene.count(shape=shape) == 1:
            out["color"].append(VQAQuestion(f"what color is the {shape}?", scene.find(shape=shape)[0].color, "color"))
        for size in SIZES:
            if scene.count(shape=shape, size=size) == 1:
                obj = scene.find(shape=shape, size=size)[0]
                out["color"].append(VQAQuestion(f"what color is the {size} {shape}?", obj.color, "color"))
    for color in COLOR_NAMES:
        if scene.count(color=color) == 1:
            out["shape"].append(VQAQuestion(f"what shape is the {color} object?", scene.find(color=color)[0].shape, "shape"))
        for size in SIZES:
            if scene.count(color=color, size=size) == 1:
                obj = scene.find(color=color, size=size)[0]
                out["shape"].append(VQAQuestion(f"what shape is the {size} {color} object?", obj.shape, "shape"))
    out["count"].append(VQAQuestion("how many shapes are there?", str(len(scene.objects)), "count"))
    for color in COLOR_NAMES:
        out["count"].append(VQAQuestion(f"how many {color} shapes are there?", str(scene.count(color=color)), "count"))
    for shape in SHAPES:
        out["count"].append(VQAQuestion(f"how many {_plural(shape)} are there?", str(scene.count(shape=shape)), "count"))
    for size in SIZES:
        out["count"].append(VQAQuestion(f"how many {size} shapes are there?", str(scene.count(size=size)), "count"))
    for color, shape in itertools.product(COLOR_NAMES, SHAPES):
        out["exist"].append(VQAQuestion(f"is there {_with_article(f'{color} {shape}')}?",
                                        yes_no[scene.count(color=color, shape=shape) > 0], "exist"))
    for shape in SHAPES:
        out["exist"].append(VQAQuestion(f"is there {_with_article(shape)}?", yes_no[scene.count(shape=shape) > 0], "exist"))
        for size in SIZES:
            out["exist"].append(VQAQuestion(f"is there {_with_article(f'{size} {shape}')}?",
                                            yes_no[scene.count(shape=shape, size=size) > 0], "exist"))
    for color in COLOR_NAMES:
        out["exist"].append(VQAQuestion(f"is there {_with_article(f'{color} shape')}?",
                                        yes_no[scene.count(color=color) > 0], "exist"))
    for a, b in itertools.permutations(scene.objects, 2):
        for rel in RELATIONS:
            if _visible(a, rel, b):
                text = f"is the {a.color} {a.shape} {RELATION_TEXT[rel]} the {b.color} {b.shape}?"
                out["relation"].append(VQAQuestion(text, yes_no[relation_holds(a, rel, b)], "relation"))
    return out


def vqa_questions(scene: Scene, rng: random.Random, k: int = 3) -> list[VQAQuestion]:
    """``k`` distinct questions about ``scene``: question types in a random order (each type once
    before any repeats), and within a type the answer drawn uniformly before the question."""
    candidates = vqa_candidates(scene)
    types = [t for t in QUESTION_TYPES if candidates[t]]
    rng.shuffle(types)
    chosen: list[VQAQuestion] = []
    while len(chosen) < k and types:
        for qtype in list(types):
            if len(chosen) == k:
                break
            remaining = [q for q in candidates[qtype] if q not in chosen]
            if not remaining:
                types.remove(qtype)
                continue
            answer = rng.choice(sorted({q.answer for q in remaining}))
            chosen.append(rng.choice([q for q in remaining if q.answer == answer]))
    return chosen


def _answer_pool(question_type: str) -> tuple[str, ...]:
    return {"color": COLOR_NAMES, "shape": SHAPES, "count": COUNT_ANSWERS}.get(question_type, ("yes", "no"))


def annotator_answers(question: VQAQuestion, rng: random.Random) -> tuple[str, ...]:
    """10 annotator answers: the true answer, except for 0-2 (weights 60/28/12 %) annotators who
    give a wrong answer of the same kind. So the true answer scores 1 and every wrong one at most 2/3."""
    answers = [question.answer] * ANNOTATORS
    wrong = [a for a in _answer_pool(question.question_type) if a != question.answer]
    n_noisy = rng.choices((0, 1, 2), weights=(60, 28, 12))[0]
    for i in rng.sample(range(ANNOTATORS), n_noisy):
        answers[i] = rng.choice(wrong)
    return tuple(answers)


@dataclass(frozen=True)
class VQAItem:
    split: str
    image_id: int  # 1-based image index; question_id = image_id * 1000 + question index
    question_id: int
    scene: Scene
    question: VQAQuestion
    answers: tuple[str, ...]  # the 10 annotator answers

    @property
    def answer_scores(self) -> dict[str, float]:
        from models.producer.datasets import vqa_soft_scores

        return vqa_soft_scores(self.answers, VQA_ANSWERS)


# ---------------------------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------------------------
NLVR2_TEMPLATES = ("compare", "both", "neither", "either", "exactly", "same", "relation")
_NOUN_SPECS = [(None, None)] + [(c, None) for c in COLOR_NAMES] + [(None, s) for s in SHAPES] + [
    (c, s) for c in COLOR_NAMES for s in SHAPES]


def _nlvr2_candidates(template: str, left: Scene, right: Scene, rng: random.Random) -> list[tuple[str, bool]]:
    """Every statement of ``template`` about the pair, with its truth value."""
    scenes = {"left": left, "right": right}
    other = {"left": "right", "right": "left"}
    out: list[tuple[str, bool]] = []
    if template == "compare":
        for color, shape in _NOUN_SPECS:
            noun = _noun(color, shape, plural=True)
            for side, word in itertools.product(("left", "right"), ("more", "fewer")):
                mine, theirs = scenes[side].count(color, shape), scenes[other[side]].count(color, shape)
                text = (f"the {side} image has {word} {noun} than the {other[side]} image" if rng.random() < 0.5
                        else f"there are {word} {noun} in the {side} image than in the {other[side]} image")
                out.append((text, mine > theirs if word == "more" else mine < theirs))
    elif template in ("both", "neither", "either"):
        for color, shape in _NOUN_SPECS[1:]:
            noun = _with_article(_noun(color, shape, plural=False))
            present = [s.count(color, shape) > 0 for s in (left, right)]
            if template == "both":
                out.append((f"both images contain {noun}", all(present)))
            elif template == "neither":
                out.append((f"neither image contains {noun}", not any(present)))
            else:
                out.append((f"at least one image contains {noun}", any(present)))
    elif template == "exactly":
        for (color, shape), side, k in itertools.product(_NOUN_SPECS, ("left", "right"), (1, 2, 3)):
            phrase = _count_phrase(k, color, shape)
            text = (f"there {'is' if k == 1 else 'are'} exactly {phrase} in the {side} image" if rng.random() < 0.5
                    else f"the {side} image contains exactly {phrase}")
            out.append((text, scenes[side].count(color, shape) == k))
    elif template == "same":
        for color, shape in _NOUN_SPECS:
            text = f"the two images contain the same number of {_noun(color, shape, plural=True)}"
            out.append((text, left.count(color, shape) == right.count(color, shape)))
    elif template == "relation":
        for side in ("left", "right"):
            for a, b in itertools.permutations(scenes[side].objects, 2):
                for rel in RELATIONS:
                    if _visible(a, rel, b):
                        text = (f"the {side} image has {_object_phrase(a, False)} {RELATION_TEXT[rel]} "
                                f"{_object_phrase(b, False)}")
                        out.append((text, relation_holds(a, rel, b)))
    else:
        raise ValueError(f"unknown NLVR2 template {template!r}")
    return out


@dataclass(frozen=True)
class NLVR2Item:
    split: str
    index: int  # statement index in the world; true iff even
    pair_index: int  # the image pair (statements_per_pair consecutive statements share one)
    left: Scene
    right: Scene
    statement: str
    label: bool
    template: str


def nlvr2_statement(left: Scene, right: Scene, target: bool, rng: random.Random,
                    exclude: Sequence[str] = ()) -> tuple[str, str] | None:
    """(template, statement) with truth value ``target`` for the pair (and not in ``exclude``), or None
    if no template has one. The template is uniform among those that have one."""
    templates = list(NLVR2_TEMPLATES)
    rng.shuffle(templates)
    for template in templates:
        matching = [text for text, label in _nlvr2_candidates(template, left, right, rng)
                    if label == target and text not in exclude]
        if matching:
            return template, rng.choice(matching)
    return None


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------
CAPTION_FAMILIES = ("listing", "left_to_right", "shape_count", "color_count", "relation")
_LISTING_PREFIXES = ("", "an image of ", "a picture of ")
_COUNT_PREFIXES = ("", "an image with ")


def _caption(family: str, scene: Scene, rng: random.Random) -> str | None:
    objects = list(scene.objects)
    if family == "listing":
        rng.shuffle(objects)
        with_size = rng.random() < 0.6
        return rng.choice(_LISTING_PREFIXES) + _join([_object_phrase(o, with_size) for o in objects])
    if family == "left_to_right":
        ordered = sorted(objects, key=lambda o: o.x)
        if len(ordered) < 2 or any(b.x - a.x < RELATION_MARGIN for a, b in zip(ordered, ordered[1:])):
            return None
        with_size = rng.random() < 0.5
        return "from left to right: " + _join([_object_phrase(o, with_size) for o in ordered])
    if family in ("shape_count", "color_count"):
        key = (lambda o: o.shape) if family == "shape_count" else (lambda o: o.color)
        counts = list(Counter(key(o) for o in objects).items())
        rng.shuffle(counts)
        phrases = [_count_phrase(c, None, v) if family == "shape_count" else _count_phrase(c, v, None)
                   for v, c in counts]
        return rng.choice(_COUNT_PREFIXES) + _join(phrases)
    if family == "relation":
        options = [(a, rel, b) for a, b in itertools.permutations(objects, 2) for rel in RELATIONS
                   if _visible(a, rel, b) and relation_holds(a, rel, b)]
        if not options:
            return None
        a, rel, b = rng.choice(options)
        return f"{_object_phrase(a, False)} {RELATION_TEXT[rel]} {_object_phrase(b, False)}"
    raise ValueError(f"unknown caption family {family!r}")


def scene_captions(scene: Scene, rng: random.Random, k: int = 5) -> list[str]:
    """``k`` captions true of ``scene`` (distinct where the scene allows), from varied families:
    listings of all objects (any order, with or without sizes), left-to-right listings, counts per
    shape or colour, and a visible relation between two objects."""
    families = list(CAPTION_FAMILIES)
    rng.shuffle(families)
    captions: list[str] = []
    attempts = 0
    while len(captions) < k and attempts < 40:
        family = families[attempts % len(families)]
        attempts += 1
        caption = _caption(family, scene, rng)
        if caption is not None and caption not in captions:
            captions.append(caption)
    while len(captions) < k:  # a very plain scene: repeat (Flickr30K always has k captions)
        captions.append(captions[len(captions) % max(1, len(captions))])
    return captions


@dataclass(frozen=True)
class HardNegative:
    caption: str
    object_index: int  # the changed object (for a relation: the relation's subject)
    attribute: str  # color, shape, size or relation
    old: str
    new: str


def hard_negatives(scene: Scene, rng: random.Random | None = None) -> list[HardNegative]:
    """Captions false for ``scene`` that differ from it in exactly one attribute of one object: a full
    listing (sizes included) with one object's colour, shape or size changed (never to a colour and
    shape another object has), and visible relations between two objects reversed. Objects are listed
    in scene order without a prefix, or in a random order and prefix when ``rng`` is given."""
    out: list[HardNegative] = []
    taken = {(o.color, o.shape) for o in scene.objects}
    for i, obj in enumerate(scene.objects):
        for attribute, values in (("color", COLOR_NAMES), ("shape", SHAPES), ("size", SIZES)):
            for value in values:
                if value == getattr(obj, attribute):
                    continue
                changed = replace(obj, **{attribute: value})
                if attribute != "size" and (changed.color, changed.shape) in taken:
                    continue
                objects = list(scene.objects)
                objects[i] = changed
                prefix = ""
                if rng is not None:
                    rng.shuffle(objects)
                    prefix = rng.choice(_LISTING_PREFIXES)
                caption = prefix + _join([_object_phrase(o) for o in objects])
                out.append(HardNegative(caption, i, attribute, getattr(obj, attribute), value))
    for (i, a), (j, b) in itertools.permutations(enumerate(scene.objects), 2):
        for rel in RELATIONS:
            if _visible(a, rel, b) and relation_holds(a, rel, b):
                wrong = RELATION_OPPOSITE[rel]
                caption = f"{_object_phrase(a, False)} {RELATION_TEXT[wrong]} {_object_phrase(b, False)}"
                out.append(HardNegative(caption, i, "relation", rel, wrong))
    return out


def hard_negative_captions(scene: Scene, k: int | None = None, rng: random.Random | None = None) -> list[str]:
    """Hard-negative captions for ``scene`` (see ``hard_negatives``): all of them, or ``k`` drawn with
    ``rng`` (default ``random.Random(0)``) when ``k`` is given."""
    negatives = [n.caption for n in hard_negatives(scene, rng)]
    if k is None or k >= len(negatives):
        return negatives
    return (rng or random.Random(0)).sample(negatives, k)


@dataclass(frozen=True)
class RetrievalItem:
    split: str
    index: int
    scene: Scene
    captions: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------------
_TEMPLATE_WORDS = (
    "a an the what color shape object is are there how many shapes left right of to above below "
    "image images has more fewer than in both contain contains neither at least exactly same number "
    "two from picture with and yes no"
)


def world_vocabulary() -> list[str]:
    """Every word a question, statement, caption or answer of the world can contain (sorted)."""
    words = set(_TEMPLATE_WORDS.split()) | set(COLOR_NAMES) | set(SHAPES) | set(SIZES) | set(NUMBER_WORDS)
    words |= {_plural(s) for s in SHAPES} | set(VQA_ANSWERS)
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# datasets in memory
# ---------------------------------------------------------------------------------------------
def split_assignment(count: int, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.1,
                     task: str = "") -> list[str]:
    """The split of each of ``count`` units: round(count * fraction) units each for val and test,
    chosen by a permutation drawn from ``seed``; the rest train."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val, test fractions and val + test < 1; got {val_fraction}, {test_fraction}")
    n_test, n_val = round(count * test_fraction), round(count * val_fraction)
    order = list(range(count))
    _rng(seed, task, "splits").shuffle(order)
    splits = ["train"] * count
    for i in order[:n_test]:
        splits[i] = "test"
    for i in order[n_test:n_test + n_val]:
        splits[i] = "val"
    return splits


def vqa_image(seed: int, image_index: int, k: int, config: WorldConfig = WorldConfig()
              ) -> tuple[Scene, list[tuple[VQAQuestion, tuple[str, ...]]]]:
    """VQA image ``image_index`` (0-based) of the world ``seed``: its scene and ``k`` questions with
    their annotator answers."""
    rng = _rng(seed, "vqa", image_index)
    scene = sample_scene(rng, config)
    questions = vqa_questions(scene, rng, k)
    if len(questions) < k:
        raise ValueError(f"only {len(questions)} distinct questions for a scene, {k} asked")
    return scene, [(q, annotator_answers(q, rng)) for q in questions]


def generate_vqa(n: int, seed: int, config: WorldConfig = WorldConfig(), val_fraction: float = 0.1,
                 test_fraction: float = 0.1, questions_per_image: int = 3) -> list[VQAItem]:
    """``n`` VQA questions on ceil(n / questions_per_image) images (the last may have fewer); splits by image."""
    if not 1 <= questions_per_image <= 10:
        raise ValueError(f"questions_per_image must be 1..10, got {questions_per_image}")
    n_images = math.ceil(n / questions_per_image)
    splits = split_assignment(n_images, seed, val_fraction, test_fraction, "vqa")
    items = []
    for i in range(n_images):
        k = min(questions_per_image, n - i * questions_per_image)
        scene, questions = vqa_image(seed, i, k, config)
        for j, (question, answers) in enumerate(questions):
            items.append(VQAItem(splits[i], i + 1, (i + 1) * 1000 + j, scene, question, answers))
    return items


def nlvr2_pair(seed: int, pair_index: int, statements: int = 2, first_index: int | None = None,
               config: WorldConfig = WorldConfig()) -> tuple[Scene, Scene, list[tuple[str, str, bool]]]:
    """Image pair ``pair_index`` of the world ``seed`` and ``statements`` distinct (template, statement,
    label) about it; statement j has global index ``first_index + j`` (default pair_index * statements)
    and is true iff that index is even, so consecutive statements alternate true and false."""
    rng = _rng(seed, "nlvr2", pair_index)
    first = pair_index * statements if first_index is None else first_index
    while True:
        left, right = sample_scene(rng, config), sample_scene(rng, config)
        made: list[tuple[str, str, bool]] = []
        for j in range(statements):
            target = (first + j) % 2 == 0
            found = nlvr2_statement(left, right, target, rng, exclude=[text for _, text, _ in made])
            if found is None:
                break
            made.append((found[0], found[1], target))
        if len(made) == statements:
            return left, right, made


def generate_nlvr2(n: int, seed: int, config: WorldConfig = WorldConfig(), val_fraction: float = 0.1,
                   test_fraction: float = 0.1, statements_per_pair: int = 2) -> list[NLVR2Item]:
    """``n`` statements on ceil(n / statements_per_pair) image pairs (as in NLVR2, several sentences
    share a pair; the last pair may have fewer); statement i is true iff i is even, so with the default
    2 per pair every pair has one true and one false statement. Splits by pair."""
    if not 1 <= statements_per_pair <= 10:
        raise ValueError(f"statements_per_pair must be 1..10, got {statements_per_pair}")
    n_pairs = math.ceil(n / statements_per_pair)
    splits = split_assignment(n_pairs, seed, val_fraction, test_fraction, "nlvr2")
    items = []
    for p in range(n_pairs):
        k = min(statements_per_pair, n - p * statements_per_pair)
        left, right, made = nlvr2_pair(seed, p, k, p * statements_per_pair, config)
        for j, (template, text, label) in enumerate(made):
            items.append(NLVR2Item(splits[p], p * statements_per_pair + j, p, left, right, text, label, template))
    return items


def retrieval_item(seed: int, index: int, split: str = "train", config: WorldConfig = WorldConfig(),
                   captions_per_image: int = 5) -> RetrievalItem:
    rng = _rng(seed, "retrieval", index)
    scene = sample_scene(rng, config)
    return RetrievalItem(split, index, scene, tuple(scene_captions(scene, rng, captions_per_image)))


def generate_retrieval(n: int, seed: int, config: WorldConfig = WorldConfig(), val_fraction: float = 0.1,
                       test_fraction: float = 0.1, captions_per_image: int = 5) -> list[RetrievalItem]:
    splits = split_assignment(n, seed, val_fraction, test_fraction, "retrieval")
    return [retrieval_item(seed, i, splits[i], config, captions_per_image) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# writing datasets to disk, in the real datasets' formats
# ---------------------------------------------------------------------------------------------
FORMATS = {"vqa": "VQAv2", "nlvr2": "NLVR2", "retrieval": "Flickr30K (Karpathy split)"}
SYNTH_JSON = "synth.json"  # written last: its presence means the data set is complete
SCENES_JSONL = "scenes.jsonl"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr)


def _save(image: Image.Image, path: Path) -> None:
    if path.suffix == ".png":
        image.save(path, compress_level=1)
    else:
        image.save(path, quality=92)


def _write_vqa(out: Path, items: list[VQAItem], seed: int, config: WorldConfig, progress: bool) -> dict[str, int]:
    from models.producer.datasets import vqa_files

    by_split: dict[str, list[VQAItem]] = {s: [] for s in ("train", "val", "test")}
    for item in items:
        by_split[item.split].append(item)
    vqa_files(out, "train").answer_vocab.write_text("\n".join(VQA_ANSWERS) + "\n")
    images = {item.image_id: item for item in items}
    counts = {}
    with (out / SCENES_JSONL).open("w") as scenes, _progress(len(images), "synth vqa", progress) as bar:
        for split, split_items in by_split.items():
            files = vqa_files(out, split)
            files.image_dir.mkdir(parents=True, exist_ok=True)
            info = {"description": "DAS Serve synthetic world (models/world.py)", "seed": seed,
                    "generator_version": GENERATOR_VERSION}
            questions = [{"question_id": it.question_id, "image_id": it.image_id, "question": it.question.question}
                         for it in split_items]
            annotations = [{
                "question_id": it.question_id, "image_id": it.image_id,
                "question_type": it.question.question_type, "answer_type": it.question.answer_type,
                "answers": [{"answer": a, "answer_confidence": "yes" if a == it.question.answer else "maybe",
                             "answer_id": k + 1} for k, a in enumerate(it.answers)],
                "multiple_choice_answer": Counter(it.answers).most_common(1)[0][0],
            } for it in split_items]
            files.questions.write_text(json.dumps({
                "info": info, "task_type": "Open-Ended", "data_type": "synthetic", "data_subtype": files.subtype,
                "license": {}, "questions": questions}))
            files.annotations.write_text(json.dumps({
                "info": info, "data_type": "synthetic", "data_subtype": files.subtype, "license": {},
                "annotations": annotations}))
            for image_id in sorted({it.image_id for it in split_items}):
                path = files.image_path(image_id)
                _save(render_scene(images[image_id].scene, config.image_size, config.noise), path)
                scenes.write(json.dumps({"image": path.relative_to(out).as_posix(), "split": split,
                                         "scene": images[image_id].scene.to_dict()}) + "\n")
                bar.update(1)
            counts[split] = len(split_items)
    return counts


def _write_nlvr2(out: Path, items: list[NLVR2Item], config: WorldConfig, progress: bool) -> dict[str, int]:
    from models.producer.datasets import nlvr2_files, nlvr2_image_names

    counts = {}
    first: dict[int, int] = {}  # pair -> its first statement's index
    for it in items:
        first.setdefault(it.pair_index, it.index)
    n_pairs = len(first)
    with (out / SCENES_JSONL).open("w") as scenes, _progress(2 * n_pairs, "synth nlvr2", progress) as bar:
        for split in ("train", "val", "test"):
            files = nlvr2_files(out, split)
            files.image_dir.mkdir(parents=True, exist_ok=True)
            split_items = [it for it in items if it.split == split]
            written: set[int] = set()
            with files.sentences.open("w") as fh:
                for it in split_items:
                    identifier = f"{files.name}-{it.pair_index}-0-{it.index - first[it.pair_index]}"
                    fh.write(json.dumps({"identifier": identifier, "sentence": it.statement,
                                         "label": "True" if it.label else "False", "template": it.template}) + "\n")
                    if it.pair_index in written:
                        continue
                    written.add(it.pair_index)
                    for name, scene in zip(nlvr2_image_names(identifier), (it.left, it.right)):
                        path = files.image_dir / name
                        _save(render_scene(scene, config.image_size, config.noise), path)
                        scenes.write(json.dumps({"image": path.relative_to(out).as_posix(), "split": split,
                                                 "scene": scene.to_dict()}) + "\n")
                        bar.update(1)
            counts[split] = len(split_items)
    return counts


def _write_retrieval(out: Path, items: list[RetrievalItem], config: WorldConfig, progress: bool) -> dict[str, int]:
    from models.producer.datasets import FLICKR30K_IMAGES, FLICKR30K_JSON

    image_dir = out / FLICKR30K_IMAGES
    image_dir.mkdir(parents=True, exist_ok=True)
    entries, sentid = [], 0
    with (out / SCENES_JSONL).open("w") as scenes, _progress(len(items), "synth retrieval", progress) as bar:
        for it in items:
            filename = f"{it.index:08d}.jpg"
            _save(render_scene(it.scene, config.image_size, config.noise), image_dir / filename)
            scenes.write(json.dumps({"image": f"{FLICKR30K_IMAGES}/{filename}", "split": it.split,
                                     "scene": it.scene.to_dict()}) + "\n")
            sentences = []
            for caption in it.captions:
                sentences.append({"raw": caption, "tokens": _words(caption), "imgid": it.index, "sentid": sentid})
                sentid += 1
            entries.append({"filename": filename, "imgid": it.index, "split": it.split,
                            "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
            bar.update(1)
    (out / FLICKR30K_JSON).write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return dict(Counter(it.split for it in items))


def synthesize(task: str, out: str | Path, n: int, seed: int = 0, config: WorldConfig | None = None, *,
               image_size: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
               questions_per_image: int = 3, statements_per_pair: int = 2, progress: bool = True,
               force: bool = False) -> dict:
    """Write ``n`` examples of ``task`` from the world ``seed`` under ``out`` in the real dataset's
    file format (see models/datasets.py), plus README.md, scenes.jsonl and, last, synth.json (so its
    presence means the data set is complete). ``image_size`` overrides ``config.image_size``.
    Refuses a non-empty ``out`` unless ``force``, or unless ``out`` holds an interrupted earlier run
    (scenes.jsonl but no synth.json), which is overwritten. Returns the synth.json content."""
    config = config or WorldConfig()
    if image_size is not None:
        config = replace(config, image_size=image_size)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    interrupted = (out / SCENES_JSONL).is_file() and not (out / SYNTH_JSON).is_file()
    if out.is_dir() and any(out.iterdir()) and not (force or interrupted):
        raise FileExistsError(f"{out} is not empty (use --force to write into it anyway)")
    out.mkdir(parents=True, exist_ok=True)
    if task == "vqa":
        items = generate_vqa(n, seed, config, val_fraction, test_fraction, questions_per_image)
        counts = _write_vqa(out, items, seed, config, progress)
        images = len({it.image_id for it in items})
    elif task == "nlvr2":
        items = generate_nlvr2(n, seed, config, val_fraction, test_fraction, statements_per_pair)
        counts = _write_nlvr2(out, items, config, progress)
        images = 2 * len({it.pair_index for it in items})
    else:
        items = generate_retrieval(n, seed, config, val_fraction, test_fraction)
        counts = _write_retrieval(out, items, config, progress)
        images = n
    counts = {s: counts.get(s, 0) for s in ("train", "val", "test")}
    unit = {"vqa": "questions", "nlvr2": "statements", "retrieval": "images (5 captions each)"}[task]
    meta = {
        "kind": "das-serve synthetic world", "generator": "models/world.py", "generator_version": GENERATOR_VERSION,
        "task": task, "format": FORMATS[task], "n": n, "unit": unit, "seed": seed, "images": images,
        "image_size": config.image_size, "objects": [config.min_objects, config.max_objects], "noise": config.noise,
        "val_fraction": val_fraction, "test_fraction": test_fraction, "splits": counts,
        "read_with": f"models.producer.datasets.read_task({task!r}, DIR, split)",
    }
    if task == "vqa":
        meta.update(questions_per_image=questions_per_image, answer_vocab=list(VQA_ANSWERS))
    if task == "nlvr2":
        meta.update(statements_per_pair=statements_per_pair)
    (out / "README.md").write_text(
        f"# Synthetic {task} data (DAS Serve world)\n\n"
        f"Made by `das data synth --task {task} --n {n} --seed {seed} --image-size {config.image_size}` "
        f"(models/world.py, generator version {GENERATOR_VERSION}): coloured shapes on a noisy grey background.\n"
        f"{n} {unit}; splits train {counts['train']}, val {counts['val']}, test {counts['test']}.\n\n"
        f"Files are in the {FORMATS[task]} format; read them with `{meta['read_with']}` "
        f"(the layout is described in models/datasets.py). `scenes.jsonl` gives the scene behind every image, "
        f"`synth.json` these facts as JSON.\n"
    )
    (out / SYNTH_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_scenes(root: str | Path) -> dict[str, Scene]:
    """The scenes of a synthesized dataset: relative image path -> Scene (from ``scenes.jsonl``)."""
    path = Path(root) / SCENES_JSONL
    if not path.is_file():
        raise FileNotFoundError(f"scene file not found: {path} (is {root} made by `das data synth`?)")
    scenes = {}
    with path.open() as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                scenes[record["image"]] = Scene.from_dict(record["scene"])
    return scenes


# ---------------------------------------------------------------------------------------------
# das data synth
# ---------------------------------------------------------------------------------------------
def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.1, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def cmd_data_synth(args: argparse.Namespace) -> int:
    try:
        config = WorldConfig(image_size=args.image_size, min_objects=args.min_objects,
                             max_objects=args.max_objects, noise=args.noise)
        meta = synthesize(args.task, args.out, args.n, args.seed, config, val_fraction=args.val_fraction,
                          test_fraction=args.test_fraction, questions_per_image=args.questions_per_image,
                          statements_per_pair=args.statements_per_pair,
                          progress=not args.quiet, force=args.force)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    splits = meta["splits"]
    print(f"wrote {meta['n']} {meta['unit']} of synthetic {meta['task']} ({meta['format']} format, "
          f"{meta['images']} images of {meta['image_size']} px) to {args.out}: train {splits['train']}, "
          f"val {splits['val']}, test {splits['test']}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `das data synth` to the `das` command line."""
    from models.cli.main import positive_int

    data = commands.add_parser("data", help="synthetic data sets",
                               description="Data sets for pre-training and for training DAS plans offline.")
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    synth = data_commands.add_parser(
        "synth", help="write a synthetic VQA / NLVR2 / retrieval data set",
        description=__doc__.split("\n", 1)[1].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_argument("--task", required=True, choices=TASKS, help="which task's data set to write")
    synth.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty or absent)")
    synth.add_argument("--n", type=positive_int, default=20000,
                       help="questions (vqa), statements (nlvr2) or images (retrieval); default 20000")
    synth.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    synth.add_argument("--image-size", type=positive_int, default=96, help="image side in pixels (default 96)")
    synth.add_argument("--val-fraction", type=_fraction, default=0.1, help="fraction of units in val (default 0.1)")
    synth.add_argument("--test-fraction", type=_fraction, default=0.1, help="fraction of units in test (default 0.1)")
    synth.add_argument("--questions-per-image", type=positive_int, default=3, help="vqa only (default 3, at most 10)")
    synth.add_argument("--statements-per-pair", type=positive_int, default=2,
                       help="nlvr2 only: statements sharing one image pair, alternately true and false "
                            "(default 2, at most 10)")
    synth.add_argument("--min-objects", type=positive_int, default=1, help="objects per scene, at least (default 1)")
    synth.add_argument("--max-objects", type=positive_int, default=4, help="objects per scene, at most (default 4)")
    synth.add_argument("--noise", type=int, default=8, help="pixel noise amplitude, 0-255 units (default 8)")
    synth.add_argument("--force", action="store_true", help="write into a non-empty directory")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=cmd_data_synth)

