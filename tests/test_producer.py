"""The plan producer: DAS search, adapter training, evaluation, the --quick pipeline, shipped plans."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from models.backbones.base import load_backbone
from models.cli.main import main
from models.das.plan import load_plan, read_plan_spec, validate_plan
from models.producer.pipeline import PipelineSettings, run_pipeline
from models.producer.pretrain import pretraining_pairs
from models.producer.search import SearchConfig, das_search, write_search_outputs
from models.producer.runs import TrainConfig
from models.producer.train import train_plan, true_match_hits
from models.producer.world.export import synthesize
from models.producer.world.language import hard_negative_captions

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "plans"


@pytest.fixture(scope="module")
def world(tmp_path_factory, checkpoints):
    """Micro synthetic data for every task, and a tiny backbone with a retrieval (ITM) head."""
    root = tmp_path_factory.mktemp("world")
    for seed, task in enumerate(("vqa", "nlvr2", "retrieval")):
        synthesize(task, root / task, n=64, seed=seed, image_size=64, progress=False)
    return root, load_backbone(checkpoints["retrieval"][0], device="cpu"), checkpoints["retrieval"][0]


def test_search_moves_gates_and_training_lowers_the_loss(world, tmp_path):
    root, backbone, _ = world
    config = SearchConfig(skip_num=1, update_every=1, warmup_fraction=0.2, gate_lr=5.0,
                          train=TrainConfig(epochs=4, batch_size=8, lr=3e-3, skip_bottleneck=8, parallel_bottleneck=4))
    result = das_search(backbone, "vqa", root / "vqa", config, progress=False)
    assert any(abs(g) > 1e-6 for g in result.gates), "the bandit never updated a gate"
    assert len(result.gate_log) > 2
    assert sorted(result.ranking) == list(range(backbone.num_layers))
    assert result.skip_set == sorted(result.ranking[:1])
    files = write_search_outputs(result, tmp_path / "search")
    assert json.loads(files["json"].read_text())["skip_set"] == result.skip_set
    assert files["png"].stat().st_size > 1000 and files["csv"].read_text().startswith("step,")

    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    trained = train_plan(backbone, "vqa", root / "vqa", result.skip_set,
                         TrainConfig(epochs=6, batch_size=8, lr=3e-3, skip_bottleneck=8, parallel_bottleneck=4),
                         out_dir=tmp_path / "plan", name="micro", progress=False)
    first, last = sum(trained.losses[:3]) / 3, sum(trained.losses[-3:]) / 3
    assert last < first, trained.losses
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items()), "the backbone must stay frozen"
    spec = validate_plan(tmp_path / "plan", backbone)
    assert spec.skipped_layers == tuple(result.skip_set)
    assert {"vqa_score", "flops_full", "flops_reduced", "trainable_params", "reference_input"} <= set(spec.metrics)
    assert spec.metrics["flops_reduced"] < spec.metrics["flops_full"]
    plan = load_plan(tmp_path / "plan", backbone)
    assert any(p.abs().sum() > 0 for p in plan.modules.parameters())


def test_pretraining_pairs_take_only_train_images_of_every_task(world):
    root, _, _ = world
    pairs = pretraining_pairs(root / "retrieval", [root / "vqa", root / "nlvr2"], captions_per_scene=3)
    splits = {}
    for task in ("vqa", "nlvr2", "retrieval"):
        for line in (root / task / "scenes.jsonl").read_text().splitlines():
            record = json.loads(line)
            splits[(root / task / record["image"]).resolve()] = record["split"]
    by_task = {task: [p for p in pairs if root / task in p.image_path.parents] for task in ("vqa", "nlvr2", "retrieval")}
    assert all(by_task.values()), {t: len(v) for t, v in by_task.items()}
    assert {splits[p.image_path.resolve()] for p in pairs} == {"train"}, "val/test images must not be pre-trained on"
    for pair in pairs:  # every pair knows its scene, so half of the ITM negatives can be hard ones
        assert pair.scene is not None and pair.caption not in hard_negative_captions(pair.scene)
    again = pretraining_pairs(root / "retrieval", [root / "vqa", root / "nlvr2"], captions_per_scene=3)
    assert [(p.image_path, p.caption) for p in again] == [(p.image_path, p.caption) for p in pairs]


def test_true_match_hits_count_any_true_pair_at_the_top():
    # images 0 and 1 show the same scene, so captions 0 and 1 are true of both; caption 2 only of image 2
    truth = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    scores = torch.tensor([[0.1, 0.9, 0.0],   # [image, caption]
                           [0.8, 0.2, 0.0],
                           [0.7, 0.0, 0.5]])
    ir, tr = true_match_hits(scores, truth)
    # caption 0 ranks image 1 first (true, not its own), caption 1 image 0 (true), caption 2 image 2 (own)
    assert ir.tolist() == [True, True, True]
    # image 0 ranks caption 1 first (true), image 1 caption 0 (true), image 2 caption 0 (false)
    assert tr.tolist() == [True, True, False]


@pytest.mark.parametrize("task, keys", [
    ("nlvr2", {"accuracy"}),
    ("retrieval", {"ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "ir_true_r1", "tr_true_r1"}),
])
def test_train_and_eval_cli(world, tmp_path, capsys, task, keys):
    root, backbone, backbone_dir = world
    plan_dir = tmp_path / task
    assert main(["train", "--backbone", str(backbone_dir), "--task", task, "--data", str(root / task),
                 "--skip", "1", "--epochs", "1", "--batch-size", "8", "--skip-bottleneck", "8",
                 "--parallel-bottleneck", "4", "--out", str(plan_dir), "--name", "cli"]) == 0
    capsys.readouterr()
    assert main(["eval", str(plan_dir), "--data", str(root / task), "--backbone", str(backbone_dir),
                 "--split", "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert keys <= set(result)
    assert all(0.0 <= result[k] <= 1.0 for k in keys)
    assert 0 < result["flops_reduced"] < result["flops_full"]
    if task == "retrieval":  # the pair a caption was written for is one of its true pairs
        assert result["ir_true_r1"] >= result["ir_r1"] and result["tr_true_r1"] >= result["tr_r1"]


def test_quick_pipeline_writes_a_servable_store(tmp_path, capsys):
    out, work = tmp_path / "plans", tmp_path / "work"
    assert main(["pipeline", "--quick", "--quiet", "--out", str(out), "--work", str(work)]) == 0
    table = capsys.readouterr().out
    assert "| vqa | skip1 |" in table and "Search vs random" in table
    backbone = load_backbone(out / "backbone", device="cpu")
    state = json.loads((out / "store.json").read_text())
    for task in ("vqa", "nlvr2", "retrieval"):
        for name in ("adapters", "skip1", "skip2"):
            spec = validate_plan(out / task / name, backbone)
            assert spec.metrics["trainable_params"] > 0
            if name != "adapters":  # --quick narrows VQA's skip2 (skip_bottleneck_by_plan), nothing else
                assert spec.adapters.skip_bottleneck == (8 if (task, name) == ("vqa", "skip2") else 16)
        assert state["active"][task] in state["loaded"][task]
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "RESULTS.md").is_file()
    report = json.loads((out / "pipeline-report.json").read_text())
    vs_random = report["tasks"]["vqa"]["search_vs_random"]
    assert len(vs_random["random"]) == 3
    assert len(vs_random["searched_interval"]) == 2 and all(len(r["interval"]) == 2 for r in vs_random["random"])
    for row in vs_random["random"]:  # random sets at (nearly) the searched set's FLOPs saving
        assert abs(row["flops_saved"] - vs_random["searched_flops_saved"]) <= 0.05 * vs_random["searched_flops_saved"] + 1e-4
    results = (out / "RESULTS.md").read_text()
    assert "VQA score per question type" in results and "| adapters |" in results
    ceiling = report["tasks"]["retrieval"]["ceiling"]  # what a perfect model could score on the galleries
    assert set(ceiling) == {"val", "test"}
    assert all(0 < c["ir_r1"] <= 1 and 0 < c["tr_r1"] <= 1 and 0 <= c["ambiguous_captions"] <= 1 for c in ceiling.values())
    assert f"val IR {ceiling['val']['ir_r1']:.3f}" in results
    retrieval_test = report["tasks"]["retrieval"]["plans"]["adapters"]
    assert retrieval_test["ir_true_r1"] >= retrieval_test["ir_r1"] and "ir_true_r1" in retrieval_test["val"]
    assert "Retrieval R@1 counting any true match" in results and f"{retrieval_test['ir_true_r1']:.3f}" in results
    assert set(report["tasks"]["vqa"]["plans"]["adapters"]["by_question_type"]) <= {"color", "shape", "count", "exist", "relation"}
    for figure in ("gates.png", "pretrain.png"):
        assert (out / figure).stat().st_size > 1000 and f"]({figure})" in results
    pretrain = json.loads((work / "pretrain.json").read_text())
    assert len(pretrain["curve"]["step"]) == len(pretrain["curve"]["mlm_loss"]) >= 2

    # resuming with another skip adapter width for one plan trains that plan again, and only it, and
    # evaluates it again (the cached test evaluation is keyed by the weights' digest)
    weights = {p: p.stat().st_mtime_ns for p in out.rglob("weights.safetensors")}
    evaluations = {p: p.stat().st_mtime_ns for p in (work / "eval").rglob("*.json")}
    settings = dataclasses.replace(PipelineSettings.quick(), skip_bottleneck_by_plan={"vqa": {"skip2": 4}})
    run_pipeline(out, work, settings, progress=False, log=lambda *args: None)
    assert {p for p, t in weights.items() if p.stat().st_mtime_ns != t} == {out / "vqa" / "skip2" / "weights.safetensors"}
    assert {p for p, t in evaluations.items() if p.stat().st_mtime_ns != t} == {work / "eval" / "vqa" / "skip2.json"}
    retrained = validate_plan(out / "vqa" / "skip2", backbone)
    assert retrained.adapters.skip_bottleneck == 4
    assert json.loads((work / "eval" / "vqa" / "skip2.json").read_text())["weights_sha256"] == retrained.weights_sha256


def test_pipeline_image_patch_and_precision_options_reach_the_backbone(tmp_path, capsys):
    """`das pipeline --image-size 32 --patch-size 8 --conv-stem 8,8,8 --precision bf16 --pretrain-epochs 2
    --patch-color-weight 1`: the data and the pre-trained backbone (a 4 x 4 patch grid) follow them, the pre-training runs in bf16
    for 2 epochs with patch colours, the plans validate; a patch size that does not divide is refused, and
    so is resuming into this store with another pre-training recipe."""
    out, work = tmp_path / "plans", tmp_path / "work"
    options = ["--image-size", "32", "--patch-size", "8", "--precision", "bf16"]
    assert main(["pipeline", "--quick", "--quiet", *options, "--out", str(out), "--work", str(work)]) == 2
    assert "give --conv-stem widths for this patch size" in capsys.readouterr().err  # the recipe's makes 16 px
    options += ["--conv-stem", "8,8,8"]
    assert main(["pipeline", "--quick", "--quiet", *options, "--pretrain-epochs", "2", "--patch-color-weight", "1",
                 "--out", str(out), "--work", str(work)]) == 0
    backbone = load_backbone(out / "backbone", device="cpu")
    assert (backbone.config.image_size, backbone.config.patch_size) == (32, 8)
    assert backbone.config.conv_stem_channels == [8, 8, 8]
    assert json.loads((work / "data" / "vqa" / "synth.json").read_text())["image_size"] == 32
    pretrained = torch.load(work / "pretrain.ckpt" / "last.pt", map_location="cpu", weights_only=False)
    run = pretrained["run"]
    assert run["precision"] == "bf16" and run["patch_color_weight"] == 1
    assert run["total_steps"] == math.ceil(2 * run["examples"] / run["batch_size"])
    assert len(pretrained["extra"]["history"]["patch_color_accuracy"]) == run["total_steps"]
    for task in ("vqa", "nlvr2", "retrieval"):
        validate_plan(out / task / "adapters", backbone)
    capsys.readouterr()
    assert main(["pipeline", "--quick", "--quiet", "--patch-size", "12", "--out", str(tmp_path / "bad"),
                 "--work", str(work)]) == 2
    assert "does not divide" in capsys.readouterr().err
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["pipeline", "--quick", "--quiet", *options, "--conv-stem", "none", "--resume",
                 "--out", str(out), "--work", str(work)]) == 2
    err = capsys.readouterr().err
    assert "pre-trained with other settings" in err and "conv_stem_channels" in err and "--force" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched


def test_quick_meter_pipeline_pretrains_and_writes_a_servable_store(tmp_path, capsys):
    """`das pipeline --arch meter`: a METER pre-trained from scratch (ITM + MLM), searched with its own
    arms (both streams' fusion layers), plans that validate against it and not against a ViLT."""
    out, work = tmp_path / "meter", tmp_path / "work"
    assert main(["pipeline", "--arch", "meter", "--quick", "--quiet", "--out", str(out), "--work", str(work)]) == 0
    table = capsys.readouterr().out
    assert "| vqa | skip2 |" in table
    backbone = load_backbone(out / "backbone", device="cpu")
    assert backbone.architecture == "meter" and backbone.num_layers == 4  # 2 fusion layers per stream
    assert "retrieval" in backbone.task_heads(), "the ITM head must be saved as METER's retrieval head"
    pretrain = json.loads((work / "pretrain.json").read_text())
    assert {"itm_loss", "mlm_loss", "itm_accuracy"} <= set(pretrain)
    # the ViLT's recipe: a convolutional stem in the vision encoder, patch shape and colour objectives
    assert backbone.config.vision_stem_channels == (8, 8, 8, 8)
    assert {"patch_accuracy", "patch_color_accuracy"} <= set(pretrain)
    vilt = load_backbone(SHIPPED / "backbone", device="cpu")
    for task in ("vqa", "nlvr2", "retrieval"):
        for name in ("adapters", "skip2"):
            spec = validate_plan(out / task / name, backbone)
            # adapters alone add a little; skipping 2 of 4 arms must save more than that
            assert 0 < spec.metrics["flops_reduced"] < spec.metrics["flops_full"] or name == "adapters"
            with pytest.raises(Exception, match="(?i)fingerprint|backbone"):
                validate_plan(out / task / name, vilt)
    results = (out / "RESULTS.md").read_text()
    assert "tiny METER" in results and "Search objectives at equal FLOPs saved" in results
    report = json.loads((out / "pipeline-report.json").read_text())
    for task in ("vqa", "nlvr2", "retrieval"):  # both objectives ran; the better on val made the plans
        comparison = report["tasks"][task]["objectives"]
        assert comparison["chosen"] in ("reward", "reward-per-flop")
        assert report["tasks"][task]["search"]["objective"] == comparison["chosen"]
        # at equal cost: the cost-aware set saves at least what the reference set does
        assert comparison["reward-per-flop"]["flops_saved"] >= comparison["target_flops_saved"] - 1e-4
        assert (work / "search" / task / "reward-per-flop" / "search.json").is_file()
    capsys.readouterr()
    # the comparison alone, on the finished store (its searches and trainings come from the work cache)
    assert main(["pipeline", "--arch", "meter", "--quick", "--quiet", "--compare-objectives", "--out", str(out),
                 "--work", str(work)]) == 0
    printed = capsys.readouterr().out
    assert "| vqa |" in printed and "reward-per-flop" in printed
    again = json.loads((work / "objectives.json").read_text())
    assert again["vqa"]["chosen"] == report["tasks"]["vqa"]["objectives"]["chosen"]


SHIPPED_PLANS = sorted(p.parent for p in SHIPPED.glob("*/*/plan.json"))


def test_shipped_plans_validate_against_the_shipped_backbone():
    assert (SHIPPED / "backbone" / "config.json").is_file(), "the embedded default backbone is missing"
    backbone = load_backbone(SHIPPED / "backbone", device="cpu")
    tasks = {read_plan_spec(p).task for p in SHIPPED_PLANS}
    assert tasks == {"vqa", "nlvr2", "retrieval"}
    for plan_dir in SHIPPED_PLANS:
        validate_plan(plan_dir, backbone)
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 40 * 1024 * 1024, f"shipped plans and backbone take {size} bytes"


def test_the_shipped_tiny_meter_and_its_plans():
    """plans/meter/: the tiny METER (DAS_BACKBONE=plans/meter/backbone), a plan per task and skip level
    that validates against it, and a store whose active plans are loaded ones."""
    meter_store = SHIPPED / "meter"
    backbone = load_backbone(meter_store / "backbone", device="cpu")
    assert backbone.architecture == "meter" and backbone.num_layers == 12
    state = json.loads((meter_store / "store.json").read_text())
    plan_dirs = sorted(p.parent for p in meter_store.glob("*/*/plan.json"))
    assert {read_plan_spec(p).task for p in plan_dirs} == {"vqa", "nlvr2", "retrieval"}
    for plan_dir in plan_dirs:
        spec = validate_plan(plan_dir, backbone)
        assert plan_dir.name in state["loaded"][spec.task]
        if spec.skipped_layers:
            # plans are named for how many arms they skip (skipN)
            assert plan_dir.name == f"skip{len(spec.skipped_layers)}"
            assert spec.metrics["flops_reduced"] < spec.metrics["flops_full"]
    for task, name in state["active"].items():
        assert name in state["loaded"][task]
