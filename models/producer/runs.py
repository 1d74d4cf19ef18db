"""What a plan-training run is told and what it returns, for every backbone: ``TrainConfig``, the
``Evaluation`` of a split, the ``TrainResult``, and the step count of a run. Light (no torch), so the
classifier trainer (``models/producer/train.py``) and the generative one
(``models/producer/generative_plans.py``) share them without importing each other."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from models.das.plan import Plan, PlanSpec
from models.producer.stats import bootstrap_interval


@dataclass
class TrainConfig:
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    skip_bottleneck: int = 64
    parallel_bottleneck: int | None = 32
    retrieval_negatives: int = 3  # negative captions per positive pair
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    seed: int = 0
    train_mma_adapters: bool = False  # LaVIN: the plan carries and trains its own MMA adapters (LaVIN-DAS)
    # how to run (not what is learnt): models/producer/engine.py
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA only)
    workers: int = 0  # DataLoader worker processes decoding and preprocessing
    checkpoint_every: int | None = None  # steps between checkpoints (and one at the end)
    checkpoint_dir: str | None = None
    resume: bool = False  # go on from checkpoint_dir's last checkpoint, if there is one
    stop_after: int | None = None  # test hook: stop (TrainingStopped) after this many steps, as if killed


class TrainingStopped(RuntimeError):
    """Raised by the ``stop_after`` test hook: the run stopped as if killed after that many steps."""


@dataclass
class Evaluation:
    """A split's metrics (fractions), how many examples they are over (retrieval: the gallery size), a
    95% bootstrap interval per metric, and the mean (full, executed) FLOPs per request."""

    metrics: dict[str, float]
    n: int
    intervals: dict[str, list[float]]
    flops: tuple[float, float]
    # VQA: the score per question type where the data set records one ({type: {score, n, interval}})
    by_question_type: dict[str, dict[str, Any]] = field(default_factory=dict)

    def plan_metrics(self, split: str) -> dict[str, Any]:
        """As plan.json's ``metrics`` records them: every metric a plain number, then split, n, intervals."""
        return {**self.metrics, "eval_split": split, "n": self.n, "intervals": self.intervals}

    def report(self, plan: Plan, split: str) -> dict[str, Any]:
        """What `das eval` prints for ``plan`` on ``split``: the metrics, n, intervals, mean FLOPs and the
        share saved, and the VQA score per question type where there is one."""
        flops_full, flops_reduced = self.flops
        return {"task": plan.task, "plan": plan.name, "version": plan.version, "split": split,
                "skipped_layers": list(plan.skipped_layers), **self.metrics, "n": self.n,
                "intervals": self.intervals, "flops_full": flops_full, "flops_reduced": flops_reduced,
                "flops_saved_ratio": 1 - flops_reduced / flops_full if flops_full else 0.0,
                **({"by_question_type": self.by_question_type} if self.by_question_type else {})}


def question_type_groups(types: list[str], scores: list[float]) -> dict[str, dict[str, Any]]:
    """VQA scores grouped by question type (examples without one left out): mean, n and 95% interval."""
    by_type: dict[str, list[float]] = {}
    for question_type, score in zip(types, scores):
        if question_type:
            by_type.setdefault(question_type, []).append(score)
    return {t: {"vqa_score": sum(v) / len(v), "n": len(v), "interval": bootstrap_interval(v)}
            for t, v in sorted(by_type.items())}


@dataclass
class TrainResult:
    spec: PlanSpec
    losses: list[float]
    metrics: dict[str, float] = field(default_factory=dict)
    evaluation: Evaluation | None = None
    timing: dict[str, float] = field(default_factory=dict)  # throughput (run_training's ``timing``)


def total_steps(examples: int, config: TrainConfig) -> int:
    return max(1, math.ceil(config.epochs * max(1, examples // config.batch_size)))
