"""The generative producer (models/producer/generative.py, `das llava ...`) and the shipped tiny LLaVA
store (plans/llava/): a micro pipeline end to end writes a loadable backbone and valid plans that
answer through LlavaRuntime; the training inputs are exactly what generation feeds; the shipped store
loads, every plan answers, and its active plan is the one the val rule picks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from models.backbones.base import load_backbone
from models.backbones.llava.generation import LlavaRuntime
from models.cli.main import main
from models.das.plan import load_plan, read_plan_spec, validate_plan
from models.paths import REPO_ROOT
from models.producer import generative as g
from models.producer.world.language import vqa_image

SHIPPED = REPO_ROOT / "plans" / "llava"


@pytest.fixture(scope="module")
def micro_store(tmp_path_factory):
    """A micro pipeline run through the CLI: (store, work)."""
    root = tmp_path_factory.mktemp("llava-producer")
    store, work = root / "store", root / "work"
    assert main(["llava", "pipeline", "--micro", "--out", str(store), "--work", str(work), "--threads", "1"]) == 0
    return store, work


def test_micro_pipeline_writes_a_loadable_backbone_and_valid_plans(micro_store, capsys):
    store, work = micro_store
    backbone = load_backbone(store / "backbone", device="cpu")
    assert backbone.architecture == "llava" and backbone.num_layers == g.MICRO.layers
    state = json.loads((store / "store.json").read_text())
    assert state["loaded"]["vqa"] == ["adapters", "skip1", "skip2"]
    runtime = LlavaRuntime(backbone)
    scene, questions = vqa_image(7, 0, 2)
    from models.producer.world.scenes import render_scene

    image = render_scene(scene, g.MICRO.image_size)
    for name in state["loaded"]["vqa"]:
        plan_dir = store / "vqa" / name
        assert main(["plan", "validate", str(plan_dir), "--backbone", str(store / "backbone")]) == 0
        spec = validate_plan(plan_dir, backbone)
        assert spec.backbone.fingerprint == backbone.fingerprint and not spec.own_head
        assert len(spec.skipped_layers) == {"adapters": 0, "skip1": 1, "skip2": 2}[name]
        for key in ("vqa_exact", "vqa_exact_ci95", "flops_full", "flops_reduced", "trainable_params", "test"):
            assert key in spec.metrics
        plan = load_plan(plan_dir, backbone)
        answers = runtime.answer(plan, [image, image], [q.question for q, _ in questions], max_new_tokens=3)
        assert len(answers) == 2 and all(0 <= a.probability <= 1 for a in answers)
    assert state["active"]["vqa"] == g.choose_active(g.store_plans_from_metrics(store))
    results = (store / "RESULTS.md").read_text()
    assert re.search(r"\| skip2( \(active\))? \| \[", results) and "tokens/s" in results
    report = json.loads((work / "report.json").read_text())
    assert set(report["search"]) == {"1", "2"} and "speed" in report["plans"]["skip2"]
    capsys.readouterr()


def test_the_pipeline_resumes_without_redoing_its_steps(micro_store, capsys):
    store, work = micro_store
    before = {name: read_plan_spec(store / "vqa" / name).weights_sha256 for name in ("adapters", "skip1", "skip2")}
    assert main(["llava", "pipeline", "--micro", "--out", str(store), "--work", str(work), "--threads", "1",
                 "--stages", "pretrain,plans,eval,report"]) == 0
    after = {name: read_plan_spec(store / "vqa" / name).weights_sha256 for name in before}
    assert after == before
    capsys.readouterr()


def test_training_inputs_are_what_generation_feeds(micro_store):
    """A training row is the backbone's own preprocessing of the prompt (processor, chat template,
    image placeholders expanded, the same pixels) followed by the answer tokens and end-of-sequence,
    and each label sits one position before its token (where its logits predict it)."""
    store, _ = micro_store
    backbone = load_backbone(store / "backbone", device="cpu")
    data = g.build_examples(3, 4, ("train",), 3, 1, g.MICRO.image_size)["train"]
    encoder = g.Encoder(backbone)
    kinds = {e.kind for e in data.examples}
    assert "caption" in kinds and kinds - {"caption"}
    for index, example in enumerate(data.examples[:6]):
        reference = backbone.preprocess([data.pil(example.image)], [g.prompt_messages(backbone, example)])
        batch, labels = encoder.batch(data, [index])
        target = encoder.target_ids(example.target)
        assert batch.input_ids[0].tolist() == reference.input_ids[0].tolist() + target
        torch.testing.assert_close(batch.pixel_values, reference.pixel_values, atol=0, rtol=0)
        assert target[-1] == backbone.tokenizer.eos_token_id
        where = (labels[0] != g.IGNORE).nonzero()[:, 0]
        assert labels[0, where].tolist() == target == batch.input_ids[0, where + 1].tolist()
        assert backbone.tokenizer.decode(target[:-1]) == example.target


def test_teacher_forced_exact_match_is_greedy_decoding(micro_store):
    """Exact match from teacher-forced argmax (the training curve) equals generating the answer greedily."""
    store, _ = micro_store
    backbone = load_backbone(store / "backbone", device="cpu")
    plan = load_plan(store / "vqa" / "adapters", backbone)
    data = g.build_examples(5, 10, ("train",), 3, 0, g.MICRO.image_size)["train"]
    encoder = g.Encoder(backbone)
    with torch.no_grad():
        batch, labels = encoder.batch(data, range(len(data)))
        _, exact = g.answer_loss(backbone, plan.modules, batch, labels)
    answers = LlavaRuntime(backbone).answer(plan, [data.pil(e.image) for e in data.examples],
                                            [e.prompt for e in data.examples], max_new_tokens=4)
    generated = [a.text == e.target and a.completion.finish_reason == "stop" for a, e in zip(answers, data.examples)]
    assert exact.tolist() == generated


def test_choose_active_takes_the_cheapest_plan_within_97_percent():
    plans = {"adapters": {"val_accuracy": 0.80, "flops_reduced": 10.0},
             "skip2": {"val_accuracy": 0.78, "flops_reduced": 8.0},
             "skip4": {"val_accuracy": 0.77, "flops_reduced": 6.0}}
    assert g.choose_active(plans) == "skip2"  # 0.77 < 0.97 * 0.80 = 0.776
    plans["skip4"]["val_accuracy"] = 0.79
    assert g.choose_active(plans) == "skip4"


def test_llava_help_is_light(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["llava", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("pretrain", "train", "eval", "pipeline"):
        assert command in out


# ---------------------------------------------------------------------------------------------
# the shipped store
# ---------------------------------------------------------------------------------------------
shipped = pytest.mark.skipif(not (SHIPPED / "store.json").is_file(), reason="plans/llava/ not generated")


@shipped
def test_shipped_store_loads_and_every_plan_answers():
    backbone = load_backbone(SHIPPED / "backbone", device="cpu")
    state = json.loads((SHIPPED / "store.json").read_text())
    plans = state["loaded"]["vqa"]
    assert state["active"]["vqa"] in plans and len([p for p in plans if p.startswith("skip")]) >= 2
    runtime = LlavaRuntime(backbone)
    from models.producer.world.scenes import render_scene

    scene, questions = vqa_image(12345, 0, 3)  # a world seed no step trained or selected on
    image = render_scene(scene, backbone.config.image_size)
    for name in plans:
        plan = load_plan(SHIPPED / "vqa" / name, backbone)
        assert plan.spec.backbone.fingerprint == backbone.fingerprint
        answers = runtime.answer(plan, [image] * 3, [q.question for q, _ in questions])
        assert all(a.text and a.completion.finish_reason == "stop" for a in answers)
    skipping = [read_plan_spec(SHIPPED / "vqa" / name) for name in plans]
    assert len({len(s.skipped_layers) for s in skipping if s.skipped_layers}) >= 2  # at least two skip levels


@shipped
def test_shipped_active_plan_follows_the_val_rule():
    """Recomputed from the plans' own plan.json: the cheapest plan keeping 97 % of adapters-only's val accuracy."""
    metrics = g.store_plans_from_metrics(SHIPPED)
    state = json.loads((SHIPPED / "store.json").read_text())
    assert sorted(metrics) == sorted(state["loaded"]["vqa"])
    assert state["active"]["vqa"] == g.choose_active(metrics)
    for name in metrics:
        spec = read_plan_spec(SHIPPED / "vqa" / name)
        assert spec.metrics["eval_split"] == "val" and spec.metrics["eval_n"] >= 600
        assert spec.metrics["test"]["n"] >= 600


@shipped
def test_shipped_store_is_small():
    size = sum(f.stat().st_size for f in Path(SHIPPED).rglob("*") if f.is_file())
    assert size <= 6 * 1024 * 1024, f"plans/llava/ is {size / 1e6:.2f} MB"
    assert np.isfinite(json.loads((SHIPPED / "backbone" / "training.json").read_text())["curve"][-1]["val_loss"])
