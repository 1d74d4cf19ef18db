"""What makes the embedded default competent and its evidence honest: MLM masks the world's content
words, the cost-aware search objective (reward-per-flop), random baselines at equal FLOPs, and VQA
scores per question type."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from models.backbones.base import load_backbone
from models.cli.main import build_parser
from models.das.plan import AdapterShapes
from models.producer.engine import RunError
from models.producer.evaluate import evaluate_plan_dir
from models.producer.pipeline import PipelineSettings, random_equal_cost_sets, store_settings
from models.producer.pretrain import FUNCTION_WORDS, content_token_mask, pretraining_pairs
from models.producer.bandit import sample_skip_set, update_gates
from models.producer.search import (
    OBJECTIVES,
    SearchConfig,
    das_search,
    layer_savings,
    select_within_budget,
    skip_set_for,
)
from models.producer.runs import TrainConfig
from models.producer.train import make_spec, task_data
from models.producer.world.export import synthesize
from models.producer.world.language import QUESTION_TYPES
from models.producer.world.scenes import SHAPES
from models.runtime import DASRuntime

REPO = Path(__file__).resolve().parent.parent
METER = REPO / "plans" / "meter" / "backbone"


@pytest.fixture(scope="module")
def world96(tmp_path_factory):
    root = tmp_path_factory.mktemp("world96")
    for seed, task in enumerate(("vqa", "retrieval")):
        synthesize(task, root / task, n=90, seed=seed, image_size=96, progress=False)
    return root


def test_mlm_may_mask_every_shape_and_colour_word_however_common(world96):
    """Frequent content words ("circle" is in ~45% of the world's captions) must stay maskable: a cut-off
    at 30% document frequency once left every singular shape unmasked, and the model never learnt shapes."""
    pairs = pretraining_pairs(world96 / "retrieval", [world96 / "vqa"])
    captions = [p.caption for p in pairs]
    tokenizer = load_backbone(REPO / "plans" / "backbone", device="cpu").processor.tokenizer
    maskable = content_token_mask(tokenizer, captions)
    share = {shape: sum(shape in c.split() for c in captions) / len(captions) for shape in SHAPES}
    assert max(share.values()) > 0.3, share  # the case the old cut-off got wrong
    for word in (*SHAPES, "red", "blue", "left", "above", "two", "one"):
        assert maskable[tokenizer.convert_tokens_to_ids(word)], f"{word!r} must be maskable"
    for word in ("a", "the", "of", "and", ",", "[CLS]", "[MASK]"):
        assert not maskable[tokenizer.convert_tokens_to_ids(word)], f"{word!r} must not be masked"
    assert {"a", "the", "of"} <= FUNCTION_WORDS


def test_equal_arm_costs_make_both_objectives_the_reference_rule():
    gates = [0.3, -0.1, 0.7, 0.2, -0.5, 0.6]
    savings = [0.1] * 6
    for k in (1, 2, 3):
        reference = sorted(sorted(range(6), key=lambda i: -gates[i])[:k])
        assert select_within_budget(gates, savings, k * 0.1) == reference
        search = {"objective": "reward-per-flop", "gates": gates, "savings": savings,
                  "ranking": sorted(range(6), key=lambda i: -gates[i])}
        assert skip_set_for(search, k) == reference == skip_set_for({**search, "objective": "reward"}, k)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # sampled sets: exactly k arms when every arm saves the same
        assert len(sample_skip_set(torch.tensor(gates), 2, generator, savings)) == 2


def test_reward_per_flop_picks_the_least_damage_per_flop_saved():
    gates = [0.5, 0.4, 0.45, 0.0]  # arm 3 is the most significant per arm...
    savings = [0.05, 0.05, 0.05, 0.40]  # ...but saves 8x what each of the others does
    budget = 2 * sum(savings) / len(savings)  # what 2 average arms save: 0.275
    chosen = select_within_budget(gates, savings, budget)
    assert sum(savings[i] for i in chosen) >= budget
    assert chosen == [3], "three cheap arms cannot reach the budget; the one costly arm can"
    # the reference rule ignores cost: the 2 largest gates save only 0.10
    assert sorted(sorted(range(4), key=lambda i: -gates[i])[:2]) == [0, 2]
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):  # every sampled set meets the budget, however many arms that takes
        drawn = sample_skip_set(torch.zeros(4), 2, generator, savings)
        assert sum(savings[i] for i in drawn) >= budget * (1 - 1e-9)
    with pytest.raises(ValueError, match="no set of arms"):
        select_within_budget(gates, savings, 2.0)


def test_random_baselines_save_the_same_flops_as_the_searched_set():
    savings = [0.02, 0.02, 0.02, 0.02, 0.06, 0.06, 0.06, 0.06]  # text-side vs image-side arms
    target = 0.06 + 0.06 + 0.02
    sets = random_equal_cost_sets(savings, target, 5, random.Random(0), exclude=[0, 4, 5])
    assert len(sets) == 5 and len({tuple(s) for s in sets}) == 5 and [0, 4, 5] not in sets
    for skip in sets:
        assert abs(sum(savings[i] for i in skip) - target) <= 0.05 * target + 1e-12, skip


def test_meter_arms_cost_unequally_and_the_cost_aware_search_meets_its_budget(world96):
    """On the shipped tiny METER an image-side fusion layer costs more than a text-side one, so the two
    objectives differ; a reward-per-flop search's skip set saves at least skip_num average arms."""
    backbone = load_backbone(METER, device="cpu")
    data = task_data("vqa", DASRuntime(backbone), world96 / "vqa", TrainConfig())
    spec = dataclasses.replace(make_spec(backbone, data, "probe", 1, [], TrainConfig()), adapters=AdapterShapes(16, 4))
    savings = layer_savings(backbone, spec)
    assert len(savings) == backbone.num_layers and all(s > 0 for s in savings)
    assert max(savings) > 1.5 * min(savings), savings
    config = SearchConfig(skip_num=2, update_every=1, warmup_fraction=0.2, objective="reward-per-flop",
                          train=TrainConfig(epochs=1, batch_size=8, skip_bottleneck=16, parallel_bottleneck=4,
                                            max_train_examples=48, max_eval_examples=16))
    result = das_search(backbone, "vqa", world96 / "vqa", config, progress=False)
    assert result.objective == "reward-per-flop" and result.savings == pytest.approx(savings, abs=1e-6)
    # against the unrounded savings (result.savings keeps 6 decimals): one text arm and one image arm
    # save exactly two average arms, which the rounded values can miss by 1e-7
    assert sum(savings[i] for i in result.skip_set) >= 2 * sum(savings) / len(savings) * (1 - 1e-9)
    assert result.to_json()["objective"] == "reward-per-flop"
    with pytest.raises(ValueError, match="objective"):
        das_search(backbone, "vqa", world96 / "vqa", SearchConfig(objective="fastest", train=config.train), progress=False)


def test_the_cli_offers_exactly_the_search_objectives():
    parser = build_parser()
    (search,) = [a for a in parser._subparsers._group_actions[0].choices["search"]._actions if a.dest == "objective"]
    assert tuple(search.choices) == OBJECTIVES and search.default == "reward"


def test_vqa_evaluation_reports_every_question_type(world96):
    backbone = load_backbone(REPO / "plans" / "backbone", device="cpu")
    result = evaluate_plan_dir(REPO / "plans" / "vqa" / "adapters", world96 / "vqa", backbone, "val", progress=False)
    groups = result["by_question_type"]
    assert set(groups) <= set(QUESTION_TYPES) and len(groups) >= 3
    assert sum(g["n"] for g in groups.values()) == result["n"]
    weighted = sum(g["vqa_score"] * g["n"] for g in groups.values()) / result["n"]
    assert weighted == pytest.approx(result["vqa_score"], abs=1e-9)
    for g in groups.values():
        assert g["interval"][0] <= g["vqa_score"] <= g["interval"][1]


def test_a_flops_budget_sets_what_every_set_saves(world96):
    backbone = load_backbone(METER, device="cpu")
    train = TrainConfig(epochs=1, batch_size=8, skip_bottleneck=16, parallel_bottleneck=4, max_train_examples=24,
                        max_eval_examples=8)
    config = SearchConfig(skip_num=2, update_every=1, warmup_fraction=0.2, objective="reward-per-flop",
                          flops_budget=0.3, train=train)
    result = das_search(backbone, "vqa", world96 / "vqa", config, progress=False)
    assert result.budget == 0.3 and sum(result.savings[i] for i in result.skip_set) >= 0.3 - 1e-6
    for bad, match in ((SearchConfig(flops_budget=0.3, train=train), "reward-per-flop"),
                       (SearchConfig(objective="reward-per-flop", flops_budget=5.0, train=train), "budget must be")):
        with pytest.raises(RunError, match=match):
            das_search(backbone, "vqa", world96 / "vqa", bad, progress=False)


def test_work_on_a_shipped_store_draws_data_at_its_backbone_image_size():
    """--remeasure and --compare-objectives regenerate data at the size the store's backbone was trained
    at, whatever today's recipe says (the tiny METER's store predates the 128 px recipe)."""
    backbone = load_backbone(METER, device="cpu")
    settings = store_settings(PipelineSettings.meter(), backbone)
    assert settings.image_size == backbone.config.image_size and settings.pretrain_images == 0
    assert PipelineSettings.meter().search_objective == "compare"


def test_gate_update_rewards_the_better_sets_arms():
    """REINFORCE with the round's mean as baseline: arms only in the better set rise, arms only in the
    worse one fall, an arm in both moves by the sum, and the step is lr * (r - mean) * p * (1 - p)."""
    gates = torch.zeros(4)
    mean = update_gates(gates, [{0, 1}, {1, 2}], [0.9, 0.5], lr=1.0)
    assert mean == pytest.approx(0.7)
    assert gates[0] == pytest.approx(0.2 * 0.25) and gates[2] == pytest.approx(-0.2 * 0.25)
    assert gates[1] == pytest.approx(0.0, abs=1e-7) and gates[3] == 0.0
