"""Producing plans: the `das pretrain`, `das search`, `das train`, `das eval` and `das pipeline`
commands. The pipeline regenerates the embedded default (backbone + plans for every task) from
seeds, deterministically, and writes the results table and the accuracy-vs-FLOPs plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.cli.main import layer_list

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_PLANS = REPO_ROOT / "plans"
SHIPPED_BACKBONE = SHIPPED_PLANS / "backbone"
SHIPPED_METER_PLANS = SHIPPED_PLANS / "meter"  # the tiny METER: its own store (backbone, plans, store.json)
TASKS = ("vqa", "nlvr2", "retrieval")
README_MARKERS = {"vilt": ("<!-- plans-table:begin -->", "<!-- plans-table:end -->"),
                  "meter": ("<!-- meter-plans-table:begin -->", "<!-- meter-plans-table:end -->")}
README_BEGIN, README_END = README_MARKERS["vilt"]


def _train_config(args: argparse.Namespace):
    from models.producer.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, skip_bottleneck=args.skip_bottleneck,
        parallel_bottleneck=args.parallel_bottleneck or None, max_train_examples=args.max_train,
        max_eval_examples=args.max_eval, seed=args.seed,
    )


def _load(backbone_dir: str | None):
    from models.backbones.base import load_backbone

    return load_backbone(backbone_dir or SHIPPED_BACKBONE, device="cpu")


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def cmd_pretrain(args: argparse.Namespace) -> int:
    from models.producer.pretrain import PretrainConfig, pretrain_backbone

    config = PretrainConfig(arch=args.arch, epochs=args.epochs, seed=args.seed, hidden_size=args.hidden_size,
                            num_layers=args.layers, vision_layers=args.vision_layers, text_layers=args.text_layers,
                            num_heads=args.heads, intermediate_size=4 * args.hidden_size, image_size=args.image_size)
    extra = {task: Path(d) for task, d in (("vqa", args.vqa_data), ("nlvr2", args.nlvr2_data)) if d}
    summary = pretrain_backbone(args.data, args.out, config, extra_text_dirs=extra)
    print(json.dumps({"out": str(args.out), **summary}, indent=2))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from models.producer.search import SearchConfig, das_search, write_search_outputs

    backbone = _load(args.backbone)
    config = SearchConfig(skip_num=args.skip_num, update_every=args.update_every, gate_lr=args.gate_lr,
                          warmup_fraction=args.warmup, train=_train_config(args))
    result = das_search(backbone, args.task, args.data, config)
    files = write_search_outputs(result, args.out)
    print(f"ranking (most skippable first): {result.ranking}")
    print(f"gates: {result.gates}")
    print(f"chosen skip set (skip_num={result.skip_num}): {result.skip_set}")
    print(f"wrote {files['json']}, {files['csv']}, {files['png']}")
    print(f"next: das train --backbone {args.backbone or SHIPPED_BACKBONE} --task {args.task} --data {args.data} "
          f"--skip {','.join(map(str, result.skip_set))} --out <plan dir>")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.producer.train import train_plan

    backbone = _load(args.backbone)
    result = train_plan(backbone, args.task, args.data, args.skip, _train_config(args), out_dir=args.out,
                        name=args.name, version=args.version)
    print(json.dumps({"plan": str(args.out), "metrics": result.spec.metrics}, indent=2))
    return 0


def evaluate_plan_dir(plan_dir: str | Path, data_dir: str | Path, backbone, split: str = "test",
                      limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    from models.das.plan import builtin_full_plan, load_plan
    from models.runtime import DASRuntime
    from models.producer.train import TrainConfig, task_data

    plan = load_plan(plan_dir, backbone) if Path(plan_dir).is_dir() else None
    if plan is None:  # "TASK/full" names a built-in plan
        task, _, name = str(plan_dir).partition("/")
        plan = builtin_full_plan(backbone, task)
    data = task_data(plan.task, DASRuntime(backbone), data_dir, TrainConfig())
    metrics, (flops_full, flops_reduced) = data.evaluate(plan, split, limit, progress=progress)
    return {"task": plan.task, "plan": plan.name, "version": plan.version, "split": split,
            "skipped_layers": list(plan.skipped_layers), **metrics,
            "flops_full": flops_full, "flops_reduced": flops_reduced,
            "flops_saved_ratio": 1 - flops_reduced / flops_full if flops_full else 0.0}


def cmd_eval(args: argparse.Namespace) -> int:
    backbone = _load(args.backbone)
    result = evaluate_plan_dir(args.plan, args.data, backbone, args.split, args.max_eval, progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<18} {value:.4f}" if isinstance(value, float) else f"{key:<18} {value}")
    return 0


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
@dataclass
class PipelineSettings:
    """Sizes for a full regeneration (~90 min on 2 CPU cores) or a --quick smoke run."""

    arch: str = "vilt"  # models.producer.pretrain.ARCHS
    n: dict[str, int] = field(default_factory=lambda: {"vqa": 12000, "nlvr2": 6000, "retrieval": 3000})
    image_size: int = 96
    pretrain_epochs: float = 1.2  # over every caption pair: retrieval captions + captioned train scenes of all tasks
    hidden_size: int = 128
    layers: int = 8  # ViLT: encoder layers; METER: fusion layers per stream
    vision_layers: int = 2  # METER only: uni-modal encoder depths
    text_layers: int = 2
    heads: int = 4
    train_epochs: float = 1.5
    # fewer training examples: at 1.5 epochs NLVR2 stayed near chance and retrieval's skip adapters
    # lost 60% of the adapters-only R@1 (a run of 2026-11-23)
    train_epochs_by_task: dict[str, float] = field(default_factory=lambda: {"nlvr2": 5.0, "retrieval": 6.0})
    search_epochs: float = 1.0
    search_update_every: int = 10
    baseline_epochs: float = 0.5
    skip_levels: tuple[int, ...] = (2, 4)
    # VQA gets a deeper ladder: load-adaptive serving (service/adaptive.py) steps down to skip6 when skip4's
    # capacity (at most ~1.8x the adapters plan's) cannot absorb an overload
    skip_levels_by_task: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"vqa": (2, 4, 6)})
    search_k: int | None = None  # skip_num of the search (default: the first skip level)
    random_baselines: int = 3
    batch_size: int = 32
    max_eval: int | None = 1000

    @classmethod
    def quick(cls) -> PipelineSettings:
        return cls(n={"vqa": 96, "nlvr2": 64, "retrieval": 48}, image_size=64, pretrain_epochs=1.0, hidden_size=32, layers=4,
                   heads=2, train_epochs=1.0, train_epochs_by_task={}, skip_levels_by_task={}, search_epochs=3.0, search_update_every=2, baseline_epochs=0.5,
                   skip_levels=(1, 2),
                   random_baselines=3, batch_size=8, max_eval=32)

    @classmethod
    def meter(cls, quick: bool = False) -> PipelineSettings:
        """The tiny METER: 2-layer encoders, 6 fusion layers per stream (12 arms, as METER), searched
        with skip_num 4 as in the DAS reference. Its FLOPs per request are close to the tiny ViLT's."""
        if quick:
            return dataclasses.replace(cls.quick(), arch="meter", layers=2, vision_layers=1, text_layers=1,
                                       skip_levels=(2,), search_k=2)
        # one skip level and fewer epochs than the ViLT's: a full METER run fits in about 90 min on 2 cores
        return cls(arch="meter", layers=6, vision_layers=2, text_layers=2, skip_levels=(4,), skip_levels_by_task={},
                   search_k=4, pretrain_epochs=1.0, random_baselines=2,
                   train_epochs_by_task={"nlvr2": 4.0, "retrieval": 4.0})


