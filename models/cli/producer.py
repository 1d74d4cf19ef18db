"""`das pretrain`, `das search`, `das train`, `das eval`, `das pipeline`: producing plans.

`das search`, `das train` and `das pretrain` run under torchrun too (data parallel):
``torchrun --nproc-per-node N --no-python das train ...``; --batch-size is then the global batch.

Light at import (argparse and paths only): the producer is imported when a command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from models.cli.argtypes import layer_list, non_negative_int, positive_float, positive_int, stem_channels
from models.paths import REPO_ROOT, SHIPPED_BACKBONE, SHIPPED_METER_PLANS, SHIPPED_PLANS
from models.tasks import TASKS

if TYPE_CHECKING:  # annotations only; importing them would load torch
    from models.backbones.base import Backbone
    from models.producer.runs import TrainConfig


def _train_config(args: argparse.Namespace) -> TrainConfig:
    from models.producer.runs import TrainConfig  # heavy (models.das.plan loads torch): only when a command runs

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, skip_bottleneck=args.skip_bottleneck,
        parallel_bottleneck=args.parallel_bottleneck or None, max_train_examples=args.max_train,
        max_eval_examples=args.max_eval, seed=args.seed, precision=args.precision, workers=args.workers,
        checkpoint_every=args.checkpoint_every, checkpoint_dir=str(_checkpoint_dir(args)) if _checkpoint_dir(args) else None,
        resume=args.resume, train_mma_adapters=getattr(args, "train_mma", False),
    )


def _checkpoint_dir(args: argparse.Namespace) -> Path | None:
    """--checkpoint-dir, else <out>.ckpt beside --out when checkpoints are asked for."""
    if args.checkpoint_dir:
        return Path(args.checkpoint_dir)
    if args.checkpoint_every or args.resume:
        out = Path(args.out)
        return out.with_name(out.name + ".ckpt")
    return None


def _run_device(args: argparse.Namespace):
    """The device this process trains on (under torchrun on CUDA: cuda:LOCAL_RANK), the precision checked."""
    from models.producer.engine import check_precision, resolve_run_device  # heavy (torch): only when it runs

    device = resolve_run_device(args.device)
    check_precision(args.precision, device)
    return device


def _load(backbone_dir: str | Path | None, device="cpu") -> Backbone:
    from models.backbones.base import load_backbone  # heavy (torch): only when a command runs

    return load_backbone(backbone_dir or SHIPPED_BACKBONE, device=device)


def _is_main() -> bool:
    from models.producer.engine import world_from_env  # heavy (torch): only when a command runs

    return world_from_env().is_main


def _close() -> None:
    from models.producer.engine import close_world  # heavy (torch): only when a command runs

    close_world()


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def cmd_pretrain(args: argparse.Namespace) -> int:
    from models.producer.pretrain import PretrainConfig, pretrain_backbone  # heavy: only when the command runs

    if args.conv_stem and (problem := _stem_problem(args.conv_stem, args.patch_size)):
        hint = "" if args.conv_stem is not None else " (the recipe's stem: give --conv-stem widths for this patch size, or none)"
        print(f"error: --conv-stem: {problem}{hint}", file=sys.stderr)
        return 2
    checkpoint_dir = _checkpoint_dir(args)
    config = PretrainConfig(arch=args.arch, epochs=args.epochs, seed=args.seed, hidden_size=args.hidden_size,
                            num_layers=args.layers, vision_layers=args.vision_layers, text_layers=args.text_layers,
                            num_heads=args.heads, intermediate_size=4 * args.hidden_size, image_size=args.image_size,
                            batch_size=args.batch_size, device=args.device, precision=args.precision,
                            workers=args.workers, checkpoint_every=args.checkpoint_every,
                            checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, resume=args.resume,
                            patch_size=args.patch_size, conv_stem_channels=args.conv_stem,
                            patch_shape_weight=args.patch_shape_weight, patch_color_weight=args.patch_color_weight,
                            init_from=str(args.init_from) if args.init_from else None)
    extra = {task: Path(d) for task, d in (("vqa", args.vqa_data), ("nlvr2", args.nlvr2_data)) if d}
    try:
        summary = pretrain_backbone(args.data, args.out, config, extra_text_dirs=extra)
    finally:
        _close()
    if not _is_main():  # rank 0 alone writes the checkpoint and reports
        return 0
    print(json.dumps({"out": str(args.out), **summary}, indent=2))
    return 0


def _stem_problem(channels: tuple[int, ...], patch_size: int) -> str | None:
    from models.backbones.conv_stem import check_conv_stem  # heavy (torch): only when the command runs

    try:
        check_conv_stem(channels, patch_size)
    except ValueError as exc:
        return str(exc)
    return None


def cmd_search(args: argparse.Namespace) -> int:
    from models.producer.search import SearchConfig, das_search, write_search_outputs  # heavy: only when it runs

    backbone = _load(args.backbone, _run_device(args))
    config = SearchConfig(skip_num=args.skip_num, update_every=args.update_every, gate_lr=args.gate_lr,
                          warmup_fraction=args.warmup, objective=args.objective, flops_budget=args.flops_budget,
                          train=_train_config(args))
    try:
        result = das_search(backbone, args.task, args.data, config)
    finally:
        _close()
    if not _is_main():  # rank 0 alone writes and reports
        return 0
    files = write_search_outputs(result, args.out)
    print(f"ranking (most skippable first): {result.ranking}")
    print(f"gates: {result.gates}")
    saved = sum(result.savings[i] for i in result.skip_set)
    print(f"chosen skip set (skip_num={result.skip_num}, objective {result.objective}): {result.skip_set}, "
          f"saving {saved:.1%} of the FLOPs")
    print(f"wrote {files['json']}, {files['csv']}, {files['png']}")
    print(f"next: das train --backbone {args.backbone or SHIPPED_BACKBONE} --task {args.task} --data {args.data} "
          f"--skip {','.join(map(str, result.skip_set))} --out <plan dir>")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.producer.train import train_plan  # heavy: only when the command runs

    backbone = _load(args.backbone, _run_device(args))
    try:
        result = train_plan(backbone, args.task, args.data, args.skip, _train_config(args), out_dir=args.out,
                            name=args.name, version=args.version)
    finally:
        _close()
    if not _is_main():  # rank 0 alone writes the plan and reports
        return 0
    print(json.dumps({"plan": str(args.out), "metrics": result.spec.metrics, "throughput": result.timing}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    # heavy (torch): only when the command runs
    from models.producer.evaluate import backbone_dir_for_plan, check_default_backbone, evaluate_plan_dir

    backbone_dir = Path(args.backbone) if args.backbone else backbone_dir_for_plan(args.plan)
    backbone = _load(backbone_dir, _run_device(args))
    if not args.backbone:
        check_default_backbone(args.plan, backbone, backbone_dir)
    result = evaluate_plan_dir(args.plan, args.data, backbone, args.split, args.max_eval, progress=not args.json,
                               workers=args.workers, precision=args.precision)
    if args.json:
        print(json.dumps(result))
        return 0
    intervals = result.get("intervals", {})
    for key, value in result.items():
        if key == "intervals":
            continue
        if key in intervals:
            low, high = intervals[key]
            print(f"{key:<18} {value:.4f}  95% CI [{low:.4f}, {high:.4f}]")
        elif key == "n":
            print(f"{key:<18} {value}" + ("  (gallery size)" if result.get("task") == "retrieval" else "  (examples)"))
        else:
            print(f"{key:<18} {value:.4f}" if isinstance(value, float) else f"{key:<18} {value}")
    print("(95% CI: percentile bootstrap over the examples, 1000 resamples, seed 0)")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    # heavy (torch): only when the command runs
    from models.producer.pipeline import PipelineSettings, clear_store, compare_store_objectives, remeasure_store, run_pipeline
    from models.producer.report import objectives_table, write_reports

    if args.arch == "meter":
        settings = PipelineSettings.meter(quick=args.quick)
    else:
        settings = PipelineSettings.quick() if args.quick else PipelineSettings()
    overrides = {key: getattr(args, key) for key in ("image_size", "patch_size", "precision") if getattr(args, key) is not None}
    if args.conv_stem is not None:
        overrides["conv_stem_channels"] = args.conv_stem
    for key in ("patch_shape_weight", "patch_color_weight", "pretrain_epochs"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    settings = dataclasses.replace(settings, **overrides)
    if settings.image_size % settings.patch_size:
        print(f"error: --patch-size {settings.patch_size} does not divide the image size {settings.image_size}",
              file=sys.stderr)
        return 2
    if settings.conv_stem_channels and (problem := _stem_problem(settings.conv_stem_channels, settings.patch_size)):
        hint = "" if args.conv_stem is not None else " (the recipe's stem: give --conv-stem widths for this patch size, or none)"
        print(f"error: --conv-stem: {problem}{hint}", file=sys.stderr)
        return 2
    default_out, default_work = {"vilt": (SHIPPED_PLANS, "pipeline"), "meter": (SHIPPED_METER_PLANS, "pipeline-meter")}[args.arch]
    out, work = Path(args.out or default_out), Path(args.work or REPO_ROOT / "build" / default_work)
    if (args.compare_objectives or args.remeasure) and not (out / "store.json").is_file():
        what = "compare the search objectives on" if args.compare_objectives else "re-measure"
        print(f"error: {out} is no plan store (no store.json) to {what}", file=sys.stderr)
        return 2
    if args.compare_objectives:
        comparison = compare_store_objectives(out, work, settings, seed=args.seed, progress=not args.quiet)
        (work / "objectives.json").write_text(json.dumps(comparison, indent=2) + "\n")
        print(objectives_table(comparison))
        print(f"wrote {work / 'objectives.json'}")
        return 0
    if args.remeasure:
        report = remeasure_store(out, work, settings, seed=args.seed, progress=not args.quiet)
        (out / "pipeline-report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(write_reports(report, out, args.arch))
        return 0
    if out.exists() and any(out.iterdir()) and not (args.force or args.resume):
        print(f"error: {out} is not empty (use --force to regenerate into it, --resume to continue)", file=sys.stderr)
        return 2
    if args.force and not args.resume and out.exists():
        clear_store(out)
    out.mkdir(parents=True, exist_ok=True)
    report = run_pipeline(out, work, settings, seed=args.seed, progress=not args.quiet)
    (out / "pipeline-report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(write_reports(report, out, args.arch))
    return 0


# ---------------------------------------------------------------------------------------------
# argparse
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
    _run_options(parser)
    _checkpoint_options(parser)


def _checkpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-every", type=positive_int, metavar="STEPS",
                        help="write a checkpoint (trainable parts, optimizer, scheduler, RNG, data position) every "
                             "STEPS steps and at the end")
    parser.add_argument("--checkpoint-dir", help="where checkpoints go (default: <out>.ckpt beside --out)")
    parser.add_argument("--resume", action="store_true",
                        help="go on from the last checkpoint in the checkpoint directory (a fresh start if there is none)")


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (CUDA when present), cpu or cuda; under torchrun on CUDA each process takes "
                             "cuda:LOCAL_RANK (default auto)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="fp32, or autocast in bf16 (CPU or CUDA) or fp16 (CUDA only, with a GradScaler); "
                             "trainable parts stay fp32 (default fp32)")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="DataLoader worker processes that decode and preprocess (default 0: in the main process)")


def register(commands: argparse._SubParsersAction) -> None:
    """Add `das pretrain`, `das search`, `das train`, `das eval` and `das pipeline`."""
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
    pretrain.add_argument("--patch-size", type=positive_int, default=16, help="ViLT patch size in px (default 16)")
    pretrain.add_argument("--conv-stem", type=stem_channels, default=(), metavar="CHANNELS",
                          help="a convolutional stem of these widths (3x3 stride-2 convolutions, log2(patch size) of "
                               "them, e.g. 16,32,64,128 for 16 px patches) in place of the linear patch embedding (ViLT's, "
                               "or METER's vision encoder's); 'none' (default) keeps the linear embedding")
    pretrain.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    pretrain.add_argument("--batch-size", type=positive_int, default=48,
                          help="batch size (default 48; under torchrun the global batch)")
    pretrain.add_argument("--patch-shape-weight", type=float, default=0.0,
                          help="weight of patch shape classification: every image patch an object covers predicts "
                               "that object's shape, where the data set records its scenes (synthetic data); "
                               "0 = off (default)")
    pretrain.add_argument("--patch-color-weight", type=float, default=0.0,
                          help="weight of patch colour classification, the same way: every image patch an object "
                               "covers predicts that object's colour; 0 = off (default)")
    pretrain.add_argument("--init-from", type=Path,
                          help="ViLT backbone directory to go on pre-training from (its weights, vocabulary and ITM "
                               "head; sizes must match); default: random weights")
    _run_options(pretrain)
    _checkpoint_options(pretrain)
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
    search.add_argument("--objective", choices=["reward", "reward-per-flop"], default="reward",
                        help="reward: the reference bandit (sets of --skip-num arms, the largest gates win); "
                             "reward-per-flop: sets drawn to save what --skip-num average arms save, and the final "
                             "set the least-damage one saving that much, so costly arms count for what they save "
                             "(docs/plans.md gives the formula; on ViLT, whose layers all cost the same, both agree) "
                             "(default reward)")
    search.add_argument("--flops-budget", type=float, metavar="SHARE",
                        help="reward-per-flop only: the share of the FLOPs (0-1) every sampled and the final set "
                             "must save (default: what --skip-num average layers save)")
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
    train.add_argument("--train-mma", action="store_true",
                       help="LaVIN: the plan carries its own copies of the kept decoder blocks' mixture-of-modality "
                            "adapters, started from the checkpoint's and trained with the skip adapters, as LaVIN-DAS "
                            "does (the backbone's stay as converted); refused for other backbones")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "eval", help="a plan's task metrics and mean FLOPs on a dataset",
        description="Evaluate a plan directory (or TASK/full for a built-in plan) on a dataset split: VQA "
                    "vqa_score, NLVR2 accuracy, retrieval ir_r1/5/10 and tr_r1/5/10 (fractions; on synthetic data "
                    "also ir_true_r1 and tr_true_r1, R@1 counting any true pair), plus mean "
                    "flops_full / flops_reduced per request.")
    evaluate.add_argument("plan", help="plan directory, or TASK/full")
    evaluate.add_argument("--data", required=True, help="dataset directory")
    evaluate.add_argument("--backbone", help="backbone checkpoint directory (default: the backbone of the plan store "
                                             "the plan lies in, <store>/backbone; else the shipped one)")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (default test)")
    evaluate.add_argument("--max-eval", type=int, help="evaluate on at most this many examples")
    evaluate.add_argument("--json", action="store_true",
                          help="print one JSON object: every metric a plain number, plus n and intervals ({metric: [low, high]})")
    _run_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    pipeline = commands.add_parser(
        "pipeline", help="regenerate the embedded default: data, backbone, search, plans, table, plot",
        description="Synthesise data, pre-train the backbone, search and train plans for every task at several "
                    "skip levels, compare the search with random skip sets, evaluate, and write RESULTS.md, "
                    "pareto.png and store.json. Deterministic given --seed. About 3.3 h on 2 CPU cores (resumable); "
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
    pipeline.add_argument("--remeasure", action="store_true",
                          help="no training: regenerate the synthetic data (same seed and sizes) into --work, evaluate "
                               "every plan of the store on val and test, write val metrics with n and 95%% intervals "
                               "into each plan.json, re-decide store.json's active plans on val, rewrite RESULTS.md")
    pipeline.add_argument("--compare-objectives", action="store_true",
                          help="no plans: on the store's backbone, run the search with both objectives (reward, "
                               "reward-per-flop) for every task, train each one's skip set at equal FLOPs saved with the "
                               "short baseline training, and print their val scores (--work/objectives.json)")
    pipeline.add_argument("--quiet", action="store_true", help="no progress bars")
    pipeline.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    pipeline.add_argument("--image-size", type=positive_int,
                          help="images of the synthetic data and the backbone, in px (default: the recipe's; 128 for "
                               "both embedded backbones)")
    pipeline.add_argument("--patch-size", type=positive_int,
                          help="the backbone's patch size in px; must divide the image size (default: the recipe's, 16)")
    pipeline.add_argument("--conv-stem", type=stem_channels, metavar="CHANNELS",
                          help="the backbone's convolutional stem widths (ViLT, or METER's vision encoder; log2(patch size) 3x3 stride-2 "
                               "convolutions, e.g. 16,32,64,128), or 'none' for the linear patch embedding (default: "
                               "the recipe's)")
    pipeline.add_argument("--patch-shape-weight", type=float, metavar="W",
                          help="pre-training's patch shape classification weight (see das pretrain; 0 = off; "
                               "default: the recipe's)")
    pipeline.add_argument("--patch-color-weight", type=float, metavar="W",
                          help="pre-training's patch colour classification weight (see das pretrain; 0 = off; "
                               "default: the recipe's)")
    pipeline.add_argument("--pretrain-epochs", type=positive_float, metavar="E",
                          help="pre-training epochs over the caption pairs (default: the recipe's, 0.7)")
    pipeline.add_argument("--precision", choices=["fp32", "bf16"],
                          help="fp32, or bf16 autocast for pre-training, training and evaluation (default: the "
                               "recipe's, fp32)")
    pipeline.set_defaults(func=cmd_pipeline)
