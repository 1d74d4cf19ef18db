"""Dataset readers (models/datasets.py) on tiny fixtures in the real formats, and the
`das data synth` round trip (write with the synthetic world, read back with read_task)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from models.producer.world import export, language
from models.producer.world.scenes import WorldConfig
from models.cli.main import main
from models.producer.datasets import (
    NLVR2Dataset,
    RetrievalDataset,
    VQADataset,
    read_flickr30k,
    read_nlvr2,
    read_task,
    read_vqa,
    vqa_soft_scores,
)


def tiny_image(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def answers(*pairs: tuple[str, int]) -> list[dict]:
    out = []
    for answer, times in pairs:
        out += [{"answer": answer, "answer_confidence": "yes"}] * times
    return [dict(a, answer_id=i + 1) for i, a in enumerate(out)]


# ---------------------------------------------------------------------------------------------
# VQAv2
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def vqa_root(tmp_path: Path) -> Path:
    root = tmp_path / "vqa"
    root.mkdir()
    (root / "answer_vocab.txt").write_text("yes\nno\n2\nred\n\n")
    questions = [
        {"image_id": 42, "question": "Is the cat red?", "question_id": 42000},
        {"image_id": 42, "question": "How many cats?", "question_id": 42001},
        {"image_id": 7, "question": "What is it?", "question_id": 7000},
    ]
    annotations = [
        {"question_id": 42000, "image_id": 42, "answer_type": "yes/no", "question_type": "is the",
         "multiple_choice_answer": "yes", "answers": answers(("yes", 8), ("no", 2))},
        {"question_id": 42001, "image_id": 42, "answer_type": "number", "question_type": "how many",
         "multiple_choice_answer": "2", "answers": answers(("2", 5), ("3", 4), ("two", 1))},
        {"question_id": 7000, "image_id": 7, "answer_type": "other", "question_type": "what is",
         "multiple_choice_answer": "zebra", "answers": answers(("zebra", 9), (" Red ", 1))},
    ]
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
        {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
         "license": {}, "questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(
        {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": annotations}))
    for image_id in (42, 7):
        tiny_image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    return root


def test_read_vqa_soft_scores_and_paths(vqa_root: Path):
    dataset = read_vqa(vqa_root, "val")
    assert isinstance(dataset, VQADataset)
    assert dataset.answer_vocab == ["yes", "no", "2", "red"]
    by_id = {e.question_id: e for e in dataset.examples}
    assert list(by_id) == ["42000", "42001", "7000"]
    assert by_id["42000"].answer_scores == {"yes": 1.0, "no": pytest.approx(2 / 3)}
    assert by_id["42000"].question == "Is the cat red?"
    assert by_id["42000"].answer_type == "yes/no"
    assert by_id["42001"].answer_scores == {"2": 1.0}  # "3" and "two" are not in the vocabulary
    assert by_id["7000"].answer_scores == {"red": pytest.approx(1 / 3)}  # normalised " Red "
    assert by_id["7000"].image_path == vqa_root / "val2014" / "COCO_val2014_000000000007.jpg"
    assert read_task("vqa", vqa_root, "val").examples == dataset.examples
    assert vqa_soft_scores(["a"] * 2 + ["b"] * 3 + ["c"] * 5) == {"a": pytest.approx(2 / 3), "b": 1.0, "c": 1.0}


def test_read_vqa_errors_name_the_missing_file(vqa_root: Path):
    with pytest.raises(FileNotFoundError, match="v2_OpenEnded_mscoco_train2014_questions.json"):
        read_vqa(vqa_root, "train")
    with pytest.raises(FileNotFoundError, match="v2_mscoco_test2014_annotations.json.*no public annotations"):
        (vqa_root / "v2_OpenEnded_mscoco_test2014_questions.json").write_text('{"questions": []}')
        read_vqa(vqa_root, "test")
    (vqa_root / "val2014" / "COCO_val2014_000000000007.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000007.jpg"):
        read_vqa(vqa_root, "val")
    assert len(read_vqa(vqa_root, "val", check_images=False).examples) == 3
    (vqa_root / "answer_vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="answer_vocab.txt"):
        read_vqa(vqa_root, "val")
    with pytest.raises(ValueError, match="unknown split"):
        read_vqa(vqa_root, "dev")
    with pytest.raises(ValueError, match="unknown task"):
        read_task("gqa", vqa_root, "val")


def test_read_vqa_rejects_inconsistent_files(vqa_root: Path):
    path = vqa_root / "v2_mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][:2]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no annotation for question_id 7000"):
        read_vqa(vqa_root, "val")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="v2_mscoco_val2014_annotations.json"):
        read_vqa(vqa_root, "val")


# ---------------------------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------------------------
def nlvr2_record(identifier: str, sentence: str, label: str, **extra) -> str:
    record = {"validation": {}, "sentence": sentence, "left_url": "http://x/l.jpg", "writer": "w1",
              "label": label, "right_url": "http://x/r.jpg", "synset": "n02", "query": "dogs",
              "identifier": identifier, "extra_validations": {}, **extra}
    return json.dumps(record)


@pytest.fixture
def nlvr2_root(tmp_path: Path) -> Path:
    root = tmp_path / "nlvr2"
    root.mkdir()
    (root / "dev.json").write_text("\n".join([
        nlvr2_record("dev-850-0-0", "There are two dogs.", "True"),
        nlvr2_record("dev-850-0-1", "There is one dog.", "False"),
        nlvr2_record("dev-851-2-0", "Both images show a cat.", "False"),
    ]) + "\n")
    for stem in ("dev-850-0", "dev-851-2"):
        tiny_image(root / "images" / "dev" / f"{stem}-img0.png")
        tiny_image(root / "images" / "dev" / f"{stem}-img1.png", (0, 0, 200))
    # the real training images sit in numbered sub-folders named by "directory"
    (root / "train.json").write_text(nlvr2_record("train-10171-0-0", "A dog.", "True", directory=98) + "\n")
    tiny_image(root / "images" / "train" / "98" / "train-10171-0-img0.png")
    tiny_image(root / "images" / "train" / "98" / "train-10171-0-img1.png")
    return root


def test_read_nlvr2(nlvr2_root: Path):
    dataset = read_nlvr2(nlvr2_root, "val")  # val reads dev
    assert isinstance(dataset, NLVR2Dataset)
    assert [(e.identifier, e.statement, e.label) for e in dataset.examples] == [
        ("dev-850-0-0", "There are two dogs.", True),
        ("dev-850-0-1", "There is one dog.", False),
        ("dev-851-2-0", "Both images show a cat.", False),
    ]
    first = dataset.examples[0]
    assert first.left_image_path == nlvr2_root / "images" / "dev" / "dev-850-0-img0.png"
    assert first.right_image_path == nlvr2_root / "images" / "dev" / "dev-850-0-img1.png"
    train = read_task("nlvr2", nlvr2_root, "train").examples
    assert train[0].left_image_path == nlvr2_root / "images" / "train" / "98" / "train-10171-0-img0.png"


def test_read_nlvr2_layouts_and_errors(nlvr2_root: Path):
    with pytest.raises(FileNotFoundError, match="test1.json"):
        read_nlvr2(nlvr2_root, "test")
    (nlvr2_root / "data").mkdir()
    (nlvr2_root / "dev.json").rename(nlvr2_root / "data" / "dev.json")  # the official repository's layout
    assert len(read_nlvr2(nlvr2_root, "val").examples) == 3
    (nlvr2_root / "images" / "dev" / "dev-851-2-img1.png").unlink()
    with pytest.raises(FileNotFoundError, match="dev-851-2-img1.png"):
        read_nlvr2(nlvr2_root, "val")
    (nlvr2_root / "data" / "dev.json").write_text(nlvr2_record("dev-850-0-0", "x", "maybe") + "\n")
    with pytest.raises(ValueError, match="line 1.*label"):
        read_nlvr2(nlvr2_root, "val")


# ---------------------------------------------------------------------------------------------
# Flickr30K (Karpathy split)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def flickr_root(tmp_path: Path) -> Path:
    root = tmp_path / "flickr"
    images = []
    for imgid, (filename, split) in enumerate([("1000092795.jpg", "train"), ("10002456.jpg", "restval"),
                                                ("1001773457.jpg", "val"), ("1007129816.jpg", "test")]):
        sentences = [{"tokens": ["a", "dog", str(k)], "raw": f"A dog number {k}.", "imgid": imgid,
                      "sentid": 5 * imgid + k} for k in range(5)]
        images.append({"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences,
                       "split": split, "filename": filename})
        tiny_image(root / "flickr30k-images" / filename)
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def test_read_flickr30k(flickr_root: Path):
    train = read_flickr30k(flickr_root, "train")
    assert isinstance(train, RetrievalDataset)
    assert [e.image_path.name for e in train.examples] == ["1000092795.jpg", "10002456.jpg"]  # + restval
    assert train.examples[0].image_id == "0"
    assert train.examples[0].captions == tuple(f"A dog number {k}." for k in range(5))
    assert [e.image_id for e in read_task("retrieval", flickr_root, "val").examples] == ["2"]
    assert [e.image_id for e in read_task("retrieval", flickr_root, "test").examples] == ["3"]


def test_read_flickr30k_errors(flickr_root: Path, tmp_path: Path):
    (flickr_root / "flickr30k-images" / "1007129816.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1007129816.jpg"):
        read_flickr30k(flickr_root, "test")
    assert len(read_flickr30k(flickr_root, "val").examples) == 1  # other splits unaffected
    with pytest.raises(FileNotFoundError, match="dataset_flickr30k.json"):
        read_flickr30k(tmp_path / "nowhere", "train")


# ---------------------------------------------------------------------------------------------
# das data synth round trip
# ---------------------------------------------------------------------------------------------
def synth(out: Path, task: str, n: int, seed: int, *extra: str) -> int:
    return main(["data", "synth", "--task", task, "--out", str(out), "--n", str(n), "--seed", str(seed),
                 "--image-size", "64", "--quiet", *extra])


def test_synth_vqa_round_trip(tmp_path: Path, capsys):
    out = tmp_path / "vqa"
    assert synth(out, "vqa", 25, 7, "--val-fraction", "0.2", "--test-fraction", "0.2") == 0
    assert "25 questions" in capsys.readouterr().out
    meta = json.loads((out / "synth.json").read_text())
    assert (meta["task"], meta["n"], meta["seed"], meta["image_size"]) == ("vqa", 25, 7, 64)
    assert (out / "README.md").is_file()
    items = language.generate_vqa(25, seed=7, config=WorldConfig(image_size=64), val_fraction=0.2,
                               test_fraction=0.2)
    scenes = export.load_scenes(out)
    total = 0
    for split in ("train", "val", "test"):
        dataset = read_task("vqa", out, split)
        expected = [i for i in items if i.split == split]
        assert len(dataset.examples) == len(expected) == meta["splits"][split]
        assert dataset.answer_vocab == list(language.VQA_ANSWERS)
        for example, item in zip(dataset.examples, expected):
            assert example.question_id == str(item.question_id)
            assert example.question == item.question.question
            assert example.answer_scores == item.answer_scores
            assert max(example.answer_scores, key=example.answer_scores.get) == item.question.answer
            assert example.answer_type == item.question.answer_type
            rel = example.image_path.relative_to(out).as_posix()
            assert scenes[rel] == item.scene
            with Image.open(example.image_path) as image:
                assert image.size == (64, 64)
        total += len(dataset.examples)
    assert total == 25
    # the same call writes the same bytes
    assert synth(tmp_path / "again", "vqa", 25, 7, "--val-fraction", "0.2", "--test-fraction", "0.2") == 0
    for name in ("v2_mscoco_train2014_annotations.json", "v2_OpenEnded_mscoco_val2014_questions.json",
                 "scenes.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    first = read_task("vqa", out, "train").examples[0].image_path
    assert first.read_bytes() == (tmp_path / "again" / first.relative_to(out)).read_bytes()


def test_synth_nlvr2_round_trip(tmp_path: Path):
    out = tmp_path / "nlvr2"
    assert synth(out, "nlvr2", 20, 3) == 0
    items = language.generate_nlvr2(20, seed=3)
    scenes = export.load_scenes(out)
    assert (out / "dev.json").is_file() and (out / "test1.json").is_file()
    read = []
    for split in ("train", "val", "test"):
        examples = read_task("nlvr2", out, split).examples
        expected = [i for i in items if i.split == split]
        assert len(examples) == len(expected)
        for example, item in zip(examples, expected):
            assert (example.statement, example.label) == (item.statement, item.label)
            assert scenes[example.left_image_path.relative_to(out).as_posix()] == item.left
            assert scenes[example.right_image_path.relative_to(out).as_posix()] == item.right
        read += examples
    assert len(read) == 20 and sum(e.label for e in read) == 10
    assert len(list((out / "images").rglob("*.png"))) == 20  # 10 pairs, 2 statements each


def test_synth_retrieval_round_trip_and_refusals(tmp_path: Path, capsys):
    out = tmp_path / "retrieval"
    assert synth(out, "retrieval", 12, 9, "--test-fraction", "0.25") == 0
    items = language.generate_retrieval(12, seed=9, val_fraction=0.1, test_fraction=0.25)
    scenes = export.load_scenes(out)
    counts = {}
    for split in ("train", "val", "test"):
        examples = read_task("retrieval", out, split).examples
        expected = [i for i in items if i.split == split]
        counts[split] = len(examples)
        assert [e.captions for e in examples] == [i.captions for i in expected]
        for example, item in zip(examples, expected):
            assert scenes[example.image_path.relative_to(out).as_posix()] == item.scene
            assert language.hard_negative_captions(item.scene)
    assert counts == {"train": 8, "val": 1, "test": 3}
    assert json.loads((out / "synth.json").read_text())["splits"] == counts
    capsys.readouterr()
    assert synth(out, "retrieval", 12, 9) == 2  # refuses a non-empty directory ...
    assert "not empty" in capsys.readouterr().err
    assert synth(out, "retrieval", 12, 9, "--force") == 0  # ... unless forced
    assert synth(tmp_path / "bad", "vqa", 10, 0, "--val-fraction", "0.5", "--test-fraction", "0.5") == 2
    with pytest.raises(SystemExit):
        synth(tmp_path / "bad2", "gqa", 10, 0)
