"""The three tasks, the metric each is judged by, and the one score per task that plans are compared by."""

from __future__ import annotations

from collections.abc import Mapping

TASKS = ("vqa", "nlvr2", "retrieval")
# every evaluation metric a plan.json may carry (fractions in 0-1): vqa_score; accuracy; ir_r1/5/10 and
# tr_r1/5/10; ir_true_r1/tr_true_r1 (top match is any true pair, where the data set records its scenes)
METRIC_KEYS = ("vqa_score", "accuracy", "ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "ir_true_r1", "tr_true_r1")
PRIMARY_METRIC = {"vqa": "vqa_score", "nlvr2": "accuracy", "retrieval": "ir_r1"}


def primary_score(task: str, metrics: Mapping[str, float]) -> float:
    """One number per task for comparisons (retrieval: mean of IR and TR recall@1)."""
    if task == "retrieval":
        return (metrics["ir_r1"] + metrics["tr_r1"]) / 2
    return metrics[PRIMARY_METRIC[task]]
