"""What a pipeline run reports: RESULTS.md (the results table: val and test columns, each labelled with
its split) and pareto.png (accuracy vs FLOPs per task). Nothing here writes README.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.tasks import PRIMARY_METRIC, primary_score

SELECTION_NOTE = ("Selection uses val only: store.json's active plan (column active) is the cheapest plan whose val score "
                  "keeps >= 97% of the adapters-only plan's val score. Test numbers are reported, never used to choose. "
                  "[low, high]: 95% percentile bootstrap interval over the split's examples (retrieval: its queries; "
                  "n is then the gallery size), 1000 resamples.")


def _score(task: str, r: dict[str, Any]) -> float:
    return primary_score(task, r)


def _interval(task: str, r: dict[str, Any]) -> str:
    """The primary metric's interval ("" when the entry has none; retrieval: IR and TR R@1 separately)."""
    intervals = r.get("intervals") or {}
    keys = ["ir_r1", "tr_r1"] if task == "retrieval" else [PRIMARY_METRIC[task]]
    if not all(k in intervals for k in keys):
        return ""
    if task == "retrieval":
        return " " + " ".join(f"{k[:2].upper()} [{intervals[k][0]:.3f}, {intervals[k][1]:.3f}]" for k in keys)
    return f" [{intervals[keys[0]][0]:.3f}, {intervals[keys[0]][1]:.3f}]"


def results_table(report: dict[str, Any]) -> str:
    lines = ["| task | plan | skipped layers | score (val) | val vs adapters-only | n (val) | score (test) | n (test) | "
             "GFLOPs / request (test mean) | FLOPs saved | trainable params | active |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, task_report in report["tasks"].items():
        plans = task_report["plans"]
        val_of = {name: r.get("val") or {} for name, r in plans.items()}
        has_val = all(primary_metric_present(task, v) for v in val_of.values())
        reference = _score(task, val_of["adapters"]) if has_val else None
        metric = "mean(IR,TR) R@1" if task == "retrieval" else PRIMARY_METRIC[task]
        for name, r in plans.items():
            val = val_of[name]
            active = "yes" if task_report.get("active") == name else ""
            if has_val:
                score = _score(task, val)
                val_cell = f"{metric} {score:.3f}{_interval(task, val)}"
                ratio = f"{(score / reference if reference else float('nan')):.1%}"
            else:
                val_cell, ratio = "-", "-"
            lines.append(
                f"| {task} | {name} | {r['skipped_layers'] or '-'} | {val_cell} | {ratio} | {val.get('n', '-')} | "
                f"{metric} {_score(task, r):.3f}{_interval(task, r)} | {r.get('n', '-')} | "
                f"{r['flops_reduced'] / 1e9:.4f} | {r['flops_saved_ratio']:.1%} | {r.get('trainable_params', '')} | {active} |"
            )
    lines += ["", SELECTION_NOTE, ""]
    lines.append("Search vs random skip sets (same K, same short training, val split):")
    lines.append("")
    lines.append("| task | K | searched skip set | searched score (val) | random skip sets (score, val) | random mean (val) |")
    lines.append("|---|---|---|---|---|---|")
    for task, task_report in report["tasks"].items():
        s = task_report["search_vs_random"]
        randoms = ", ".join(f"{r['skip']} ({r['score']:.3f})" for r in s["random"])
        lines.append(f"| {task} | {s['k']} | {s['searched_skip']} | {s['searched_score']:.3f} | {randoms} | {s['random_mean']:.3f} |")
    return "\n".join(lines)


def primary_metric_present(task: str, metrics: dict[str, Any]) -> bool:
    keys = ["ir_r1", "tr_r1"] if task == "retrieval" else [PRIMARY_METRIC[task]]
    return all(isinstance(metrics.get(k), (int, float)) for k in keys)


def pareto_plot(report: dict[str, Any], path: Path, title: str = "embedded default") -> None:
    import matplotlib  # here, not at the top: only plotting needs it (and the Agg backend)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    fig, axes = plt.subplots(1, len(report["tasks"]), figsize=(4.2 * len(report["tasks"]), 3.6))
    for ax, (task, task_report) in zip(axes, report["tasks"].items()):
        points = [(r["flops_reduced"] / 1e9, primary_score(task, r), name) for name, r in task_report["plans"].items()]
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(task)
        ax.set_xlabel("GFLOPs per request (test mean)")
        ax.set_ylabel("test score" if task != "retrieval" else "test mean R@1")
        ax.grid(alpha=0.3)
    fig.suptitle(f"DAS plans: accuracy vs FLOPs ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(report: dict[str, Any], out: Path, arch: str) -> str:
    """RESULTS.md and pareto.png into the plan store ``out`` (never README.md); returns the results table."""
    table = results_table(report)
    title = {"vilt": "Shipped plans", "meter": "Shipped plans: tiny METER"}[arch]
    command = "das pipeline" + (" --arch meter" if arch == "meter" else "")
    took = f"in {report['minutes']} min" + (
        f" (this run; {report['reused_steps']} steps cached in the work directory by earlier runs were reused)"
        if report.get("reused_steps") else "")
    made = f"Generated by `{command}` {took}."
    if report.get("remeasured"):
        made = (f"Plans trained by `{command}`; every plan's score re-measured (no retraining) by "
                f"`{command} --remeasure` on the val and test splits of the pipeline's synthetic data, regenerated "
                f"with seed {report['remeasured']['seed']}. The search-vs-random table is the training run's "
                "(its baseline plans are not kept, so it is not re-measured).")
    (out / "RESULTS.md").write_text(f"# {title}\n\n{made}\n\n{table}\n\n"
                                    "![accuracy vs FLOPs](pareto.png)\n")
    pareto_plot(report, out / "pareto.png", "embedded default" if arch == "vilt" else "embedded tiny METER")
    return table