def run_pipeline(out: Path, work: Path, settings: PipelineSettings, seed: int = 0, progress: bool = True,
                 log=print) -> dict[str, Any]:
    from models.backbones.base import load_backbone
    from models.producer.pretrain import PretrainConfig, pretrain_backbone
    from models.producer.train import TrainConfig
    from models.producer.world.language import synthesize

    started = time.time()
    reused: list[str] = []
    print_line = log

    def log(message: str) -> None:  # counts "[resume]" lines: steps cached by an earlier run
        if message.startswith("[resume]"):
            reused.append(message)
        print_line(message)

    data = {task: work / "data" / task for task in TASKS}
    for offset, task in enumerate(TASKS):
        if not (data[task] / "synth.json").is_file():
            log(f"[data] synthesising {task}: {settings.n[task]} examples")
            synthesize(task, data[task], n=settings.n[task], seed=seed + offset, image_size=settings.image_size,
                       progress=progress)
    backbone_dir = out / "backbone"
    pretrain_file = work / "pretrain.json"
    if (backbone_dir / "config.json").is_file() and pretrain_file.is_file():
        log("[resume] pretrain: reusing the backbone already in the output")
        pretrain_summary = json.loads(pretrain_file.read_text())
    else:
        log(f"[pretrain] {settings.arch}: ITM + MLM on the synthetic image-caption pairs")
        pretrain_summary = pretrain_backbone(
            data["retrieval"], backbone_dir,
            PretrainConfig(arch=settings.arch, hidden_size=settings.hidden_size, num_layers=settings.layers,
                           vision_layers=settings.vision_layers, text_layers=settings.text_layers, num_heads=settings.heads,
                           intermediate_size=4 * settings.hidden_size, image_size=settings.image_size,
                           epochs=settings.pretrain_epochs, seed=seed),
            extra_text_dirs={"vqa": data["vqa"], "nlvr2": data["nlvr2"]}, progress=progress,
            scene_dirs=[data["vqa"], data["nlvr2"]],
        )
        pretrain_file.write_text(json.dumps(pretrain_summary, indent=2) + "\n")
    backbone = load_backbone(backbone_dir, device="cpu")
    train_config = TrainConfig(epochs=settings.train_epochs, batch_size=settings.batch_size, seed=seed,
                               max_eval_examples=settings.max_eval,
                               skip_bottleneck=max(8, settings.hidden_size // 2),
                               # hidden/16: parallel adapters cost ~2% FLOPs, so skipping 2 of 8 layers saves > 20%
                               parallel_bottleneck=max(4, settings.hidden_size // 16))
    report: dict[str, Any] = {"pretrain": pretrain_summary, "tasks": {}}
    for task in TASKS:
        task_config = TrainConfig(**{**asdict(train_config),
                                     "epochs": settings.train_epochs_by_task.get(task, settings.train_epochs)})
        report["tasks"][task] = _run_task(task, backbone, data[task], out, work, settings, task_config, seed,
                                          progress, log)
        _write_store_state(out, task, report["tasks"][task])
    report["minutes"] = round((time.time() - started) / 60, 1)
    report["reused_steps"] = len(reused)
    return report


def _cached(path: Path, make, log, what: str):
    """Resume support: a step whose JSON result exists in the work directory is not run again."""
    if path.is_file():
        log(f"[resume] {what}: reusing {path}")
        return json.loads(path.read_text())
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _run_task(task, backbone, data_dir: Path, out: Path, work: Path, settings: PipelineSettings, train_config,
              seed: int, progress: bool, log) -> dict[str, Any]:
    """Search, train a plan per skip level, evaluate on test, and compare the search with random
    skip sets. Each step's result is cached under ``work`` so an interrupted run resumes."""
    from models.das.plan import PlanError, validate_plan
    from models.producer.search import SearchConfig, das_search, write_search_outputs
    from models.producer.train import TrainConfig, primary_score, train_plan

    search_k = settings.search_k or settings.skip_levels[0]

    def search() -> dict[str, Any]:
        log(f"[search] {task}")
        config = SearchConfig(skip_num=search_k, update_every=settings.search_update_every,
                              train=TrainConfig(**{**asdict(train_config), "epochs": settings.search_epochs}))
        result = das_search(backbone, task, data_dir, config, progress=progress)
        write_search_outputs(result, work / "search" / task)
        return result.to_json()

    searched = _cached(work / "search" / task / "search.json", search, log, f"{task} search")
    levels = settings.skip_levels_by_task.get(task, settings.skip_levels)
    plans = {"adapters": []} | {f"skip{k}": sorted(searched["ranking"][:k]) for k in levels}
    task_report: dict[str, Any] = {"search": searched, "plans": {}}
    for name, skipped in plans.items():
        plan_dir = out / task / name
        try:
            spec = validate_plan(plan_dir, backbone)
            if list(spec.skipped_layers) != skipped:
                raise PlanError("different skip set")
            log(f"[resume] {task}/{name}: reusing the trained plan in {plan_dir}")
        except PlanError:
            log(f"[train] {task}/{name} skipping {skipped}")
            spec = train_plan(backbone, task, data_dir, skipped, train_config, out_dir=plan_dir, name=name,
                              progress=progress).spec
        evaluation = _cached(work / "eval" / task / f"{name}.json",
                             lambda: evaluate_plan_dir(plan_dir, data_dir, backbone, "test", settings.max_eval, progress),
                             log, f"{task}/{name} test evaluation")
        task_report["plans"][name] = {**evaluation, "trainable_params": spec.metrics["trainable_params"]}

    # evidence for the search: same K, same (shorter) training, searched vs random skip sets, on val
    baseline_config = TrainConfig(**{**asdict(train_config), "epochs": settings.baseline_epochs})
    rng = random.Random(seed + 17)
    others = [list(c) for c in itertools.combinations(range(backbone.num_layers), search_k) if list(c) != searched["skip_set"]]
    candidates = [searched["skip_set"]] + rng.sample(others, min(settings.random_baselines, len(others)))
    scores = []
    for skip in candidates:
        key = "-".join(map(str, skip))
        metrics = _cached(work / "baselines" / task / f"skip-{key}.json",
                          lambda: train_plan(backbone, task, data_dir, skip, baseline_config, progress=progress).metrics,
                          log, f"{task} baseline {skip}")
        scores.append({"skip": skip, "score": primary_score(task, metrics)})
    task_report["search_vs_random"] = {
        "k": search_k, "searched_skip": searched["skip_set"], "searched_score": scores[0]["score"],
        "random": scores[1:], "random_mean": sum(s["score"] for s in scores[1:]) / max(1, len(scores) - 1),
    }
    return task_report


def _write_store_state(out: Path, task: str, task_report: dict[str, Any]) -> None:
    """store.json: every trained plan loaded; active = the cheapest plan keeping >= 97% of the
    adapters-only score (or the adapters-only plan)."""
    from models.producer.train import primary_score

    path = out / "store.json"
    state = json.loads(path.read_text()) if path.is_file() else {"loaded": {}, "active": {}, "history": {}}
    plans = task_report["plans"]
    state["loaded"][task] = sorted(plans)
    reference = primary_score(task, plans["adapters"])
    keeping = [name for name, r in plans.items() if primary_score(task, r) >= 0.97 * reference]
    state["active"][task] = min(keeping, key=lambda name: plans[name]["flops_reduced"]) if keeping else "adapters"
    path.write_text(json.dumps(state, indent=2) + "\n")


def results_table(report: dict[str, Any]) -> str:
    from models.producer.train import PRIMARY_METRIC, primary_score

    lines = ["| task | plan | skipped layers | score (test) | score vs adapters-only | GFLOPs / request | FLOPs saved | trainable params |",
             "|---|---|---|---|---|---|---|---|"]
    for task, task_report in report["tasks"].items():
        reference = primary_score(task, task_report["plans"]["adapters"])
        for name, r in task_report["plans"].items():
            score = primary_score(task, r)
            metric = "mean(IR,TR) R@1" if task == "retrieval" else PRIMARY_METRIC[task]
            params = r.get("trainable_params", "")
            lines.append(
                f"| {task} | {name} | {r['skipped_layers'] or '-'} | {metric} {score:.3f} | {(score / reference if reference else float('nan')):.1%} | "
                f"{r['flops_reduced'] / 1e9:.4f} | {r['flops_saved_ratio']:.1%} | {params} |"
            )
    lines.append("")
    lines.append("Search vs random skip sets (same K, same short training, val split):")
    lines.append("")
    lines.append("| task | K | searched skip set | searched score | random skip sets (score) | random mean |")
    lines.append("|---|---|---|---|---|---|")
    for task, task_report in report["tasks"].items():
        s = task_report["search_vs_random"]
        randoms = ", ".join(f"{r['skip']} ({r['score']:.3f})" for r in s["random"])
        lines.append(f"| {task} | {s['k']} | {s['searched_skip']} | {s['searched_score']:.3f} | {randoms} | {s['random_mean']:.3f} |")
    return "\n".join(lines)


def pareto_plot(report: dict[str, Any], path: Path, title: str = "embedded default") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.producer.train import primary_score

    fig, axes = plt.subplots(1, len(report["tasks"]), figsize=(4.2 * len(report["tasks"]), 3.6))
    for ax, (task, task_report) in zip(axes, report["tasks"].items()):
        points = [(r["flops_reduced"] / 1e9, primary_score(task, r), name) for name, r in task_report["plans"].items()]
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(task)
        ax.set_xlabel("GFLOPs per request (test mean)")
        ax.set_ylabel("score" if task != "retrieval" else "mean R@1")
        ax.grid(alpha=0.3)
    fig.suptitle(f"DAS plans: accuracy vs FLOPs ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(table: str, readme: Path = REPO_ROOT / "README.md", arch: str = "vilt") -> None:
    text = readme.read_text()
    begin, finish = README_MARKERS[arch]
    block = f"{begin}\n{table}\n{finish}"
    if begin in text and finish in text:
        start, end = text.index(begin), text.index(finish) + len(finish)
        text = text[:start] + block + text[end:]
    else:
        text = text.rstrip() + "\n\n## Shipped plans\n\n" + block + "\n"
    readme.write_text(text)


def cmd_pipeline(args: argparse.Namespace) -> int:
    if args.arch == "meter":
        settings = PipelineSettings.meter(quick=args.quick)
    else:
        settings = PipelineSettings.quick() if args.quick else PipelineSettings()
    default_out, default_work = {"vilt": (SHIPPED_PLANS, "pipeline"), "meter": (SHIPPED_METER_PLANS, "pipeline-meter")}[args.arch]
    out, work = Path(args.out or default_out), Path(args.work or REPO_ROOT / "build" / default_work)
    if out.exists() and any(out.iterdir()) and not (args.force or args.resume):
        print(f"error: {out} is not empty (use --force to regenerate into it, --resume to continue)", file=sys.stderr)
        return 2
    if args.force and not args.resume and out.exists():
        for child in ("backbone", *TASKS, "store.json"):
            target = out / child
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    report = run_pipeline(out, work, settings, seed=args.seed, progress=not args.quiet)
    (out / "pipeline-report.json").write_text(json.dumps(report, indent=2) + "\n")
    table = results_table(report)
    title = {"vilt": "Shipped plans", "meter": "Shipped plans: tiny METER"}[args.arch]
    command = "das pipeline" + (" --arch meter" if args.arch == "meter" else "")
    took = f"in {report['minutes']} min" + (
        f" (this run; {report['reused_steps']} steps cached in the work directory by earlier runs were reused)"
        if report.get("reused_steps") else "")
    (out / "RESULTS.md").write_text(f"# {title}\n\nGenerated by `{command}` {took}.\n\n{table}\n\n"
                                    "![accuracy vs FLOPs](pareto.png)\n")
    pareto_plot(report, out / "pareto.png", "embedded default" if args.arch == "vilt" else "embedded tiny METER")
    if args.update_readme:
        picture = (out / "pareto.png").resolve().relative_to(REPO_ROOT) if out.resolve().is_relative_to(REPO_ROOT) else out / "pareto.png"
        update_readme(table + f"\n\n![accuracy vs FLOPs per task]({picture})", arch=args.arch)
    print(table)
    return 0


# ---------------------------------------------------------------------------------------------
# argparse registration
# ---------------------------------------------------------------------------------------------
def _training_options(parser: argparse.ArgumentParser, epochs: float) -> None:
    parser.add_argument("--backbone", help=f"backbone checkpoint directory (default: the shipped {SHIPPED_BACKBONE.relative_to(REPO_ROOT)})")
    parser.add_argument("--task", required=True, choices=TASKS, help="task to train for")
    parser.add_argument("--data", required=True, help="dataset directory (VQAv2 / NLVR2 / Flickr30K layout, or `das data synth` output)")
    parser.add_argument("--epochs", type=float, default=epochs, help=f"training epochs (default {epochs})")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--skip-bottleneck", type=int, default=64, help="skip adapter bottleneck (default 64)")
    parser.add_argument("--parallel-bottleneck", type=int, default=16, help="parallel adapter bottleneck, 0 = none (default 16)")
    parser.add_argument("--max-train", type=int, help="use at most this many training examples")
    parser.add_argument("--max-eval", type=int, help="evaluate on at most this many examples")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def register(commands: argparse._SubParsersAction) -> None:
    pretrain = commands.add_parser(
        "pretrain", help="pre-train a small ViLT or METER (ITM + MLM) on image-caption data",
        description="Pre-train a ViLT or a METER from scratch with image-text matching and masked language modelling "
                    "on a retrieval dataset (Flickr30K layout); save it in the Hugging Face layout with its tokenizer "
                    "and image processor.")
    pretrain.add_argument("--data", required=True, help="retrieval dataset directory (image-caption pairs)")
    pretrain.add_argument("--vqa-data", help="also take vocabulary words from this VQA dataset")
    pretrain.add_argument("--nlvr2-data", help="also take vocabulary words from this NLVR2 dataset")
    pretrain.add_argument("--out", required=True, help="output checkpoint directory")
    pretrain.add_argument("--epochs", type=float, default=3.0, help="epochs over the caption pairs (default 3)")
    pretrain.add_argument("--hidden-size", type=int, default=128, help="hidden size (default 128)")
    pretrain.add_argument("--arch", choices=["vilt", "meter"], default="vilt", help="architecture (default vilt)")
    pretrain.add_argument("--layers", type=int, default=8,
                          help="ViLT: encoder layers; METER: fusion layers per stream (default 8)")
    pretrain.add_argument("--vision-layers", type=int, default=2, help="METER: vision encoder layers (default 2)")
    pretrain.add_argument("--text-layers", type=int, default=2, help="METER: text encoder layers (default 2)")
    pretrain.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    pretrain.add_argument("--image-size", type=int, default=64, help="image size (default 64)")
    pretrain.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    pretrain.set_defaults(func=cmd_pretrain)

    search = commands.add_parser(
        "search", help="DAS bandit search: which layers can a task skip?",
        description="Layer significance as a k-armed bandit: trains adapters while sampling skip sets from the "
                    "gates, updates the gates by REINFORCE from validation rewards after a warm-up, and ranks the "
                    "layers. Writes search.json, gates.csv and gates.png to --out.")
    _training_options(search, epochs=1.0)
    search.add_argument("--skip-num", type=int, default=2, help="layers skipped per sampled set, and chosen (default 2)")
    search.add_argument("--update-every", type=int, default=10, help="gate update period in steps (default 10)")
    search.add_argument("--gate-lr", type=float, default=50.0, help="gate learning rate (default 50)")
    search.add_argument("--warmup", type=float, default=0.3, help="warm-up fraction of the steps (default 0.3)")
    search.add_argument("--out", required=True, help="directory for search.json, gates.csv, gates.png")
    search.set_defaults(func=cmd_search)

    train = commands.add_parser(
        "train", help="train a plan's adapters and head for a fixed skip set",
        description="Train skip adapters, parallel adapters, pooler/token types and the task head with the "
                    "backbone frozen; evaluate on val; write a validated plan directory with metrics.")
    _training_options(train, epochs=2.0)
    train.add_argument("--skip", type=layer_list, default=[], help="layers to skip, e.g. 2,5 (default none)")
    train.add_argument("--out", required=True, help="plan directory to write")
    train.add_argument("--name", default="plan", help="plan name (default 'plan')")
    train.add_argument("--version", type=int, default=1, help="plan version (default 1)")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "eval", help="a plan's task metrics and mean FLOPs on a dataset",
        description="Evaluate a plan directory (or TASK/full for a built-in plan) on a dataset split: VQA "
                    "vqa_score, NLVR2 accuracy, retrieval ir_r1/5/10 and tr_r1/5/10 (fractions), plus mean "
                    "flops_full / flops_reduced per request.")
    evaluate.add_argument("plan", help="plan directory, or TASK/full")
    evaluate.add_argument("--data", required=True, help="dataset directory")
    evaluate.add_argument("--backbone", help="backbone checkpoint directory (default: the shipped one)")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (default test)")
    evaluate.add_argument("--max-eval", type=int, help="evaluate on at most this many examples")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_eval)

    pipeline = commands.add_parser(
        "pipeline", help="regenerate the embedded default: data, backbone, search, plans, table, plot",
        description="Synthesise data, pre-train the backbone, search and train plans for every task at several "
                    "skip levels, compare the search with random skip sets, evaluate, and write RESULTS.md, "
                    "pareto.png and store.json. Deterministic given --seed. About 90 min on 2 CPU cores; "
                    "--quick runs a micro version in a minute or two.")
    pipeline.add_argument("--arch", choices=["vilt", "meter"], default="vilt",
                          help="backbone architecture: vilt (the embedded default) or meter (the tiny METER: 2-layer "
                               "encoders, 6 fusion layers per stream, searched with skip_num 4)")
    pipeline.add_argument("--out", help="plan store to write (default plans/ for vilt, plans/meter/ for meter)")
    pipeline.add_argument("--work", help="scratch directory for data and search logs (default build/pipeline, or "
                                         "build/pipeline-meter)")
    pipeline.add_argument("--quick", action="store_true", help="micro sizes, for tests and smoke runs")
    pipeline.add_argument("--force", action="store_true", help="overwrite an existing plan store")
    pipeline.add_argument("--resume", action="store_true",
                          help="continue an interrupted run: reuse the backbone, trained plans and results cached in --work")
    pipeline.add_argument("--update-readme", action="store_true", help="write the results table into README.md")
    pipeline.add_argument("--quiet", action="store_true", help="no progress bars")
    pipeline.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    pipeline.set_defaults(func=cmd_pipeline)
