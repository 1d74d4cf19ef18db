"""`das plan inspect` and `das plan validate`: what a plan is, and every check the service makes before loading it."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only; importing it would load torch
    from models.das.plan import PlanSpec


def _describe_plan(spec: PlanSpec) -> str:
    metrics = dict(spec.metrics)
    lines = [
        f"plan        {spec.task}/{spec.name}  version {spec.version}  (format {spec.format_version})",
        f"backbone    {spec.backbone.architecture}  {spec.backbone.fingerprint}",
        f"skipped     {sorted(spec.skipped_layers) or 'none'}",
        f"adapters    skip bottleneck {spec.adapters.skip_bottleneck or '-'}, "
        f"parallel bottleneck {spec.adapters.parallel_bottleneck or '-'}",
        f"head        {'own (' + str(len(spec.labels or ())) + ' labels)' if spec.own_head else 'from the backbone'}"
        + (f"; own copies of {', '.join(spec.own_parts)}" if spec.own_parts else ""),
        f"weights     sha256 {spec.weights_sha256}",
        f"created     {spec.created_at}",
    ]
    full, reduced = metrics.pop("flops_full", None), metrics.pop("flops_reduced", None)
    if full and reduced is not None:
        ref = metrics.pop("reference_input", {})
        lines.append(
            f"FLOPs       {reduced / 1e9:.3f} G of {full / 1e9:.3f} G full, saves {1 - reduced / full:.1%}"
            + (f" at {ref}" if ref else "")
        )
    for key, value in metrics.items():
        lines.append(f"{key:<11} {value}")
    return "\n".join(lines)


def cmd_plan_inspect(args: argparse.Namespace) -> int:
    from models.das.plan import read_plan_spec  # heavy (torch): only when the command runs

    spec = read_plan_spec(args.path)
    print(json.dumps(spec.to_json_dict(), indent=2) if args.json else _describe_plan(spec))
    return 0


def cmd_plan_validate(args: argparse.Namespace) -> int:
    # heavy (torch): only when the command runs
    from models.backbones.base import load_backbone
    from models.das.plan import validate_plan

    backbone = load_backbone(args.backbone, device="cpu")
    spec = validate_plan(args.path, backbone)
    print(f"OK: plan {spec.task}/{spec.name} v{spec.version} is valid for backbone {backbone.fingerprint[:23]}...")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `das plan inspect` and `das plan validate` to the `das` command line."""
    plan = commands.add_parser("plan", help="inspect and validate plan directories",
                               description="Inspect and validate DAS plan directories (plan.json + weights.safetensors).")
    plan_commands = plan.add_subparsers(dest="plan_command", metavar="SUBCOMMAND", required=True)
    inspect = plan_commands.add_parser("inspect", help="show what a plan is",
                                       description="Show a plan's task, skipped layers, adapters, metrics. "
                                                   "Checks plan.json only; no backbone needed.")
    inspect.add_argument("path", help="plan directory")
    inspect.add_argument("--json", action="store_true", help="print plan.json as parsed, as JSON")
    inspect.set_defaults(func=cmd_plan_inspect)
    validate = plan_commands.add_parser(
        "validate", help="check a plan against a backbone",
        description="Every check the service makes before it loads a plan: files present, checksum, backbone "
                    "fingerprint, layer range, tensor names and shapes. Exit 0 if valid, 2 with the reason if not.")
    validate.add_argument("path", help="plan directory")
    validate.add_argument("--backbone", required=True, help="backbone checkpoint directory (Hugging Face layout)")
    validate.set_defaults(func=cmd_plan_validate)
