"""What is said about scenes: VQA questions, NLVR2 statements, captions and hard negatives, and the
task examples (with their train/val/test splits) made from them. Every label follows from the Scene alone."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from models.producer.datasets import vqa_soft_scores
from models.producer.world.scenes import (
    COLOR_NAMES,
    NUMBER_WORDS,
    RELATION_MARGIN,
    RELATION_OPPOSITE,
    RELATION_TEXT,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    WorldConfig,
    relation_holds,
    relation_visible,
    sample_scene,
    seeded_rng,
)

QUESTION_TYPES = ("color", "shape", "count", "exist", "relation")
ANSWER_TYPES = {"color": "other", "shape": "other", "count": "number", "exist": "yes/no", "relation": "yes/no"}
COUNT_ANSWERS = tuple(str(i) for i in range(5))
VQA_ANSWERS: tuple[str, ...] = ("yes", "no") + COUNT_ANSWERS + COLOR_NAMES + SHAPES
ANNOTATORS = 10


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
            if relation_visible(a, rel, b):
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
                    if relation_visible(a, rel, b):
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


def _true_relations(objects: Sequence[SceneObject]) -> list[tuple[int, str, int]]:
    """(subject index, relation, object index) of every visible relation that holds, in a fixed order."""
    return [(i, rel, j) for (i, a), (j, b) in itertools.permutations(enumerate(objects), 2) for rel in RELATIONS
            if relation_visible(a, rel, b) and relation_holds(a, rel, b)]


def _relation_caption(a: SceneObject, relation: str, b: SceneObject) -> str:
    return f"{_object_phrase(a, False)} {RELATION_TEXT[relation]} {_object_phrase(b, False)}"


def _left_to_right(objects: Sequence[SceneObject]) -> list[SceneObject] | None:
    """The objects from left to right, or None when two neighbours are too close to tell apart."""
    ordered = sorted(objects, key=lambda o: o.x)
    if len(ordered) < 2 or any(b.x - a.x < RELATION_MARGIN for a, b in zip(ordered, ordered[1:])):
        return None
    return ordered


def _count_phrases(family: str, counts: Sequence[tuple[str, int]]) -> list[str]:
    """"two circles" (shape_count) or "two red shapes" (color_count) for each (value, count)."""
    return [_count_phrase(c, None, v) if family == "shape_count" else _count_phrase(c, v, None) for v, c in counts]


def _caption(family: str, scene: Scene, rng: random.Random) -> str | None:
    objects = list(scene.objects)
    if family == "listing":
        rng.shuffle(objects)
        with_size = rng.random() < 0.6
        return rng.choice(_LISTING_PREFIXES) + _join([_object_phrase(o, with_size) for o in objects])
    if family == "left_to_right":
        ordered = _left_to_right(objects)
        if ordered is None:
            return None
        with_size = rng.random() < 0.5
        return "from left to right: " + _join([_object_phrase(o, with_size) for o in ordered])
    if family in ("shape_count", "color_count"):
        key = (lambda o: o.shape) if family == "shape_count" else (lambda o: o.color)
        counts = list(Counter(key(o) for o in objects).items())
        rng.shuffle(counts)
        return rng.choice(_COUNT_PREFIXES) + _join(_count_phrases(family, counts))
    if family == "relation":
        options = _true_relations(objects)
        if not options:
            return None
        i, rel, j = rng.choice(options)
        return _relation_caption(objects[i], rel, objects[j])
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


def caption_variants(scene: Scene) -> frozenset[str]:
    """Every caption ``scene_captions`` can write for ``scene``: each family with every order, prefix,
    size choice and visible relation. A caption is true of a scene exactly when it is among them."""
    objects = list(scene.objects)
    out: set[str] = set()
    for order in itertools.permutations(objects):
        for with_size in (True, False):
            out.update(prefix + _join([_object_phrase(o, with_size) for o in order]) for prefix in _LISTING_PREFIXES)
    if (ordered := _left_to_right(objects)) is not None:
        out.update("from left to right: " + _join([_object_phrase(o, with_size) for o in ordered])
                   for with_size in (True, False))
    for family in ("shape_count", "color_count"):
        counts = Counter(o.shape if family == "shape_count" else o.color for o in objects).items()
        for order in itertools.permutations(counts):
            out.update(prefix + _join(_count_phrases(family, order)) for prefix in _COUNT_PREFIXES)
    out.update(_relation_caption(objects[i], rel, objects[j]) for i, rel, j in _true_relations(objects))
    return frozenset(out)


def true_pairs(captions: Sequence[str], scenes: Sequence[Scene]) -> list[list[bool]]:
    """``[i][j]``: caption j is true of scene i (any caption ``scene_captions`` could write for it)."""
    truth = [caption_variants(scene) for scene in scenes]
    return [[caption in true for caption in captions] for true in truth]


def retrieval_ceiling(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """The Recall@1 a model expects that scores every true image-caption pair alike (ties broken at random),
    on a gallery where caption i belongs to scene i: a caption true of k gallery scenes finds its own first
    with probability 1/k (IR), an image of which m gallery captions are true finds its own with 1/m (TR).
    Also the share of captions true of more than one scene."""
    if len(captions) != len(scenes) or not scenes:
        raise ValueError(f"need one caption per scene and at least one, got {len(captions)} and {len(scenes)}")
    truth = true_pairs(captions, scenes)
    n = len(scenes)
    if not all(truth[i][i] for i in range(n)):  # 1/k below assumes the own scene is among the k
        raise ValueError("a caption is not true of its own scene")
    images_per_caption = [sum(row[j] for row in truth) for j in range(n)]
    captions_per_image = [sum(row) for row in truth]
    return {"ir_r1": sum(1 / k for k in images_per_caption) / n, "tr_r1": sum(1 / m for m in captions_per_image) / n,
            "ambiguous_captions": sum(k > 1 for k in images_per_caption) / n}


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
    for i, rel, j in _true_relations(scene.objects):
        wrong = RELATION_OPPOSITE[rel]
        out.append(HardNegative(_relation_caption(scene.objects[i], wrong, scene.objects[j]), i, "relation", rel, wrong))
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
    seeded_rng(seed, task, "splits").shuffle(order)
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
    rng = seeded_rng(seed, "vqa", image_index)
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
    rng = seeded_rng(seed, "nlvr2", pair_index)
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
    rng = seeded_rng(seed, "retrieval", index)
    scene = sample_scene(rng, config)
    return RetrievalItem(split, index, scene, tuple(scene_captions(scene, rng, captions_per_image)))


def generate_retrieval(n: int, seed: int, config: WorldConfig = WorldConfig(), val_fraction: float = 0.1,
                       test_fraction: float = 0.1, captions_per_image: int = 5) -> list[RetrievalItem]:
    splits = split_assignment(n, seed, val_fraction, test_fraction, "retrieval")
    return [retrieval_item(seed, i, splits[i], config, captions_per_image) for i in range(n)]


