"""`das flops`: analytic FLOPs of one request, per layer, full model vs a plan (reads only config.json)."""

from __future__ import annotations

import argparse
import json
import sys

from models.cli.argtypes import image_size, layer_list, non_negative_int, positive_int
from models.tasks import TASKS

EXIT_REFUSED = 2


def cmd_flops(args: argparse.Namespace) -> int:
    # heavy (torch): only when the command runs
    from models.backbones.base import backbone_class
    from models.das.plan import AdapterShapes, BackboneRef, PlanSpec, read_plan_spec

    cls = backbone_class(args.backbone)  # any registered architecture; only its config.json is read
    config = cls.load_config(args.backbone)
    arms = cls.arm_count(config)
    if args.plan:
        spec = read_plan_spec(args.plan)
        task = spec.task
        out_of_range = [i for i in spec.skipped_layers if not 0 <= i < arms]
        if out_of_range:
            print(f"error: layer index out of range: {out_of_range} (the backbone has layers "
                  f"0..{arms - 1})", file=sys.stderr)
            return EXIT_REFUSED
    else:
        task = args.task
        out_of_range = [i for i in args.skip if not 0 <= i < arms]
        if out_of_range:
            print(f"error: --skip: layer index out of range: {out_of_range} (the backbone has layers "
                  f"0..{arms - 1})", file=sys.stderr)
            return EXIT_REFUSED
        repeated = sorted({i for i in args.skip if args.skip.count(i) > 1})
        if repeated:
            print(f"error: --skip: layer indices given more than once: {repeated}", file=sys.stderr)
            return EXIT_REFUSED
        skip_bottleneck = (args.skip_bottleneck or cls.default_skip_bottleneck) if args.skip else None
        spec = PlanSpec(
            task=task, name="cli", version=1, backbone=BackboneRef(cls.architecture, ""),
            skipped_layers=tuple(args.skip),
            adapters=AdapterShapes(skip_bottleneck, args.parallel_bottleneck or None),
        )
    labels = len(spec.labels) if spec.labels else None
    if args.image_size is None:  # the resolution the backbone was trained at
        args.image_size = (config.image_size, config.image_size)
    generative = getattr(cls, "generative", False)  # LLaVA: prefill + decoded tokens
    if args.new_tokens is not None and not generative:
        print(f"error: --new-tokens: a {cls.architecture} backbone does not generate", file=sys.stderr)
        return EXIT_REFUSED
    extra = {"new_tokens": args.new_tokens} if generative and args.new_tokens is not None else {}
    report = cls.config_flops_at(config, task, spec, args.text_len, args.image_size, labels, **extra)
    result = report.to_dict()
    result.update(task=task, text_len=args.text_len, image_size=list(args.image_size),
                  skipped_layers=sorted(spec.skipped_layers))
    if generative:
        result.update(new_tokens=report.seq_lens[1] - report.seq_lens[0] + 1)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if generative:
        print(f"task {task}, {args.text_len} text tokens, image {args.image_size[0]}x{args.image_size[1]}, "
              f"{result['new_tokens']} generated tokens (prompt {report.seq_lens[0]} tokens, context "
              f"{report.seq_lens[1]} at the last step)")
    else:
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


def register(commands: argparse._SubParsersAction) -> None:
    """Add `das flops` to the `das` command line."""
    flops = commands.add_parser(
        "flops", help="analytic FLOPs of one request, full vs reduced",
        description="FLOPs of one forward pass at a given text length and image size, per layer, for the full "
                    "model and for a plan (skipped layers replaced by their adapters). 1 multiply-add = 2 FLOPs. "
                    "Reads only the backbone's config.json. Layers are the backbone's DAS arms: ViLT's encoder "
                    "layers; METER's fusion layers, text side first (0-5 text, 6-11 image for METER-B); LLaVA's "
                    "decoder blocks. METER's sequence shows text and image tokens per pass; for LLaVA --text-len "
                    "counts the prompt's text tokens (its image tokens are added) and --new-tokens the answer's.")
    flops.add_argument("--backbone", required=True, help="backbone checkpoint directory (only config.json is read)")
    flops.add_argument("--task", choices=TASKS, default="vqa",
                       help="task head to count (nlvr2 counts two passes); default vqa")
    flops.add_argument("--plan", help="take task, skipped layers and adapter sizes from this plan directory")
    flops.add_argument("--skip", type=layer_list, default=[], help="comma-separated layer indices to skip, e.g. 0,1,2,3")
    flops.add_argument("--skip-bottleneck", type=non_negative_int, default=None,
                       help="skip adapter bottleneck (default: the DAS reference's for the architecture, "
                            "192 for ViLT, 288 for METER)")
    flops.add_argument("--parallel-bottleneck", type=non_negative_int, default=0,
                       help="parallel adapter bottleneck in kept layers; 0 = none (default)")
    flops.add_argument("--text-len", type=positive_int, default=16, help="text tokens incl. [CLS]/[SEP] (default 16)")
    flops.add_argument("--image-size", type=image_size, default=None,
                       help="resized image size, 384 or HxW like 384x576 (default: the backbone's own image size, "
                            "e.g. 384 for ViLT-B/32, 96 for the embedded default)")
    flops.add_argument("--new-tokens", type=positive_int, default=None,
                       help="generative backbones (LLaVA): tokens generated after the prompt; the count is prefill "
                            "plus every decoded token (default 16)")
    flops.add_argument("--json", action="store_true", help="print one JSON object")
    flops.set_defaults(func=cmd_flops)
