"""Response bodies of the DAS Serve API as pydantic models: the API methods' return annotations (so
BentoML's OpenAPI page documents them) and the error body every non-2xx answer carries."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field

from models.tasks import METRIC_KEYS
from service.policy import reference_input


def _omitted_if_none(description: str, **kwargs: Any) -> Any:
    """An optional field left out of the JSON body (not sent as null) when unset."""
    return Field(default=None, exclude_if=lambda value: value is None, description=description, **kwargs)


class ErrorBody(BaseModel):
    """Every error answer (4xx, 5xx) of the service."""

    error: str = Field(description="What went wrong, for a human.")
    status: int = Field(description="The HTTP status code, repeated.")
    detail: list[dict[str, Any]] | None = _omitted_if_none(
        "Per-field problems when the request did not match the endpoint's input schema.")


class PlanRef(BaseModel):
    task: str = Field(description="vqa, nlvr2 or retrieval.")
    name: str
    version: int
    skipped_layers: list[int] = Field(description="Backbone layers this plan skips.")


class UsedPlan(PlanRef):
    flops_ratio: float = Field(description="Executed / full-backbone FLOPs at the plan's reference input.")
    chosen_by: Literal["request", "budget", "active", "load"] = Field(
        description="Why this plan ran: named in the request, fitting max_flops_ratio, the task's active plan, "
                    "or a cheaper plan served while the task is over its latency SLO.")


class FlopsReport(BaseModel):
    full: int = Field(description="FLOPs of the full backbone on this request's input.")
    executed: int = Field(description="FLOPs this request executed.")
    saved_ratio: float = Field(description="1 - executed / full.")


class _Served(BaseModel):
    plan: UsedPlan
    flops: FlopsReport
    latency_ms: float = Field(description="Time in the service, queueing included.")


class Answer(BaseModel):
    answer: str
    score: float = Field(description="Sigmoid score in [0, 1].")


class VQAResponse(_Served):
    answers: list[Answer] = Field(description="The top_k answers, best first.")
    question_truncated: bool = Field(description="The question was cut to the model's maximum text length.")


class NLVR2Response(_Served):
    label: bool = Field(description="Whether the statement is true of the image pair.")
    probability: float = Field(description="P(true).")
    statement_truncated: bool


class RankedText(BaseModel):
    index: int = Field(description="Position of the candidate in the request's texts.")
    text: str
    score: float


class TextRankingResponse(_Served):
    ranking: list[RankedText] = Field(description="All candidates, best match first.")


class RankedImage(BaseModel):
    index: int = Field(description="Position of the candidate in the request's images.")
    score: float


class ImageRankingResponse(_Served):
    ranking: list[RankedImage] = Field(description="All candidates, best match first.")


class AdminResponse(BaseModel):
    ok: bool
    plan: PlanRef = Field(description="The plan the operation acted on.")
    active: str | None = Field(description="The task's active plan afterwards.")


# -- GET /plans -------------------------------------------------------------------------------------
COUNT_KEYS = ("trainable_params", "flops_full", "flops_reduced")
MAX_SPLIT_CHARS = 64


class PlanMetrics(BaseModel):
    """The known evaluation numbers from the plan's plan.json (other keys there are not listed)."""

    vqa_score: float | None = _omitted_if_none("VQA score (vqa plans).")
    accuracy: float | None = _omitted_if_none("NLVR2 accuracy (nlvr2 plans).")
    ir_r1: float | None = _omitted_if_none("Image retrieval recall@1 (retrieval plans).")
    tr_r1: float | None = _omitted_if_none("Text retrieval recall@1 (retrieval plans).")
    ir_r5: float | None = _omitted_if_none("Image retrieval recall@5.")
    tr_r5: float | None = _omitted_if_none("Text retrieval recall@5.")
    ir_r10: float | None = _omitted_if_none("Image retrieval recall@10.")
    tr_r10: float | None = _omitted_if_none("Text retrieval recall@10.")
    ir_true_r1: float | None = _omitted_if_none(
        "Image retrieval: share of captions whose top image is any image the caption truly describes.")
    tr_true_r1: float | None = _omitted_if_none(
        "Text retrieval: share of images whose top caption is any caption that truly describes them.")
    eval_split: str | None = _omitted_if_none("The split the numbers come from.", max_length=MAX_SPLIT_CHARS)
    trainable_params: int | None = _omitted_if_none("Parameters the plan trained.")
    flops_full: int | None = _omitted_if_none("Full-backbone FLOPs at the reference input, when trained.")
    flops_reduced: int | None = _omitted_if_none("The plan's FLOPs at the reference input, when trained.")

    @classmethod
    def from_plan_json(cls, metrics: dict[str, Any]) -> PlanMetrics:
        """Only the known keys, and only values of the right type (plan.json is not trusted to be tidy)."""
        kept: dict[str, Any] = {}
        for key in METRIC_KEYS:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                kept[key] = float(value)
        for key in COUNT_KEYS:
            value = metrics.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                kept[key] = value
        split = metrics.get("eval_split")
        if isinstance(split, str) and len(split) <= MAX_SPLIT_CHARS:
            kept["eval_split"] = split
        return cls(**kept)


