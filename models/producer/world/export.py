"""Writing the synthetic world's data sets to disk in the real data sets' formats (VQAv2, NLVR2,
Flickr30K Karpathy), and reading back the scene behind every image."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from models.producer.datasets import (
    FLICKR30K_IMAGES,
    FLICKR30K_JSON,
    nlvr2_files,
    nlvr2_image_names,
    vqa_files,
)
from models.producer.world.language import (
    VQA_ANSWERS,
    NLVR2Item,
    RetrievalItem,
    VQAItem,
    generate_nlvr2,
    generate_retrieval,
    generate_vqa,
)
from models.producer.world.scenes import Scene, WorldConfig, render_scene
from models.tasks import TASKS

GENERATOR_VERSION = 1


# ---------------------------------------------------------------------------------------------
# writing datasets to disk, in the real datasets' formats
# ---------------------------------------------------------------------------------------------
FORMATS = {"vqa": "VQAv2", "nlvr2": "NLVR2", "retrieval": "Flickr30K (Karpathy split)"}
SYNTH_JSON = "synth.json"  # written last: its presence means the data set is complete
SCENES_JSONL = "scenes.jsonl"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr)


def _save(image: Image.Image, path: Path) -> None:
    if path.suffix == ".png":
        image.save(path, compress_level=1)
    else:
        image.save(path, quality=92)


def _write_vqa(out: Path, items: list[VQAItem], seed: int, config: WorldConfig, progress: bool) -> dict[str, int]:
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
            info = {"description": "DAS Serve synthetic world (models/producer/world)", "seed": seed,
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
    file format (see models/producer/datasets.py), plus README.md, scenes.jsonl and, last, synth.json (so its
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
        "kind": "das-serve synthetic world", "generator": "models/producer/world", "generator_version": GENERATOR_VERSION,
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
        f"(models/producer/world, generator version {GENERATOR_VERSION}): coloured shapes on a noisy grey background.\n"
        f"{n} {unit}; splits train {counts['train']}, val {counts['val']}, test {counts['test']}.\n\n"
        f"Files are in the {FORMATS[task]} format; read them with `{meta['read_with']}` "
        f"(the layout is described in models/producer/datasets.py). `scenes.jsonl` gives the scene behind every image, "
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


