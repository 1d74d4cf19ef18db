"""Evaluating a plan on a data set split (`das eval`, and the pipeline's test evaluation), and finding the
backbone a plan directory was made for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.backbones.base import Backbone
from models.das.plan import PlanError, builtin_full_plan, load_plan, read_plan_spec
from models.paths import SHIPPED_BACKBONE, store_backbone_of_plan
from models.producer.generative_plans import evaluate_generative_plan_dir
from models.producer.runs import TrainConfig
from models.producer.train import task_data
from models.runtime import DASRuntime


def backbone_dir_for_plan(plan: str | Path) -> Path:
    """The backbone a plan is evaluated on when none is named: the backbone of the plan store the plan
    directory lies in (``<store>/backbone`` beside ``<store>/store.json``), else the shipped one (also for
    ``TASK/full``)."""
    return (store_backbone_of_plan(plan) if Path(plan).is_dir() else None) or SHIPPED_BACKBONE


def check_default_backbone(plan: str | Path, backbone: Backbone, backbone_dir: Path) -> None:
    """Refuse, naming the backbone the plan needs (architecture and fingerprint), when the plan was not
    made for the backbone :func:`backbone_dir_for_plan` chose for it."""
    if not Path(plan).is_dir():
        return
    spec = read_plan_spec(plan)
    if (spec.backbone.architecture, spec.backbone.fingerprint) == (backbone.architecture, backbone.fingerprint):
        return
    chosen = ("its plan store's backbone" if store_backbone_of_plan(plan) is not None
              else "the shipped backbone (the plan lies in no plan store: <store>/<task>/<name> beside <store>/store.json)")
    raise PlanError(
        f"plan {spec.task}/{spec.name} v{spec.version} needs a {spec.backbone.architecture!r} backbone with fingerprint "
        f"{spec.backbone.fingerprint}; {chosen}, {backbone_dir}, is a {backbone.architecture!r} with fingerprint "
        f"{backbone.fingerprint}: pass --backbone DIR"
    )


def evaluate_plan_dir(plan_dir: str | Path, data_dir: str | Path, backbone: Backbone, split: str = "test",
                      limit: int | None = None, progress: bool = True, workers: int = 0,
                      precision: str = "fp32") -> dict[str, Any]:
    """The plan's metrics on ``split`` (each a plain number), ``n`` (examples; retrieval: the gallery
    size), ``intervals`` ({metric: [low, high]}, 95% bootstrap over the examples, see
    ``models/producer/stats.py``) and the mean FLOPs per request."""
    if getattr(backbone, "generative", False):
        return evaluate_generative_plan_dir(plan_dir, data_dir, backbone, split, limit)
    plan = load_plan(plan_dir, backbone) if Path(plan_dir).is_dir() else None
    if plan is None:  # "TASK/full" names a built-in plan
        task, _, name = str(plan_dir).partition("/")
        plan = builtin_full_plan(backbone, task)
    data = task_data(plan.task, DASRuntime(backbone), data_dir, TrainConfig(workers=workers, precision=precision))
    return data.evaluate(plan, split, limit, progress=progress).report(plan, split)


