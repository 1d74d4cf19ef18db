"""What a pipeline run reports: RESULTS.md (the results table: val and test columns, each labelled with
its split; search vs random at equal cost; VQA per question type), pareto.png (accuracy vs FLOPs per
task), gates.png (the search gates) and pretrain.png (pre-training curves). Nothing here writes README.md."""

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
    ceiling = report["tasks"].get("retrieval", {}).get("ceiling")
    if ceiling:
        lines += [ceiling_note(ceiling), ""]
    if true_match := true_match_table(report):
        lines += true_match, ""
    lines += search_vs_random_table(report), ""
    comparison = {task: r["objectives"] for task, r in report["tasks"].items() if r.get("objectives")}
    if comparison:
        lines += objectives_table(comparison), ""
    lines += question_type_table(report)
    return "\n".join(lines)


def ceiling_note(ceiling: dict[str, dict[str, float]]) -> str:
    """What a perfect retrieval model could score on the galleries (see ``retrieval_ceiling``)."""
    parts = [f"{split} IR {c['ir_r1']:.3f}, TR {c['tr_r1']:.3f} ({c['ambiguous_captions']:.0%} of its captions true of "
             f"more than one image)" for split, c in ceiling.items()]
    return ("Retrieval's R@1 cannot reach 1 on these galleries: a caption can be true of several scenes, and the "
            "evaluation counts only the image it was written for. A model that scores every true image-caption pair "
            "alike (ties broken at random) expects R@1 " + "; ".join(parts) + ".")


def true_match_table(report: dict[str, Any]) -> str:
    """Retrieval R@1 as evaluated (the pair a caption was written for) beside R@1 counting any true pair
    (``ir_true_r1``, ``tr_true_r1``: recorded where the data set has scenes); "" when no plan has them."""
    plans = report["tasks"].get("retrieval", {}).get("plans", {})
    rows = []
    for name, r in plans.items():
        cells = []
        for entry in (r.get("val") or {}, r):
            intervals = entry.get("intervals") or {}
            cells += [_cell(entry[k], intervals.get(k)) if k in entry else "-" for k in ("ir_r1", "ir_true_r1", "tr_r1", "tr_true_r1")]
        if any(c != "-" for c in cells[1::2]):
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    return "\n".join(["Retrieval R@1 counting any true match: a hit when the top-ranked image (IR) or caption (TR) is "
                      "one the query is true of, not only the pair it was written for (95% intervals; val as plan.json "
                      "records it):", "",
                      "| plan | IR R@1 (val) | IR any true (val) | TR R@1 (val) | TR any true (val) | IR R@1 (test) | "
                      "IR any true (test) | TR R@1 (test) | TR any true (test) |",
                      "|---|---|---|---|---|---|---|---|---|", *rows])


def _cell(score: float, interval: list[float] | None) -> str:
    return f"{score:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def search_vs_random_table(report: dict[str, Any]) -> str:
    """The searched skip set against random sets of (nearly) the same FLOPs saving, on val."""
    lines = ["Search vs random skip sets at equal cost (every set saves within 5% of the searched set's FLOPs "
             "share at the reference input; the same short training; val split, 95% intervals):", "",
             "| task | objective | searched skip set | FLOPs saved | searched score (val) | random skip sets: "
             "FLOPs saved, score (val) | random mean (val) | searched > random mean |",
             "|---|---|---|---|---|---|---|---|"]
    for task, task_report in report["tasks"].items():
        s = task_report["search_vs_random"]
        randoms = "; ".join(f"{r['skip']} {r.get('flops_saved', float('nan')):.1%}, {_cell(r['score'], r.get('interval'))}"
                            for r in s["random"])
        beats = "yes" if s["searched_score"] > s["random_mean"] else "no"
        lines.append(f"| {task} | {s.get('objective', 'reward')} | {s['searched_skip']} | "
                     f"{s.get('searched_flops_saved', float('nan')):.1%} | "
                     f"{_cell(s['searched_score'], s.get('searched_interval'))} | {randoms} | {s['random_mean']:.3f} | {beats} |")
    return "\n".join(lines)


def objectives_table(comparison: dict[str, dict[str, Any] | None]) -> str:
    """The search objectives at equal FLOPs, per task: each one's skip set, FLOPs saved and val score."""
    lines = ["Search objectives at equal FLOPs saved (each set trained alike, the short baseline training; val, "
             "95% intervals):", "",
             "| task | reward: skip set, FLOPs saved, score | reward-per-flop: skip set, FLOPs saved, score | chosen |",
             "|---|---|---|---|"]
    for task, c in comparison.items():
        if not c:
            continue
        cells = [f"{c[o]['skip']} {c[o]['flops_saved']:.1%}, {_cell(c[o]['score'], c[o].get('interval'))}"
                 for o in ("reward", "reward-per-flop")]
        lines.append(f"| {task} | {cells[0]} | {cells[1]} | {c['chosen']}{' (' + c['note'] + ')' if c.get('note') else ''} |")
    return "\n".join(lines)