class ReferenceInput(BaseModel):
    text_len: int = Field(description="Text tokens the plan's FLOPs are quoted at.")
    image_size: int | list[int] = Field(description="Image side (or [height, width]) the FLOPs are quoted at.")


class PlanEntry(PlanRef):
    active: bool = Field(description="This is the task's active (default) plan.")
    flops_ratio: float = Field(description="Executed / full-backbone FLOPs at reference_input (max_flops_ratio "
                                           "compares against this).")
    flops_saved_ratio: float
    score: float | None = Field(description="The task's primary score from plan.json; null: unknown.")
    reference_input: ReferenceInput
    metrics: PlanMetrics


class AdaptiveStatus(BaseModel):
    """Load-adaptive mode of a task (store.json's adaptive section), as this worker sees it."""

    slo_p95_ms: float
    serving: str | None = Field(description="The plan this worker last gave a default request.")
    steps_down: int = Field(description="Rungs below the active plan.")
    p95_ms: float | None
    cooldown_backoff: float
    projected_utilization_up: float | None
    ladder: list[str] = Field(description="The active plan, then the cheaper plans it may shift to.")


class TaskPlans(BaseModel):
    active: str | None = Field(description="The task's active plan.")
    plans: list[PlanEntry]
    adaptive: AdaptiveStatus | None = _omitted_if_none("Present only while load-adaptive mode is on for the task.")


class StoreError(BaseModel):
    file: str
    reason: str


class PlansOverview(BaseModel):
    tasks: dict[str, TaskPlans] = Field(description="Served tasks and their loaded plans.")
    load_errors: dict[str, str] = Field(description="'task/name' (or 'store.json/adaptive') -> why it is not in effect.")
    store_error: StoreError | None = Field(default=None, description="Why the plan store itself could not be read; "
                                                                     "null while it reads fine.")


# -- building the bodies ------------------------------------------------------------------------
def plan_info(plan) -> dict[str, Any]:
    """A PlanRef body for ``plan`` (a models.das.plan.Plan)."""
    return {"task": plan.task, "name": plan.name, "version": plan.version, "skipped_layers": list(plan.skipped_layers)}


def flops_info(report) -> dict[str, Any]:
    """A FlopsReport body for a request's FLOPs report."""
    return {"full": report.full, "executed": report.executed, "saved_ratio": round(report.saved_ratio, 6)}


def plans_overview(registry, adaptive: dict[str, dict[str, Any]]) -> PlansOverview:
    """GET /plans/ for a worker's ``registry`` (service.registry.PlanRegistry) and its load shifter's
    ``adaptive`` status per task: each loaded plan with its cost, reference input and metrics."""
    overview: dict[str, Any] = {}
    for task, entry in registry.snapshot().items():
        plans = []
        for name, plan in sorted(entry["plans"].items()):
            cost = registry.cost(plan)
            plans.append({
                **plan_info(plan), "active": name == entry["active"],
                "flops_ratio": cost.flops_ratio, "flops_saved_ratio": round(1 - cost.flops_ratio, 6),
                "score": cost.score, "reference_input": reference_input(registry.backbone, plan),
                "metrics": PlanMetrics.from_plan_json(plan.spec.metrics),
            })
        overview[task] = {"active": entry["active"], "plans": plans}
    for task, status in adaptive.items():
        if task in overview:
            overview[task]["adaptive"] = {**status, "ladder": registry.ladder(task)}
    return PlansOverview.model_validate(
        {"tasks": overview, "load_errors": registry.errors, "store_error": registry.store_error})

