"""`das search`, `das train` and `das eval` on a generative backbone, as on ViLT and METER: the shipped tiny
LLaVA, a VQAv2-layout data set drawn by `das data synth`, plans that validate and are scored by their
generated answers (VQA soft score, n, interval, per question type)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.backbones.base import load_backbone
from models.cli.main import main
from models.das.plan import validate_plan
from models.producer.generative_plans import ImageTable, vqa_example_set
from models.producer.world.export import synthesize

REPO = Path(__file__).resolve().parent.parent
LLAVA = REPO / "plans" / "llava" / "backbone"
SMALL = ["--epochs", "1", "--batch-size", "8", "--max-train", "32", "--max-eval", "12", "--skip-bottleneck", "8",
         "--parallel-bottleneck", "4"]


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    synthesize("vqa", root, n=150, seed=3, image_size=96, progress=False)
    return root


def test_examples_come_from_the_vqav2_layout_and_decode_on_demand(vqa_data):
    data, examples = vqa_example_set(vqa_data, "train", 64, limit=20)
    assert len(data) == len(examples) == 20
    for item, example in zip(data.examples, examples):
        assert item.prompt == example.question and example.answer_scores[item.target] == 1.0
        assert item.kind in ("color", "shape", "count", "exist", "relation")
    assert isinstance(data.images, ImageTable) and len(data.images) <= 20  # 3 questions share an image
    assert data.images[[0, 1]].shape == (2, 64, 64, 3) and data.pil(0).size == (64, 64)


def test_train_eval_and_search_a_llava_plan_with_the_common_commands(vqa_data, tmp_path, capsys):
    plan_dir = tmp_path / "skip1"
    assert main(["train", "--backbone", str(LLAVA), "--task", "vqa", "--data", str(vqa_data), "--skip", "1",
                 "--out", str(plan_dir), "--name", "skip1", *SMALL]) == 0
    trained = json.loads(capsys.readouterr().out)
    backbone = load_backbone(LLAVA, device="cpu")
    spec = validate_plan(plan_dir, backbone)
    assert spec.skipped_layers == (1,) and spec.metrics["eval_split"] == "val" and spec.metrics["n"] == 12
    assert 0.0 <= spec.metrics["vqa_score"] <= 1.0 and len(spec.metrics["intervals"]["vqa_score"]) == 2
    assert spec.metrics["flops_reduced"] < spec.metrics["flops_full"]
    assert trained["metrics"]["vqa_score"] == spec.metrics["vqa_score"]

    assert main(["eval", str(plan_dir), "--backbone", str(LLAVA), "--data", str(vqa_data), "--split", "test",
                 "--max-eval", "12", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 12 and result["split"] == "test" and 0 < result["flops_saved_ratio"] < 1
    assert sum(g["n"] for g in result["by_question_type"].values()) == 12
    # the shipped plans are scored the same way (their store's backbone is found from the plan)
    assert main(["eval", str(REPO / "plans" / "llava" / "vqa" / "skip2"), "--data", str(vqa_data), "--split", "test",
                 "--max-eval", "12", "--json"]) == 0
    shipped = json.loads(capsys.readouterr().out)
    assert shipped["skipped_layers"] and 0.0 <= shipped["vqa_score"] <= 1.0

    assert main(["search", "--backbone", str(LLAVA), "--task", "vqa", "--data", str(vqa_data), "--skip-num", "2",
                 "--update-every", "1", "--out", str(tmp_path / "search"), *SMALL]) == 0
    found = json.loads((tmp_path / "search" / "search.json").read_text())
    assert len(found["skip_set"]) == 2 and sorted(found["ranking"]) == list(range(backbone.num_layers))
    assert any(abs(g) > 0 for g in found["gates"]), "the bandit never moved a gate"
    assert len(set(found["savings"])) == 1, "every decoder block costs the same"


def test_generative_backbones_refuse_other_tasks(vqa_data, tmp_path, capsys):
    assert main(["train", "--backbone", str(LLAVA), "--task", "nlvr2", "--data", str(vqa_data), "--out",
                 str(tmp_path / "p"), *SMALL]) == 2
    assert "serves vqa" in capsys.readouterr().err


def test_generative_training_refuses_the_options_it_cannot_honour(vqa_data, tmp_path, capsys):
    for extra, fragment in ((["--precision", "bf16"], "--precision"), (["--workers", "1"], "--workers"),
                            (["--checkpoint-every", "5"], "--checkpoint-every")):
        assert main(["train", "--backbone", str(LLAVA), "--task", "vqa", "--data", str(vqa_data), "--out",
                     str(tmp_path / "p"), *SMALL, *extra]) == 2
        assert fragment in capsys.readouterr().err