def question_type_table(report: dict[str, Any]) -> list[str]:
    """VQA score per question type (test split) for every plan, where the evaluation recorded types."""
    plans = report["tasks"].get("vqa", {}).get("plans", {})
    types = sorted({t for r in plans.values() for t in r.get("by_question_type", {})})
    if not types:
        return []
    lines = ["VQA score per question type (test split; n per type in the header; 95% intervals):", "",
             "| plan | " + " | ".join(f"{t} (n={plans[next(iter(plans))]['by_question_type'].get(t, {}).get('n', 0)})"
                                     for t in types) + " |",
             "|---|" + "---|" * len(types)]
    for name, r in plans.items():
        groups = r.get("by_question_type", {})
        cells = [_cell(groups[t]["vqa_score"], groups[t].get("interval")) if t in groups else "-" for t in types]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def learning_curve_plot(pretrain: dict[str, Any], path: Path, title: str) -> bool:
    """The pre-training losses and ITM accuracy over steps (False when the report has no curve)."""
    curve = pretrain.get("curve")
    if not curve:
        return False
    import matplotlib  # here, not at the top: only plotting needs it (and the Agg backend)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, label in (("itm_loss", "ITM loss"), ("mlm_loss", "MLM loss")):
        loss_ax.plot(curve["step"], curve[key], label=label)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    acc_ax.plot(curve["step"], curve["itm_accuracy"], color="tab:green", label="ITM (half the negatives hard)")
    for key, label in (("patch_accuracy", "patch shape"), ("patch_color_accuracy", "patch colour")):
        if key in curve:  # the patch objectives, where pre-training had them
            acc_ax.plot(curve["step"], curve[key], label=label)
    acc_ax.set_xlabel("step")
    acc_ax.set_ylabel("accuracy")
    acc_ax.legend()
    acc_ax.grid(alpha=0.3)
    fig.suptitle(f"Pre-training ({title}): {pretrain.get('steps', '?')} steps over {pretrain.get('examples', '?')} caption pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def gates_plot(report: dict[str, Any], path: Path, title: str) -> bool:
    """Every task's final search gates per layer, the chosen skip set highlighted (False without gates)."""
    searches = {task: r["search"] for task, r in report["tasks"].items() if r.get("search", {}).get("gates")}
    if not searches:
        return False
    import matplotlib  # here, not at the top: only plotting needs it (and the Agg backend)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    fig, axes = plt.subplots(1, len(searches), figsize=(4.2 * len(searches), 3.2), squeeze=False)
    for ax, (task, search) in zip(axes[0], searches.items()):
        gates = search["gates"]
        colours = ["tab:red" if i in search["skip_set"] else "tab:blue" for i in range(len(gates))]
        ax.bar(range(len(gates)), gates, color=colours)
        ax.set_title(f"{task}: skip {search['skip_set']} (red)")
        ax.set_xlabel("layer (DAS arm)")
        ax.set_ylabel("gate g (skip prob. sigmoid(g))")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"DAS search gates at the end of the search ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


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
        f" (this run, which reused {report['reused_steps']} cached result(s) of earlier runs from the work directory)"
        if report.get("reused_steps") else "")
    made = f"Generated by `{command}` {took}."
    if report.get("remeasured"):
        made = (f"Plans trained by `{command}`; every plan's score re-measured (no retraining) by "
                f"`{command} --remeasure` on the val and test splits of the pipeline's synthetic data, regenerated "
                f"with seed {report['remeasured']['seed']}. The search-vs-random table is the training run's "
                "(its baseline plans are not kept, so it is not re-measured).")
    name = "embedded default" if arch == "vilt" else "embedded tiny METER"
    pareto_plot(report, out / "pareto.png", name)
    figures = ["![accuracy vs FLOPs](pareto.png)"]
    if gates_plot(report, out / "gates.png", name):
        figures.append("![search gates](gates.png)")
    if learning_curve_plot(report.get("pretrain", {}), out / "pretrain.png", name):
        figures.append("![pre-training curves](pretrain.png)")
    (out / "RESULTS.md").write_text(f"# {title}\n\n{made}\n\n{table}\n\n" + "\n\n".join(figures) + "\n")
    return table
