"""The synthetic world (models/language.py): determinism, and every label re-derived from the Scene.

The parsers below read the generated English back and evaluate it against the scene description
independently of the generator's own code paths.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import Counter

import numpy as np
import pytest

from models.producer.world import language, scenes
from models.producer.world.scenes import Scene, SceneObject, WorldConfig

COLORS = {"red", "green", "blue", "yellow", "purple", "orange"}
SHAPES = {"circle", "square", "triangle", "diamond"}
SIZES = {"small", "large"}
NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4}
REL = r"(to the left of|to the right of|above|below)"


# ---------------------------------------------------------------------------------------------
# an independent reading of the world's language
# ---------------------------------------------------------------------------------------------
def holds(a: SceneObject, rel: str, b: SceneObject) -> bool:
    return {"to the left of": a.x < b.x, "to the right of": a.x > b.x,
            "above": a.y < b.y, "below": a.y > b.y}[rel]


def visible(a: SceneObject, rel: str, b: SceneObject) -> bool:
    d = a.x - b.x if "left" in rel or "right" in rel else a.y - b.y
    return abs(d) >= 0.1


def noun_filter(words: list[str]) -> dict:
    """'large red circles' -> {'size': 'large', 'color': 'red', 'shape': 'circle'}; 'shapes' -> {}."""
    out = {}
    for word in words:
        if word in SIZES:
            out["size"] = word
        elif word in COLORS:
            out["color"] = word
        elif word.rstrip("s") in SHAPES:
            out["shape"] = word.rstrip("s")
        else:
            assert word in ("shape", "shapes", "object"), word
    return out


def matching(scene: Scene, **attrs) -> list[SceneObject]:
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]


def the(scene: Scene, **attrs) -> SceneObject:
    found = matching(scene, **attrs)
    assert len(found) == 1, f"'the' {attrs} is not unique in {scene}"
    return found[0]


def derive_vqa_answer(scene: Scene, question: str) -> str:
    if m := re.fullmatch(r"what color is the ((?:small |large )?\w+)\?", question):
        return the(scene, **noun_filter(m[1].split())).color
    if m := re.fullmatch(r"what shape is the ((?:small |large )?\w+) object\?", question):
        return the(scene, **noun_filter(m[1].split())).shape
    if m := re.fullmatch(r"how many ([\w ]+) are there\?", question):
        return str(len(matching(scene, **noun_filter(m[1].split()))))
    if m := re.fullmatch(rf"is the (\w+) (\w+) {REL} the (\w+) (\w+)\?", question):
        a, b = the(scene, color=m[1], shape=m[2]), the(scene, color=m[4], shape=m[5])
        assert visible(a, m[3], b)
        return "yes" if holds(a, m[3], b) else "no"
    if m := re.fullmatch(r"is there (a|an) ([\w ]+)\?", question):
        assert m[1] == ("an" if m[2][0] in "aeiou" else "a")
        return "yes" if matching(scene, **noun_filter(m[2].split())) else "no"
    raise AssertionError(f"unparsed question {question!r}")


def count(scene: Scene, noun: str) -> int:
    return len(matching(scene, **noun_filter(noun.split())))


def derive_nlvr2_label(left: Scene, right: Scene, statement: str) -> bool:
    sides = {"left": left, "right": right}
    if m := (re.fullmatch(r"the (left|right) image has (more|fewer) ([\w ]+) than the (left|right) image", statement)
             or re.fullmatch(r"there are (more|fewer) ([\w ]+) in the (left|right) image than in the (left|right) image",
                             statement)):
        if statement.startswith("the "):
            side, word, noun, other = m[1], m[2], m[3], m[4]
        else:
            word, noun, side, other = m[1], m[2], m[3], m[4]
        assert side != other
        mine, theirs = count(sides[side], noun), count(sides[other], noun)
        return mine > theirs if word == "more" else mine < theirs
    if m := re.fullmatch(r"both images contain an? ([\w ]+)", statement):
        return count(left, m[1]) > 0 and count(right, m[1]) > 0
    if m := re.fullmatch(r"neither image contains an? ([\w ]+)", statement):
        return count(left, m[1]) == 0 and count(right, m[1]) == 0
    if m := re.fullmatch(r"at least one image contains an? ([\w ]+)", statement):
        return count(left, m[1]) > 0 or count(right, m[1]) > 0
    if m := (re.fullmatch(r"there (?:is|are) exactly (one|two|three) ([\w ]+) in the (left|right) image", statement)
             or re.fullmatch(r"the (left|right) image contains exactly (one|two|three) ([\w ]+)", statement)):
        k, noun, side = (m[1], m[2], m[3]) if statement.startswith("there") else (m[2], m[3], m[1])
        return count(sides[side], noun) == NUMBERS[k]
    if m := re.fullmatch(r"the two images contain the same number of ([\w ]+)", statement):
        return count(left, m[1]) == count(right, m[1])
    if m := re.fullmatch(rf"the (left|right) image has an? (\w+) (\w+) {REL} an? (\w+) (\w+)", statement):
        scene = sides[m[1]]
        a, b = the(scene, color=m[2], shape=m[3]), the(scene, color=m[5], shape=m[6])
        assert visible(a, m[4], b)
        return holds(a, m[4], b)
    raise AssertionError(f"unparsed statement {statement!r}")


def split_list(body: str) -> list[str]:
    return re.split(r", | and ", body)


def object_phrase(phrase: str) -> tuple[str | None, str, str]:
    m = re.fullmatch(r"(a|an) (?:(small|large) )?(\w+) (\w+)", phrase)
    assert m, phrase
    assert m[3] in COLORS and m[4] in SHAPES, phrase
    assert m[1] == ("an" if (m[2] or m[3])[0] in "aeiou" else "a"), phrase
    return m[2], m[3], m[4]


def caption_true(scene: Scene, caption: str) -> bool:
    """Evaluates a caption (any family, or a hard negative) against the scene."""
    if m := re.fullmatch(rf"an? (\w+) (\w+) {REL} an? (\w+) (\w+)", caption):
        a, b = matching(scene, color=m[1], shape=m[2]), matching(scene, color=m[4], shape=m[5])
        return len(a) == 1 and len(b) == 1 and holds(a[0], m[3], b[0])
    if caption.startswith("from left to right: "):
        phrases = [object_phrase(p) for p in split_list(caption.removeprefix("from left to right: "))]
        ordered = sorted(scene.objects, key=lambda o: o.x)
        return len(phrases) == len(ordered) and all(
            (size in (None, o.size)) and color == o.color and shape == o.shape
            for (size, color, shape), o in zip(phrases, ordered))
    body = re.sub(r"^(an image with |an image of |a picture of )", "", caption)
    parts = split_list(body)
    if parts[0].split()[0] in NUMBERS:  # counts per shape or per colour, covering every object
        counted = 0
        for part in parts:
            number, *noun = part.split()
            k = count(scene, " ".join(noun))
            assert (noun[-1].endswith("s")) == (NUMBERS[number] != 1), part
            if k != NUMBERS[number]:
                return False
            counted += k
        return counted == len(scene.objects)
    phrases = [object_phrase(p) for p in parts]
    with_size = {p[0] is not None for p in phrases}
    assert len(with_size) == 1, caption  # all or none carry a size
    if with_size == {True}:
        return Counter(phrases) == Counter((o.size, o.color, o.shape) for o in scene.objects)
    return Counter(p[1:] for p in phrases) == Counter((o.color, o.shape) for o in scene.objects)


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vqa_items():
    return language.generate_vqa(600, seed=11)


@pytest.fixture(scope="module")
def nlvr2_items():
    return language.generate_nlvr2(600, seed=12)


@pytest.fixture(scope="module")
def retrieval_items():
    return language.generate_retrieval(200, seed=13)


# ---------------------------------------------------------------------------------------------
# scenes and rendering
# ---------------------------------------------------------------------------------------------
def test_scenes_are_valid():
    rng = random.Random(0)
    seen_sizes = Counter()
    for _ in range(300):
        scene = scenes.sample_scene(rng)
        assert 1 <= len(scene.objects) <= 4
        pairs = [(o.color, o.shape) for o in scene.objects]
        assert len(set(pairs)) == len(pairs)
        for o in scene.objects:
            assert o.color in COLORS and o.shape in SHAPES and o.size in SIZES
            r = scenes.SIZE_RADIUS[o.size]
            assert r <= o.x <= 1 - r and r <= o.y <= 1 - r
            seen_sizes[len(scene.objects)] += 1
        for a, b in itertools.combinations(scene.objects, 2):
            assert math.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius
        assert Scene.from_dict(scene.to_dict()) == scene
    assert set(seen_sizes) == {1, 2, 3, 4}
    config = WorldConfig(min_objects=3, max_objects=3)
    assert all(len(scenes.sample_scene(rng, config).objects) == 3 for _ in range(20))


def test_rendering_is_deterministic_and_shows_the_scene():
    scene = scenes.sample_scene(random.Random(5))
    a, b = scenes.render_scene(scene, 96), scenes.render_scene(scene, 96)
    assert a.size == (96, 96) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert scenes.render_scene(scene, 128).size == (128, 128)
    noiseless = np.asarray(scenes.render_scene(scene, 96, noise=0), dtype=int)
    assert not np.array_equal(np.asarray(a, dtype=int), noiseless)  # there is noise ...
    assert np.abs(np.asarray(a, dtype=int) - noiseless).max() <= 8  # ... and it is light
    for _ in range(30):
        scene = scenes.sample_scene(random.Random(_))
        pixels = np.asarray(scenes.render_scene(scene, 96), dtype=int)
        for o in scene.objects:  # the centre of each object has the object's colour
            centre = pixels[int(o.y * 96), int(o.x * 96)]
            assert np.abs(centre - np.array(scenes.COLORS[o.color])).max() <= 12 + 8, (o, centre)
        corner = pixels[0, 0]
        if all(math.hypot(o.x, o.y) > 2 * o.radius for o in scene.objects):
            assert np.abs(corner - np.array(scene.background)).max() <= 8


def test_patch_labels_follow_the_drawn_pixels():
    """Each patch is labelled with the shape (and colour) of the object whose drawn pixels cover the larger
    part of it (1 + its index in SHAPES, COLOR_NAMES), 0 for background: checked against the noiseless
    rendering itself."""
    grid, patch = 8, 16
    for seed in range(20):
        scene = scenes.sample_scene(random.Random(seed))
        objects = scenes.patch_objects(scene, grid, patch)
        labels, colors = scenes.patch_labels(scene, objects, "shape"), scenes.patch_labels(scene, objects, "color")
        assert ((labels == 0) == (colors == 0)).all() and ((objects == 0) == (labels == 0)).all()
        assert labels.shape == (grid * grid,) and labels.dtype == np.int64
        pixels = np.asarray(scenes.render_scene(scene, grid * patch, noise=0), dtype=int)
        drawn = np.abs(pixels - np.array(scene.background)).max(axis=-1) > 30
        cover = drawn.reshape(grid, patch, grid, patch).mean(axis=(1, 3)).reshape(-1)
        assert (labels[cover < 0.2] == 0).all()  # nearly empty patches are background
        # half covered: by one object, or at least a quarter by one of two
        assert (labels[cover >= 0.5] > 0).all()
        for obj in scene.objects:  # the patch under each object's centre carries its shape
            centre = int(obj.y * grid) * grid + int(obj.x * grid)
            if labels[centre]:
                assert scenes.SHAPES[labels[centre] - 1] == obj.shape
                assert scenes.COLOR_NAMES[colors[centre] - 1] == obj.color
        assert set(labels.tolist()) - {0} <= {1 + scenes.SHAPES.index(o.shape) for o in scene.objects}
        assert set(colors.tolist()) - {0} <= {1 + scenes.COLOR_NAMES.index(o.color) for o in scene.objects}
    square = Scene((SceneObject("square", "red", "large", 0.5, 0.5),), (100, 100, 100), 0)
    labels = scenes.patch_labels(square, scenes.patch_objects(square, 4, 16), "shape").reshape(4, 4)  # half-side 0.117 of 64 px: the centre
    assert labels[1:3, 1:3].tolist() == [[2, 2], [2, 2]] and labels[0].tolist() == [0, 0, 0, 0]


def test_generators_are_deterministic():
    assert language.generate_vqa(40, seed=3) == language.generate_vqa(40, seed=3)
    assert language.generate_nlvr2(40, seed=3) == language.generate_nlvr2(40, seed=3)
    assert language.generate_retrieval(20, seed=3) == language.generate_retrieval(20, seed=3)
    v3, v4 = language.generate_vqa(40, seed=3), language.generate_vqa(40, seed=4)
    assert [i.scene for i in v3] != [i.scene for i in v4]
    assert [i.question.question for i in v3] != [i.question.question for i in v4]
    assert [i.statement for i in language.generate_nlvr2(40, seed=3)] != [i.statement for i in language.generate_nlvr2(40, seed=4)]
    r3, r4 = language.generate_retrieval(20, seed=3), language.generate_retrieval(20, seed=4)
    assert [i.captions for i in r3] != [i.captions for i in r4]
    img3 = scenes.render_scene(r3[0].scene).tobytes()
    assert img3 == scenes.render_scene(language.generate_retrieval(20, seed=3)[0].scene).tobytes()
    assert img3 != scenes.render_scene(r4[0].scene).tobytes()
    # example i depends on (seed, i) only: a larger n extends a smaller one
    assert [i.scene for i in language.generate_retrieval(10, seed=3)] == [i.scene for i in r3[:10]]


def test_splits_follow_the_fractions_and_the_seed(vqa_items, nlvr2_items):
    splits = language.split_assignment(1000, seed=1, val_fraction=0.1, test_fraction=0.2)
    assert Counter(splits) == {"train": 700, "val": 100, "test": 200}
    assert splits == language.split_assignment(1000, seed=1, val_fraction=0.1, test_fraction=0.2)
    assert splits != language.split_assignment(1000, seed=2, val_fraction=0.1, test_fraction=0.2)
    with pytest.raises(ValueError):
        language.split_assignment(10, 0, 0.6, 0.5)
    by_image: dict[int, set[str]] = {}
    for item in vqa_items:  # an image's questions never straddle splits
        by_image.setdefault(item.image_id, set()).add(item.split)
    assert all(len(s) == 1 for s in by_image.values())
    assert Counter(next(iter(s)) for s in by_image.values()) == {"train": 160, "val": 20, "test": 20}
    by_pair: dict[int, set[str]] = {}
    for item in nlvr2_items:
        by_pair.setdefault(item.pair_index, set()).add(item.split)
    assert all(len(s) == 1 for s in by_pair.values())


# ---------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------
def test_vqa_answers_rederived_from_the_scene(vqa_items):
    assert len(vqa_items) == 600
    assert len({i.question_id for i in vqa_items}) == 600
    for item in vqa_items:
        derived = derive_vqa_answer(item.scene, item.question.question)
        assert derived == item.question.answer, item
        assert derived in language.VQA_ANSWERS
    per_image = Counter(i.image_id for i in vqa_items)
    assert set(per_image.values()) == {3}
    for image_id in per_image:  # distinct questions per image
        questions = [i.question.question for i in vqa_items if i.image_id == image_id]
        assert len(set(questions)) == len(questions)


def test_vqa_covers_every_question_type_and_balances_yes_no(vqa_items):
    types = Counter(i.question.question_type for i in vqa_items)
    assert set(types) == set(language.QUESTION_TYPES)
    assert min(types.values()) > 60
    answers = Counter(i.question.answer for i in vqa_items)
    assert abs(answers["yes"] - answers["no"]) < 0.15 * (answers["yes"] + answers["no"])
    assert {str(k) for k in range(5)} <= set(answers)
    assert set(language.VQA_ANSWERS) == {"yes", "no", *map(str, range(5)), *COLORS, *SHAPES}


def test_vqa_annotator_answers_are_noisy_but_mostly_true(vqa_items):
    noisy = 0
    for item in vqa_items:
        assert len(item.answers) == 10
        counts = Counter(item.answers)
        assert counts[item.question.answer] >= 8
        noisy += 10 - counts[item.question.answer]
        for answer in counts:  # wrong answers are of the same kind
            assert derive_answer_kind(answer) == derive_answer_kind(item.question.answer)
        scores = item.answer_scores
        assert scores == {a: min(1.0, c / 3) for a, c in counts.items()}
        assert scores[item.question.answer] == 1.0
        assert all(s < 1 for a, s in scores.items() if a != item.question.answer)
    assert 0.02 < noisy / (10 * len(vqa_items)) < 0.1


def derive_answer_kind(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else \
        "color" if answer in COLORS else "shape"


# ---------------------------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------------------------
def test_nlvr2_labels_rederived_from_the_scenes(nlvr2_items):
    for item in nlvr2_items:
        assert derive_nlvr2_label(item.left, item.right, item.statement) == item.label, item


def test_nlvr2_is_balanced(nlvr2_items):
    assert Counter(i.label for i in nlvr2_items) == {True: 300, False: 300}
    pairs: dict[int, list[bool]] = {}
    for item in nlvr2_items:
        pairs.setdefault(item.pair_index, []).append(item.label)
    assert all(sorted(labels) == [False, True] for labels in pairs.values())
    by_template = Counter((i.template, i.label) for i in nlvr2_items)
    for template in language.NLVR2_TEMPLATES:  # every template says both true and false things
        assert by_template[(template, True)] >= 10 and by_template[(template, False)] >= 10, by_template
    for split in ("train", "val", "test"):
        labels = [i.label for i in nlvr2_items if i.split == split]
        assert labels.count(True) == labels.count(False)
    odd = language.generate_nlvr2(7, seed=1, statements_per_pair=1)
    assert [i.label for i in odd] == [True, False, True, False, True, False, True]
    assert len({i.pair_index for i in odd}) == 7


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------
def test_captions_are_true_of_their_scene(retrieval_items):
    for item in retrieval_items:
        assert len(item.captions) == 5
        for caption in item.captions:
            assert caption_true(item.scene, caption), (caption, item.scene)
    distinct = [len(set(i.captions)) for i in retrieval_items]
    assert sum(d == 5 for d in distinct) / len(distinct) > 0.9


def test_captions_of_other_scenes_are_mostly_false(retrieval_items):
    false = total = 0
    for a, b in zip(retrieval_items, retrieval_items[1:]):
        for caption in a.captions:
            total += 1
            false += not caption_true(b.scene, caption)
    assert false / total > 0.8


def test_hard_negatives_change_exactly_one_attribute_and_are_false(retrieval_items):
    attributes = Counter()
    for item in retrieval_items[:80]:
        scene = item.scene
        negatives = language.hard_negatives(scene)
        assert negatives
        assert [n.caption for n in negatives] == language.hard_negative_captions(scene)
        for negative in negatives:
            attributes[negative.attribute] += 1
            assert not caption_true(scene, negative.caption), negative
            assert negative.caption not in item.captions
            if negative.attribute == "relation":
                m = re.fullmatch(rf"an? (\w+) (\w+) {REL} an? (\w+) (\w+)", negative.caption)
                a, b = the(scene, color=m[1], shape=m[2]), the(scene, color=m[4], shape=m[5])
                assert visible(a, m[3], b)
                opposite = {"to the left of": "to the right of", "to the right of": "to the left of",
                            "above": "below", "below": "above"}[m[3]]
                assert holds(a, opposite, b)  # the one change (the relation) made it false
                continue
            described = Counter(object_phrase(p) for p in split_list(negative.caption))
            actual = Counter((o.size, o.color, o.shape) for o in scene.objects)
            missing, extra = list((actual - described).elements()), list((described - actual).elements())
            assert len(missing) == 1 and len(extra) == 1, negative
            changed = [k for k, (u, v) in enumerate(zip(missing[0], extra[0])) if u != v]
            assert len(changed) == 1, negative
            assert ("size", "color", "shape")[changed[0]] == negative.attribute
            obj = scene.objects[negative.object_index]
            assert (obj.size, obj.color, obj.shape) == missing[0]
            assert getattr(obj, negative.attribute) == negative.old != negative.new
    assert set(attributes) == {"color", "shape", "size", "relation"}
    scene = retrieval_items[0].scene
    sampled = language.hard_negative_captions(scene, k=3, rng=random.Random(1))
    assert sampled == language.hard_negative_captions(scene, k=3, rng=random.Random(1))
    assert len(sampled) == 3
    assert all(not caption_true(scene, c) for c in sampled)


def test_caption_variants_are_the_captions_true_of_a_scene(retrieval_items):
    # caption_true (above) reads a caption; caption_variants enumerates what the world writes: they must agree
    for a, b in zip(retrieval_items[:60], retrieval_items[1:61]):
        own, other = language.caption_variants(a.scene), language.caption_variants(b.scene)
        assert set(a.captions) <= own
        for seed in range(5):  # every family, order and prefix the sampler draws
            assert set(language.scene_captions(a.scene, random.Random(seed))) <= own
        for caption in a.captions:
            assert (caption in other) == caption_true(b.scene, caption), (caption, b.scene)
        assert not own & set(language.hard_negative_captions(a.scene))


def test_retrieval_ceiling_counts_captions_true_of_several_images():
    red = Scene((SceneObject("circle", "red", "large", 0.5, 0.5),), (0, 0, 0), 0)
    blue = Scene((SceneObject("square", "blue", "small", 0.5, 0.5),), (0, 0, 0), 1)
    same_as_red = Scene(red.objects, (9, 9, 9), 2)  # another picture of the same scene
    assert language.retrieval_ceiling(["a large red circle", "a small blue square"], [red, blue]) == {
        "ir_r1": 1.0, "tr_r1": 1.0, "ambiguous_captions": 0.0}
    # both red captions are true of both red images: each finds its own first half the time
    ceiling = language.retrieval_ceiling(["a large red circle", "a red circle", "a small blue square"],
                                         [red, same_as_red, blue])
    assert ceiling["ir_r1"] == pytest.approx((0.5 + 0.5 + 1) / 3) and ceiling["tr_r1"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert ceiling["ambiguous_captions"] == pytest.approx(2 / 3)
    assert language.true_pairs(["a large red circle", "a red circle", "a small blue square"], [red, same_as_red, blue]) == [
        [True, True, False], [True, True, False], [False, False, True]]
    with pytest.raises(ValueError, match="not true of its own scene"):
        language.retrieval_ceiling(["a small blue square"], [red])
    with pytest.raises(ValueError, match="one caption per scene"):
        language.retrieval_ceiling(["a large red circle"], [red, blue])


# ---------------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------------
def test_world_vocabulary_covers_every_text(vqa_items, nlvr2_items, retrieval_items):
    vocab = language.world_vocabulary()
    assert vocab == sorted(set(vocab))
    assert all(re.fullmatch(r"[a-z0-9]+", w) for w in vocab)
    texts = [i.question.question for i in vqa_items] + list(language.VQA_ANSWERS)
    texts += [i.statement for i in nlvr2_items]
    for item in retrieval_items[:50]:
        texts += list(item.captions) + language.hard_negative_captions(item.scene, rng=random.Random(0))
    used = {w for t in texts for w in re.findall(r"[a-z0-9]+", t)}
    assert used <= set(vocab), used - set(vocab)
    assert len(set(vocab) - used) <= 3  # and holds little else

    from models.backbones.vilt.checkpoint import wordpiece_vocab

    pieces = set(wordpiece_vocab(vocab))
    assert set(vocab) <= pieces
