"""`das llava pretrain|train|eval|pipeline`: the tiny generative (LLaVA-style) backbone and its plans
(models/producer/generative.py).

Light at import (argparse and paths only): the producer is imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.cli.argtypes import layer_list, positive_int
from models.paths import REPO_ROOT

SHIPPED_LLAVA_PLANS = REPO_ROOT / "plans" / "llava"
DEFAULT_WORK = REPO_ROOT / "build" / "llava"


def _sizes(args: argparse.Namespace):
    from models.producer import generative as g  # heavy (torch): only when a command runs

    size = g.MICRO if args.micro else g.LlavaSize()
    data = g.DataConfig(seed=args.seed, eval_seed=args.eval_seed, image_size=size.image_size,
                        **({"train_images": 60, "eval_images": 100} if args.micro else {}))
    return g, size, data


def _pretrain_config(args: argparse.Namespace):
    g, size, data = _sizes(args)
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("max_minutes", args.max_minutes)) if v is not None}
    if args.micro:
        overrides = {"max_steps": 20, "eval_every": 10, "val_examples": 30, "checkpoint_every": 10,
                     "warmup_steps": 5, **overrides}
    return g.PretrainConfig(size=size, data=data, seed=args.seed, **overrides)


def _plan_config(args: argparse.Namespace):
    from models.producer import generative as g  # heavy (torch): only when a command runs

    overrides = {"steps": 10, "eval_every": 5, "val_examples": 20, "warmup_steps": 2} if args.micro else {}
    if getattr(args, "plan_steps", None):
        overrides["steps"] = args.plan_steps
    return g.PlanTrainConfig(seed=args.seed, **overrides)


def cmd_pretrain(args: argparse.Namespace) -> int:
    g = _sizes(args)[0]
    summary = g.pretrain_llava(args.out, _pretrain_config(args), work=args.work)
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"} | {"last": summary["curve"][-1:]}, indent=2))
    return 0


def _backbone(directory: str):
    from models.backbones.base import load_backbone  # heavy (torch): only when a command runs

    return load_backbone(directory, device="cpu")


def cmd_train(args: argparse.Namespace) -> int:
    g, _, data = _sizes(args)
    backbone = _backbone(args.backbone)
    sets = g.plan_data(backbone, data)
    spec = g.train_decoder_plan(backbone, args.name, args.skip, sets["train"], sets["val"], args.out, _plan_config(args),
                              version=args.version)
    print(json.dumps({"plan": str(args.out), "metrics": spec.metrics}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from models.backbones.llava.generation import LlavaRuntime  # heavy: only when the command runs
    from models.das.plan import builtin_full_plan, load_plan

    g, _, data = _sizes(args)
    backbone = _backbone(args.backbone)
    sets = g.plan_data(backbone, data)
    runtime = LlavaRuntime(backbone)
    results = {}
    for path in args.plans:
        plan = builtin_full_plan(backbone, "vqa") if path == "full" else load_plan(path, backbone)
        results[path] = {split: g.evaluate_llava_plan(runtime, plan, sets[split]) for split in args.splits}
        if args.speed:
            results[path]["speed"] = g.measure_speed(runtime, plan, sets["test"])
    print(json.dumps(results, indent=2))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    import torch  # heavy: only when the command runs

    g = _sizes(args)[0]
    levels = tuple(args.levels) if args.levels else ((1, 2) if args.micro else (2, 4))
    search = g.SearchConfig(seed=args.seed, **({"steps": 10, "warmup_fraction": 0.2, "update_every": 2}
                                                 if args.micro else {}))
    config = g.PipelineConfig(pretrain=_pretrain_config(args), plan=_plan_config(args), search=search, levels=levels,
                              speed_requests=2 if args.micro else 40, speed_new_tokens=8 if args.micro else 24,
                              speed_repeats=1 if args.micro else 3,
                              threads=args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = tuple(args.stages.split(",")) if args.stages else g.STAGES
    unknown = set(stages) - set(g.STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(g.STAGES)}")
    report = g.run_llava_pipeline(args.out, args.work, config, resume=not args.fresh, stages=stages,
                                  redo=("speed",) if args.redo_speed else ())
    print(json.dumps({"out": str(args.out), "active": report.get("active"),
                      "plans": {n: {"skipped": p["skipped"], "val": p.get("val", {}).get("accuracy"),
                                    "test": p.get("test", {}).get("accuracy")} for n, p in report["plans"].items()}},
                     indent=2))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `das llava ...` to the `das` command line."""
    llava = commands.add_parser(
        "llava", help="the tiny generative LLaVA: pretrain, train plans, evaluate, the whole pipeline",
        description="A tiny LLaVA-style model (CLIP tower, projector, Llama decoder) trained from scratch on the "
                    "synthetic world, DAS plans over its decoder blocks, and their evaluation (docs/generative.md).")
    sub = llava.add_subparsers(dest="llava_command", metavar="SUBCOMMAND", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--seed", type=int, default=0, help="world seed of the training data (default 0)")
        parser.add_argument("--eval-seed", type=int, default=1,
                            help="world seed of the selection (val) and report (test) questions (default 1)")
        parser.add_argument("--micro", action="store_true", help="micro sizes (tests, smoke runs): seconds, not minutes")

    pretrain = sub.add_parser("pretrain", help="train the backbone from scratch (captions and VQA answers as text)")
    pretrain.add_argument("--out", required=True, help="backbone directory to write")
    pretrain.add_argument("--work", help="resumable state (default: OUT.work)")
    pretrain.add_argument("--max-steps", type=positive_int)
    pretrain.add_argument("--max-minutes", type=float)
    common(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)

    train = sub.add_parser("train", help="train one plan (skip + parallel adapters), the backbone frozen")
    train.add_argument("--backbone", required=True, help="the backbone directory")
    train.add_argument("--skip", type=layer_list, default=[], help="decoder blocks to skip, e.g. 5,6")
    train.add_argument("--name", required=True)
    train.add_argument("--version", type=positive_int, default=1)
    train.add_argument("--out", required=True, help="plan directory to write")
    train.add_argument("--plan-steps", type=positive_int)
    common(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="answer accuracy (generated, exact match) of plans on val/test")
    evaluate.add_argument("--backbone", required=True)
    evaluate.add_argument("plans", nargs="+", help="plan directories ('full' for the built-in plan)")
    evaluate.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    evaluate.add_argument("--speed", action="store_true", help="also tokens/s and time to first token at batch 1")
    common(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    pipeline = sub.add_parser(
        "pipeline", help="pretrain, search, train, evaluate, measure -> a plan store with RESULTS.md",
        description="Everything into a plan store (backbone/, vqa/<plan>/, store.json, RESULTS.md); every step's "
                    "result is kept in --work and reused on the next run (--fresh starts over).")
    pipeline.add_argument("--out", type=Path, default=SHIPPED_LLAVA_PLANS)
    pipeline.add_argument("--work", type=Path, default=DEFAULT_WORK)
    pipeline.add_argument("--levels", type=layer_list, help="skip levels (blocks skipped), default 2,4")
    pipeline.add_argument("--stages", help="comma-separated subset of pretrain,plans,eval,speed,report")
    pipeline.add_argument("--redo-speed", action="store_true", help="measure tokens/s again (a quiet moment)")
    pipeline.add_argument("--fresh", action="store_true", help="ignore what --work holds")
    pipeline.add_argument("--threads", type=positive_int, help="torch threads")
    pipeline.add_argument("--max-steps", type=positive_int, help="pre-training steps at most")
    pipeline.add_argument("--max-minutes", type=float, help="pre-training minutes at most")
    pipeline.add_argument("--plan-steps", type=positive_int, help="training steps per plan")
    common(pipeline)
    pipeline.set_defaults(func=cmd_pipeline)
