"""`das`: the DAS Serve command line.

    das plan inspect PATH [--json]           what a plan is (no backbone needed)
    das plan validate PATH --backbone DIR    every check the service makes before loading a plan
    das flops --backbone DIR --task T ...    analytic FLOPs of one request, full model vs a plan
    das bench ...                            latency vs FLOPs benchmark (see `das bench --help`)
    das data synth --task T --out DIR ...    write a synthetic VQA/NLVR2/retrieval data set
    das meter convert CKPT --out DIR         METER Lightning checkpoint -> backbone directory

Exit status: 0 on success, 2 when a plan or checkpoint is refused (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

EXIT_REFUSED = 2


def positive_int(text: str) -> int:
    """argparse type for counts and sizes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def layer_list(text: str) -> list[int]:
    """argparse type for comma-separated layer indices, e.g. `--skip 0,3,5`."""
    if not text.strip():
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,3,5; got {text!r}") from None


def _image_size(text: str) -> tuple[int, int]:
    try:
        if "x" in text:
            h, w = text.lower().split("x")
            return int(h), int(w)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an image size like 384 or 384x576; got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# das plan ...
# ---------------------------------------------------------------------------------------------
def _describe_plan(spec) -> str:
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
    from models.das.plan import read_plan_spec

    spec = read_plan_spec(args.path)
    print(json.dumps(spec.to_json_dict(), indent=2) if args.json else _describe_plan(spec))
    return 0


def cmd_plan_validate(args: argparse.Namespace) -> int:
    from models.backbones.base import load_backbone
    from models.das.plan import validate_plan

    backbone = load_backbone(args.backbone, device="cpu")
    spec = validate_plan(args.path, backbone)
    print(f"OK: plan {spec.task}/{spec.name} v{spec.version} is valid for backbone {backbone.fingerprint[:23]}...")
    return 0


# ---------------------------------------------------------------------------------------------
# das flops
# ---------------------------------------------------------------------------------------------
def cmd_flops(args: argparse.Namespace) -> int:
    from models.backbones.base import backbone_class
    from models.das.plan import AdapterShapes, BackboneRef, PlanSpec, read_plan_spec

    cls = backbone_class(args.backbone)  # any registered architecture; only its config.json is read
    config = cls.load_config(args.backbone)
    if args.plan:
        spec = read_plan_spec(args.plan)
        task = spec.task
    else:
        task = args.task
        skip_bottleneck = (args.skip_bottleneck or cls.default_skip_bottleneck) if args.skip else None
        spec = PlanSpec(
            task=task, name="cli", version=1, backbone=BackboneRef(cls.architecture, ""),
            skipped_layers=tuple(args.skip),
            adapters=AdapterShapes(skip_bottleneck, args.parallel_bottleneck or None),
        )
    arms = cls.arm_count(config)
    out_of_range = [i for i in spec.skipped_layers if not 0 <= i < arms]
    if out_of_range:
        print(f"error: layer index out of range: {out_of_range} (the backbone has layers "
              f"0..{arms - 1})", file=sys.stderr)
        return EXIT_REFUSED
    labels = len(spec.labels) if spec.labels else None
    if args.image_size is None:  # the resolution the backbone was trained at
        args.image_size = (config.image_size, config.image_size)
    report = cls.config_flops_at(config, task, spec, args.text_len, args.image_size, labels)
    result = report.to_dict()
    result.update(task=task, text_len=args.text_len, image_size=list(args.image_size),
                  skipped_layers=sorted(spec.skipped_layers))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"task {task}, {args.text_len} text tokens, image {args.image_size[0]}x{args.image_size[1]} "
          f"(sequence {', '.join(map(str, report.seq_lens))})")
    print(f"{'layer':>5}  {'full GFLOPs':>12}  {'executed':>12}")
    names = cls.arm_names(config)
    for layer in report.per_layer:
        mark = "  skipped -> adapter" if layer.skipped else ""
        name = f"  {names[layer.index]}" if names[layer.index] else ""
        print(f"{layer.index:>5}  {layer.full / 1e9:>12.4f}  {layer.executed / 1e9:>12.4f}{name}{mark}")
    print(f"total: full {report.full / 1e9:.4f} G, executed {report.executed / 1e9:.4f} G, "
          f"saved {report.saved_ratio:.2%}  (1 multiply-add = 2 FLOPs)")
    return 0


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="das", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `das COMMAND --help` for each command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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

    flops = commands.add_parser(
        "flops", help="analytic FLOPs of one request, full vs reduced",
        description="FLOPs of one forward pass at a given text length and image size, per layer, for the full "
                    "model and for a plan (skipped layers replaced by their adapters). 1 multiply-add = 2 FLOPs. "
                    "Reads only the backbone's config.json. Layers are the backbone's DAS arms: ViLT's encoder "
                    "layers; METER's fusion layers, text side first (0-5 text, 6-11 image for METER-B); METER's "
                    "sequence shows text and image tokens per pass.")
    flops.add_argument("--backbone", required=True, help="backbone checkpoint directory (only config.json is read)")
    flops.add_argument("--task", choices=["vqa", "nlvr2", "retrieval"], default="vqa",
                       help="task head to count (nlvr2 counts two passes); default vqa")
    flops.add_argument("--plan", help="take task, skipped layers and adapter sizes from this plan directory")
    flops.add_argument("--skip", type=layer_list, default=[], help="comma-separated layer indices to skip, e.g. 0,1,2,3")
    flops.add_argument("--skip-bottleneck", type=int, default=None,
                       help="skip adapter bottleneck (default: the DAS reference's for the architecture, "
                            "192 for ViLT, 288 for METER)")
    flops.add_argument("--parallel-bottleneck", type=int, default=0,
                       help="parallel adapter bottleneck in kept layers; 0 = none (default)")
    flops.add_argument("--text-len", type=int, default=16, help="text tokens incl. [CLS]/[SEP] (default 16)")
    flops.add_argument("--image-size", type=_image_size, default=None,
                       help="resized image size, 384 or HxW like 384x576 (default: the backbone's own image size, "
                            "e.g. 384 for ViLT-B/32, 96 for the embedded default)")
    flops.add_argument("--json", action="store_true", help="print one JSON object")
    flops.set_defaults(func=cmd_flops)

    for register in _EXTRA_COMMANDS:
        register(commands)
    return parser


# Other modules add commands here (e.g. the benchmark), keeping their imports lazy.
def _register_bench(commands: argparse._SubParsersAction) -> None:
    try:
        from models.bench.run import register
    except ImportError:
        return
    register(commands)


def _register_producer(commands: argparse._SubParsersAction) -> None:
    from models.producer.pipeline import register

    register(commands)


def _register_world(commands: argparse._SubParsersAction) -> None:
    from models.producer.world.language import register

    register(commands)


def _register_meter(commands: argparse._SubParsersAction) -> None:
    from models.backbones.meter.convert import register

    register(commands)


_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_bench, _register_producer, _register_world, _register_meter]


def main(argv: Sequence[str] | None = None) -> int:
    from models.backbones.base import BackboneError
    from models.das.plan import PlanError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PlanError, BackboneError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
