"""Task datasets read from local files: VQAv2, NLVR2, Flickr30K (Karpathy split).

The synthetic world (``models/producer/world/``, ``das data synth``) writes its data in these same formats,
so one loader path serves both. Readers return plain example records; images are opened lazily by
path (a reader only checks that every image file exists, unless ``check_images=False``). Nothing is
downloaded: every file must already be on local disk, and a missing one is named in a
``FileNotFoundError``. Malformed files raise ``ValueError`` naming the file.

Splits are always ``train``, ``val`` or ``test``; how each maps onto the files of a dataset root:

VQAv2 (``read_vqa``), ``ROOT/``::

    v2_OpenEnded_mscoco_{sub}_questions.json   {"questions": [{"question_id", "image_id", "question"}]}
    v2_mscoco_{sub}_annotations.json           {"annotations": [{"question_id", "image_id",
                                                 "answers": [{"answer", "answer_confidence", "answer_id"}] x10,
                                                 "multiple_choice_answer", ...}]}
    {sub}/COCO_{sub}_{image_id:012d}.jpg       the images
    answer_vocab.txt                           the answer vocabulary, one answer per line (3,129 for the
                                               usual VQAv2 one); line order = the VQA head's label index

    with {sub} = train2014 for train, val2014 for val, test2014 for test. The real VQAv2 test split has
    no public annotations, so ``read_vqa(root, "test")`` works only where a
    ``v2_mscoco_test2014_annotations.json`` exists (the synthetic world writes one). A question's soft
    scores are ``min(1, count / 3)`` for each distinct answer among its 10 annotator answers, keeping
    only answers in the vocabulary (after lower-casing and collapsing white space); a question whose
    answers are all outside the vocabulary keeps an empty score dict (an all-zero target).

NLVR2 (``read_nlvr2``), ``ROOT/`` as the official release (github.com/lil-lab/nlvr, ``nlvr2/``)::

    {name}.json or data/{name}.json            JSON lines: {"identifier", "sentence", "label": "True"|"False", ...}
    images/{name}/[{directory}/]{stem}-img0.png, -img1.png   stem = identifier less its last "-part"

    with {name} = train for train, dev for val, test1 for test. The training images of the real
    release sit in numbered sub-folders given by each record's "directory"; a record without one
    (dev, test1, the synthetic world) has its images directly in images/{name}/.

Flickr30K, Karpathy split (``read_flickr30k``), ``ROOT/``::

    dataset_flickr30k.json                     {"images": [{"filename", "imgid", "split",
                                                 "sentences": [{"raw", "tokens", ...}], ...}]}
    flickr30k-images/{filename}                the images

    an image's "split" is train, val, test or restval; read split train returns train and restval
    images (the usual convention), val and test their own. One example per image, its captions the
    sentences' "raw" strings.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")

VQA_ANSWER_VOCAB = "answer_vocab.txt"
VQA_SUBTYPES = {"train": "train2014", "val": "val2014", "test": "test2014"}
NLVR2_SPLIT_NAMES = {"train": "train", "val": "dev", "test": "test1"}
FLICKR30K_JSON = "dataset_flickr30k.json"
FLICKR30K_IMAGES = "flickr30k-images"
FLICKR30K_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
VQA_ANNOTATORS = 10


@dataclass(frozen=True)
class VQAExample:
    question_id: str
    image_path: Path
    question: str
    answer_scores: dict[str, float] = field(default_factory=dict)  # answer -> soft score in [0, 1]
    answer_type: str = ""  # the annotation's "answer_type" (VQAv2: "yes/no", "number", "other"), if any
    question_type: str = ""  # the annotation's "question_type" (VQAv2: its first words; synthetic: color, shape, ...)


@dataclass(frozen=True)
class NLVR2Example:
    identifier: str
    left_image_path: Path
    right_image_path: Path
    statement: str
    label: bool


@dataclass(frozen=True)
class RetrievalExample:
    image_id: str
    image_path: Path
    captions: tuple[str, ...]


@dataclass
class VQADataset:
    examples: list[VQAExample]
    answer_vocab: list[str]  # index -> answer; the VQA head's label set


@dataclass
class NLVR2Dataset:
    examples: list[NLVR2Example]


@dataclass
class RetrievalDataset:
    examples: list[RetrievalExample]  # one per image, several captions each


# ---------------------------------------------------------------------------------------------
# file layout (shared with the synthetic writer in models/producer/world/export.py)
# ---------------------------------------------------------------------------------------------
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")


@dataclass(frozen=True)
class VQAFiles:
    questions: Path
    annotations: Path
    image_dir: Path
    answer_vocab: Path
    subtype: str  # e.g. "train2014"

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / vqa_image_name(self.subtype, image_id)


def vqa_image_name(subtype: str, image_id: int) -> str:
    return f"COCO_{subtype}_{int(image_id):012d}.jpg"


def vqa_files(root: str | Path, split: str) -> VQAFiles:
    """Where the VQAv2 files of ``split`` are under ``root`` (see the module docstring)."""
    _check_split(split)
    root, sub = Path(root), VQA_SUBTYPES[split]
    return VQAFiles(
        questions=root / f"v2_OpenEnded_mscoco_{sub}_questions.json",
        annotations=root / f"v2_mscoco_{sub}_annotations.json",
        image_dir=root / sub,
        answer_vocab=root / VQA_ANSWER_VOCAB,
        subtype=sub,
    )


@dataclass(frozen=True)
class NLVR2Files:
    sentences: Path  # the JSON-lines file
    image_dir: Path  # images/{name}
    name: str  # train, dev or test1


def nlvr2_files(root: str | Path, split: str) -> NLVR2Files:
    """Where the NLVR2 files of ``split`` are under ``root``: ``{name}.json``, else ``data/{name}.json``
    if only that exists (the official repository's layout)."""
    _check_split(split)
    root, name = Path(root), NLVR2_SPLIT_NAMES[split]
    sentences = root / f"{name}.json"
    if not sentences.is_file() and (root / "data" / f"{name}.json").is_file():
        sentences = root / "data" / f"{name}.json"
    return NLVR2Files(sentences=sentences, image_dir=root / "images" / name, name=name)


def nlvr2_image_names(identifier: str) -> tuple[str, str]:
    """The two image file names of an NLVR2 example: identifier "dev-850-0-3" -> dev-850-0-img0.png,
    dev-850-0-img1.png."""
    stem = identifier.rsplit("-", 1)[0]
    return f"{stem}-img0.png", f"{stem}-img1.png"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")


def _load_json(path: Path, what: str, key: str) -> list:
    _require_file(path, what)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{what} {path} has no {key!r} list")
    return data[key]


def _check_images_exist(paths: Iterable[Path], what: str) -> None:
    missing = [p for p in dict.fromkeys(paths) if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{what} image not found: {missing[0]}{more}")


def normalize_answer(answer: str) -> str:
    """Lower-case, strip, collapse white space. (Not the full VQA evaluation normalisation.)"""
    return re.sub(r"\s+", " ", str(answer).strip().lower())


def vqa_soft_scores(answers: Iterable[str], vocab: Iterable[str] | None = None) -> dict[str, float]:
    """VQAv2 soft scores: ``min(1, count / 3)`` per distinct (normalised) answer, restricted to
    ``vocab`` when given."""
    counts = Counter(normalize_answer(a) for a in answers)
    allowed = None if vocab is None else set(vocab)
    return {a: min(1.0, c / 3) for a, c in counts.items() if allowed is None or a in allowed}


def read_answer_vocab(path: str | Path) -> list[str]:
    """The VQA answer vocabulary: one answer per line (blank lines ignored), in label-index order."""
    path = Path(path)
    _require_file(path, "VQA answer vocabulary")
    answers = [normalize_answer(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not answers:
        raise ValueError(f"VQA answer vocabulary {path} is empty")
    duplicates = sorted(a for a, c in Counter(answers).items() if c > 1)
    if duplicates:
        raise ValueError(f"VQA answer vocabulary {path} repeats answers: {duplicates[:5]}")
    return answers


def _parse_label(value, path: Path, line_no: int) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{path} line {line_no}: label must be \"True\" or \"False\", got {value!r}")


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------
def read_vqa(
    root: str | Path, split: str, *, answer_vocab: str | Path | None = None, check_images: bool = True
) -> VQADataset:
    """VQAv2-format questions + annotations of ``split`` (see the module docstring for the files).
    ``answer_vocab`` overrides ``ROOT/answer_vocab.txt``."""
    files = vqa_files(root, split)
    vocab = read_answer_vocab(answer_vocab if answer_vocab is not None else files.answer_vocab)
    vocab_set = set(vocab)
    questions = _load_json(files.questions, f"VQAv2 {split} questions file", "questions")
    hint = " (the real VQAv2 test split has no public annotations)" if split == "test" else ""
    if not files.annotations.is_file():
        raise FileNotFoundError(f"VQAv2 {split} annotations file not found: {files.annotations}{hint}")
    annotations = _load_json(files.annotations, f"VQAv2 {split} annotations file", "annotations")
    _require_dir(files.image_dir, f"VQAv2 {split} image folder")
    try:
        by_question = {a["question_id"]: a for a in annotations}
    except (KeyError, TypeError):
        raise ValueError(f"{files.annotations}: every annotation needs a question_id") from None

    examples = []
    for q in questions:
        try:
            qid, image_id, text = q["question_id"], q["image_id"], q["question"]
        except (KeyError, TypeError):
            raise ValueError(f"{files.questions}: a question lacks question_id/image_id/question: {q!r}") from None
        ann = by_question.get(qid)
        if ann is None:
            raise ValueError(f"{files.annotations} has no annotation for question_id {qid}")
        if ann.get("image_id", image_id) != image_id:
            raise ValueError(f"question_id {qid}: image_id {image_id} in {files.questions.name} but "
                             f"{ann.get('image_id')} in {files.annotations.name}")
        try:
            answers = [a["answer"] for a in ann["answers"]]
        except (KeyError, TypeError):
            raise ValueError(f"{files.annotations}: question_id {qid} has no answers list of {{'answer': ...}}") from None
        examples.append(VQAExample(
            question_id=str(qid), image_path=files.image_path(image_id), question=text,
            answer_scores=vqa_soft_scores(answers, vocab_set), answer_type=str(ann.get("answer_type", "")),
            question_type=str(ann.get("question_type", "")),
        ))
    if check_images:
        _check_images_exist((e.image_path for e in examples), f"VQAv2 {split}")
    return VQADataset(examples=examples, answer_vocab=vocab)


def read_nlvr2(root: str | Path, split: str, *, check_images: bool = True) -> NLVR2Dataset:
    """NLVR2 statements of ``split`` (val reads ``dev``, test reads ``test1``) with their image pairs."""
    files = nlvr2_files(root, split)
    _require_file(files.sentences, f"NLVR2 {split} file")
    _require_dir(files.image_dir, f"NLVR2 {split} image folder")
    examples = []
    with files.sentences.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                identifier, sentence = str(record["identifier"]), record["sentence"]
                raw_label = record["label"]
            except json.JSONDecodeError as exc:
                raise ValueError(f"{files.sentences} line {line_no} is not valid JSON: {exc}") from None
            except (KeyError, TypeError):
                raise ValueError(f"{files.sentences} line {line_no}: needs identifier, sentence and label") from None
            label = _parse_label(raw_label, files.sentences, line_no)
            names = nlvr2_image_names(identifier)
            directory = record.get("directory")
            folders = ([files.image_dir / str(directory)] if directory is not None else []) + [files.image_dir]
            if check_images:
                found = next((d for d in folders if (d / names[0]).is_file() and (d / names[1]).is_file()), None)
                if found is None:
                    missing = next(folders[0] / n for n in names if not (folders[0] / n).is_file())
                    raise FileNotFoundError(f"NLVR2 {split} image not found: {missing} ({identifier})")
                folder = found
            else:
                folder = folders[0]
            examples.append(NLVR2Example(identifier, folder / names[0], folder / names[1], sentence, label))
    return NLVR2Dataset(examples=examples)


def read_flickr30k(root: str | Path, split: str, *, check_images: bool = True) -> RetrievalDataset:
    """Flickr30K images of ``split`` from the Karpathy split file (train includes restval)."""
    _check_split(split)
    root = Path(root)
    json_path, image_dir = root / FLICKR30K_JSON, root / FLICKR30K_IMAGES
    images = _load_json(json_path, "Flickr30K Karpathy split file", "images")
    _require_dir(image_dir, "Flickr30K image folder")
    wanted = FLICKR30K_SPLITS[split]
    examples = []
    for entry in images:
        try:
            if entry["split"] not in wanted:
                continue
            filename = entry["filename"]
            captions = tuple(s["raw"] for s in entry["sentences"])
        except (KeyError, TypeError):
            raise ValueError(f"{json_path}: an image lacks filename/split/sentences[].raw: "
                             f"{str(entry)[:200]}") from None
        image_id = str(entry["imgid"]) if "imgid" in entry else Path(filename).stem
        examples.append(RetrievalExample(image_id=image_id, image_path=image_dir / filename, captions=captions))
    if check_images:
        _check_images_exist((e.image_path for e in examples), f"Flickr30K {split}")
    return RetrievalDataset(examples=examples)


def read_task(task: str, root: str | Path, split: str) -> VQADataset | NLVR2Dataset | RetrievalDataset:
    """Dispatch on the task name: vqa -> read_vqa, nlvr2 -> read_nlvr2, retrieval -> read_flickr30k."""
    readers = {"vqa": read_vqa, "nlvr2": read_nlvr2, "retrieval": read_flickr30k}
    if task not in readers:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(readers)})")
    return readers[task](root, split)
