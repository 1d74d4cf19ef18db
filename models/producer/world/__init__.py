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
formats of the real VQAv2 / NLVR2 / Flickr30K-Karpathy releases (``models/producer/datasets.py`` reads both),
plus ``DIR/synth.json`` and ``DIR/README.md`` (what it is) and ``DIR/scenes.jsonl`` (the scene of
every image, by relative path; ``load_scenes`` reads it, e.g. for hard negatives while training).
``--n`` counts questions for VQA, statements for NLVR2 and images for retrieval.
"""
