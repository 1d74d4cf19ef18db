"""Plan choice by cost: what each loaded plan costs (:class:`PlanCost`: its FLOPs ratio at the
reference input and its primary task score, computed once when it is loaded) and the choices made
from those costs: the most accurate plan within a client's FLOPs budget (:func:`choose_within_budget`)
and the cheaper plans load-adaptive mode may step down to (:func:`cheaper_ladder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from models.das.plan import Plan
from models.tasks import primary_score
from service.errors import RegistryError

REFERENCE_TEXT_LEN = 16  # text tokens of the reference input when a plan's metrics name none


@dataclass(frozen=True)
class PlanCost:
    """What choosing a plan costs and buys."""

    name: str
    flops_ratio: float  # executed / full-backbone FLOPs at the plan's reference input (rounded to 1e-6)
    score: float | None  # the task's primary score (models.tasks.primary_score) from plan.json; None: unknown


def reference_input(backbone, plan: Plan) -> dict[str, Any]:
    """The input size a plan's FLOPs are quoted at: its metrics' reference_input, else 16 text tokens
    and a square image at the backbone's resolution."""
    ref: dict[str, Any] = {"text_len": REFERENCE_TEXT_LEN, "image_size": backbone.config.image_size}
    given = plan.spec.metrics.get("reference_input")
    given = given if isinstance(given, dict) else {}
    if isinstance(given.get("text_len"), int) and given["text_len"] > 0:
        ref["text_len"] = given["text_len"]
    size = given.get("image_size")
    if isinstance(size, int) and size > 0:
        ref["image_size"] = size
    elif isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        ref["image_size"] = size
    return ref


def plan_cost(backbone, plan: Plan) -> PlanCost:
    """The FLOPs ratio (from the backbone's FLOPs accounting) and score of a loaded plan."""
    ref = reference_input(backbone, plan)
    size = ref["image_size"] if isinstance(ref["image_size"], int) else tuple(ref["image_size"])
    report = backbone.flops_at(plan.task, plan.spec, ref["text_len"], size)
    try:
        score = float(primary_score(plan.task, plan.spec.metrics))
    except (KeyError, TypeError, ValueError):
        score = None
    return PlanCost(plan.name, round(report.executed / report.full, 6),
                    score if score is not None and math.isfinite(score) else None)


def check_flops_budget(value: float | None) -> float | None:
    """A client's max_flops_ratio: None, or a number with 0 < x <= 1 (RegistryError 400 otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise RegistryError(f"max_flops_ratio must be a number with 0 < max_flops_ratio <= 1 "
                            f"(a fraction of the full backbone's FLOPs), got {value!r}", 400)
    return float(value)


def choose_within_budget(task: str, costs: list[PlanCost], max_flops_ratio: float) -> PlanCost:
    """The most accurate plan whose FLOPs ratio is at most ``max_flops_ratio``: highest score first,
    plans without a score last, ties to the cheaper plan (then by name, so the choice is stable).
    RegistryError 422 naming the cheapest ratio available when none fits."""
    fitting = [c for c in costs if c.flops_ratio <= max_flops_ratio]
    if not fitting:
        cheapest = min(costs, key=lambda c: (c.flops_ratio, c.name), default=None)
        available = f"the cheapest is {cheapest.name} at {cheapest.flops_ratio:.6g}" if cheapest else "no plan is loaded"
        raise RegistryError(f"no loaded {task} plan fits max_flops_ratio={max_flops_ratio:g}: {available}", 422)
    return min(fitting, key=lambda c: (c.score is None, -(c.score or 0.0), c.flops_ratio, c.name))


def cheaper_ladder(costs: list[PlanCost], active: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    """The active plan, then every loaded plan strictly cheaper than it (only those in ``allowed``
    when given), most expensive first: the rungs load-adaptive mode steps down."""
    by_name = {c.name: c for c in costs}
    if active not in by_name:
        return [active]
    top = by_name[active].flops_ratio
    cheaper = [c for c in costs if c.flops_ratio < top and (allowed is None or c.name in allowed)]
    return [active] + [c.name for c in sorted(cheaper, key=lambda c: (-c.flops_ratio, c.name))]
