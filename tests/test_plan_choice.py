"""Choosing a plan by cost: the FLOPs-budget rule and the load-adaptive ladder (pure functions), and
the registry that feeds them each loaded plan's FLOPs ratio and score, and its store.json settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from models.das.plan import AdapterShapes, BackboneRef, PlanSpec, save_plan
from models.tasks import primary_score
from service.adaptive import AdaptiveSettings
from service.errors import RegistryError
from service.policy import PlanCost, check_flops_budget, cheaper_ladder, choose_within_budget
from service.registry import ADAPTIVE_ERROR_KEY, PlanRegistry
from service.store import STATE_FILE, PlanStore

COSTS = [
    PlanCost("full", 1.0, None),
    PlanCost("adapters", 1.04, 0.52),
    PlanCost("skip2", 0.81, 0.51),
    PlanCost("skip4", 0.58, 0.50),
    PlanCost("skip4b", 0.55, 0.50),  # as good as skip4 and cheaper
    PlanCost("skip6", 0.35, None),  # no metrics
]


# -- the budget rule -------------------------------------------------------------------------------
@pytest.mark.parametrize("budget, expected", [
    (1.0, "skip2"),  # adapters (1.04) does not fit; skip2 is the most accurate that does
    (0.81, "skip2"),  # the boundary fits
    (0.8, "skip4b"),  # skip4 and skip4b tie on score: the cheaper one
    (0.56, "skip4b"),
    (0.5, "skip6"),  # only a plan without metrics fits: it still serves
])
def test_most_accurate_plan_within_the_budget(budget, expected):
    assert choose_within_budget("vqa", COSTS, budget).name == expected


def test_plans_without_metrics_rank_last():
    costs = [PlanCost("full", 1.0, None), PlanCost("skip2", 0.8, 0.1)]
    assert choose_within_budget("vqa", costs, 1.0).name == "skip2"
    assert choose_within_budget("vqa", [PlanCost("b", 0.9, None), PlanCost("a", 0.5, None)], 1.0).name == "a"


def test_no_plan_fits_names_the_cheapest_ratio():
    with pytest.raises(RegistryError) as error:
        choose_within_budget("vqa", COSTS, 0.3)
    assert error.value.status == 422
    assert "max_flops_ratio=0.3" in str(error.value) and "skip6 at 0.35" in str(error.value)
    with pytest.raises(RegistryError) as error:
        choose_within_budget("vqa", [], 0.3)
    assert error.value.status == 422 and "no plan is loaded" in str(error.value)


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.0001, 2, math.nan, math.inf, -math.inf, True, "0.5"])
def test_out_of_range_budgets_are_400(value):
    with pytest.raises(RegistryError) as error:
        check_flops_budget(value)
    assert error.value.status == 400 and "0 < max_flops_ratio <= 1" in str(error.value)


def test_valid_budgets_pass():
    assert check_flops_budget(None) is None
    assert check_flops_budget(1) == 1.0 and check_flops_budget(1e-9) == 1e-9


# -- the ladder --------------------------------------------------------------------------------------
def test_ladder_is_the_active_plan_then_strictly_cheaper_ones_dearest_first():
    assert cheaper_ladder(COSTS, "adapters") == ["adapters", "full", "skip2", "skip4", "skip4b", "skip6"]
    assert cheaper_ladder(COSTS, "skip2") == ["skip2", "skip4", "skip4b", "skip6"]
    assert cheaper_ladder(COSTS, "skip6") == ["skip6"]
    assert cheaper_ladder(COSTS, "adapters", allowed=("skip4", "skip2", "missing")) == ["adapters", "skip2", "skip4"]
    tied = [PlanCost("a", 0.5, 0.2), PlanCost("b", 0.5, 0.3)]
    assert cheaper_ladder(tied, "a") == ["a"]  # an equally costly plan is no step down


# -- the registry feeds them --------------------------------------------------------------------------
def save(store: Path, backbone, name: str, skipped=(), metrics=None, task: str = "vqa") -> None:
    spec = PlanSpec(task=task, name=name, version=1, backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
                    skipped_layers=tuple(skipped), adapters=AdapterShapes(4 if skipped else None, None),
                    metrics=metrics or {})
    modules = backbone.build_plan_modules(spec)
    with torch.no_grad():
        for tensor in modules.state_dict().values():
            tensor.normal_(0, 0.1)
    save_plan(store / task / name, spec, modules, overwrite=True)


@pytest.fixture
def store(tmp_path, backbone):  # noqa: F811
    root = tmp_path / "store"
    save(root, backbone, "skip1", (1,), {"vqa_score": 0.6, "reference_input": {"text_len": 8, "image_size": 64}})
    save(root, backbone, "skip2", (1, 2), {"vqa_score": 0.4})
    save(root, backbone, "nometrics", (0, 1, 2))
    (root / STATE_FILE).write_text(json.dumps({
        "loaded": {"vqa": ["skip1", "skip2", "nometrics"]}, "active": {"vqa": "full"},
        "adaptive": {"vqa": {"slo_p95_ms": 150, "fallbacks": ["skip2", "nometrics"]}},
    }))
    return root


def test_costs_come_from_the_backbone_flops_and_primary_score(store, backbone):  # noqa: F811
    registry = PlanRegistry(backbone, PlanStore(store))
    registry.sync()
    costs = {c.name: c for c in registry.costs("vqa")}
    assert set(costs) == {"full", "skip1", "skip2", "nometrics"}
    skip1 = registry.get("vqa", "skip1")
    report = backbone.flops_at("vqa", skip1.spec, 8, 64)  # its own reference input
    assert costs["skip1"].flops_ratio == round(report.executed / report.full, 6) < 1
    assert costs["skip1"].score == primary_score("vqa", skip1.spec.metrics) == 0.6
    default = backbone.flops_at("vqa", registry.get("vqa", "skip2").spec, 16, backbone.config.image_size)
    assert costs["skip2"].flops_ratio == round(default.executed / default.full, 6)
    assert costs["full"] == PlanCost("full", 1.0, None) and costs["nometrics"].score is None
    assert costs["nometrics"].flops_ratio < costs["skip2"].flops_ratio < costs["skip1"].flops_ratio
    assert registry.cost(skip1) is registry.cost(skip1)  # cached while loaded

    assert registry.within_budget("vqa", 1.0).name == "skip1"
    assert registry.within_budget("vqa", costs["skip2"].flops_ratio).name == "skip2"
    with pytest.raises(RegistryError) as error:
        registry.within_budget("vqa", costs["nometrics"].flops_ratio / 2)
    assert error.value.status == 422 and f"nometrics at {costs['nometrics'].flops_ratio:.6g}" in str(error.value)
    with pytest.raises(RegistryError) as error:
        registry.within_budget("nlvr2", 1.0)
    assert error.value.status == 404


def test_adaptive_settings_and_ladder_follow_the_store(store, backbone):  # noqa: F811
    registry = PlanRegistry(backbone, PlanStore(store))
    registry.sync()
    assert registry.adaptive == {"vqa": AdaptiveSettings(slo_p95_ms=150, fallbacks=("skip2", "nometrics"))}
    assert registry.ladder("vqa") == ["full", "skip2", "nometrics"]  # skip1 is not a fallback
    assert registry.ladder("nlvr2") == []
    costs = {c.name: c.flops_ratio for c in registry.costs("vqa")}
    assert registry.ladder_with_ratios("vqa") == (["full", "skip2", "nometrics"],
                                                  [costs["full"], costs["skip2"], costs["nometrics"]])
    assert registry.ladder_with_ratios("nlvr2") == ([], [])
    registry.activate("vqa", "skip1")
    assert registry.ladder("vqa") == ["skip1", "skip2", "nometrics"]
    written = json.loads((store / STATE_FILE).read_text())
    assert written["adaptive"] == {"vqa": {"slo_p95_ms": 150, "fallbacks": ["skip2", "nometrics"]}}  # admin kept it


def test_a_bad_adaptive_section_is_reported_and_the_last_good_one_kept(store, backbone):  # noqa: F811
    registry = PlanRegistry(backbone, PlanStore(store))
    registry.sync()
    state = json.loads((store / STATE_FILE).read_text())
    state["adaptive"] = {"vqa": {"slo_p95_ms": -5}}
    (store / STATE_FILE).write_text(json.dumps(state))
    registry.sync(force=True)
    assert "slo_p95_ms must be > 0" in registry.errors[ADAPTIVE_ERROR_KEY]
    assert registry.adaptive["vqa"].slo_p95_ms == 150
    assert registry.get("vqa", "skip1").name == "skip1"  # plans unaffected
    del state["adaptive"]
    (store / STATE_FILE).write_text(json.dumps(state))
    registry.sync(force=True)
    assert registry.adaptive == {} and ADAPTIVE_ERROR_KEY not in registry.errors
