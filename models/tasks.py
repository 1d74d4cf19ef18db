"""The three tasks, the metric each is judged by, and the one score per task that plans are compared by."""

from __future__ import annotations

from collections.abc import Mapping

TASKS = ("vqa", "nlvr2", "retrieval")
# evaluation metric keys (fractions in 0-1): vqa_score; accuracy; ir_r1/5/10 and tr_r1/5/10
PRIMARY_METRIC = {"vqa": "vqa_score", "nlvr2": "accuracy", "retrieval": "ir_r1"}


def primary_score(task: str, metrics: Mapping[str, float]) -> float:
    """One number per task for comparisons (retrieval: mean of IR and TR recall@1)."""
    if task == "retrieval":
        return (metrics["ir_r1"] + metrics["tr_r1"]) / 2
    return metrics[PRIMARY_METRIC[task]]
