"""`das data synth`: write a synthetic VQA / NLVR2 / retrieval data set (models/producer/world/)."""

from __future__ import annotations

import argparse
import sys

import models.producer.world as world  # the package docstring only (its modules load when the command runs)
from models.cli.argtypes import positive_int, split_fraction
from models.tasks import TASKS


def cmd_data_synth(args: argparse.Namespace) -> int:
    # here, not at the top: numpy and PIL only when the command runs
    from models.producer.world.export import synthesize
    from models.producer.world.scenes import WorldConfig

    try:
        config = WorldConfig(image_size=args.image_size, min_objects=args.min_objects,
                             max_objects=args.max_objects, noise=args.noise)
        meta = synthesize(args.task, args.out, args.n, args.seed, config, val_fraction=args.val_fraction,
                          test_fraction=args.test_fraction, questions_per_image=args.questions_per_image,
                          statements_per_pair=args.statements_per_pair,
                          progress=not args.quiet, force=args.force)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    splits = meta["splits"]
    print(f"wrote {meta['n']} {meta['unit']} of synthetic {meta['task']} ({meta['format']} format, "
          f"{meta['images']} images of {meta['image_size']} px) to {args.out}: train {splits['train']}, "
          f"val {splits['val']}, test {splits['test']}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `das data synth` to the `das` command line."""
    data = commands.add_parser("data", help="synthetic data sets",
                               description="Data sets for pre-training and for training DAS plans offline.")
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    synth = data_commands.add_parser(
        "synth", help="write a synthetic VQA / NLVR2 / retrieval data set",
        description=world.__doc__.split("\n", 1)[1].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_argument("--task", required=True, choices=TASKS, help="which task's data set to write")
    synth.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty or absent)")
    synth.add_argument("--n", type=positive_int, default=20000,
                       help="questions (vqa), statements (nlvr2) or images (retrieval); default 20000")
    synth.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    synth.add_argument("--image-size", type=positive_int, default=96, help="image side in pixels (default 96)")
    synth.add_argument("--val-fraction", type=split_fraction, default=0.1, help="fraction of units in val (default 0.1)")
    synth.add_argument("--test-fraction", type=split_fraction, default=0.1, help="fraction of units in test (default 0.1)")
    synth.add_argument("--questions-per-image", type=positive_int, default=3, help="vqa only (default 3, at most 10)")
    synth.add_argument("--statements-per-pair", type=positive_int, default=2,
                       help="nlvr2 only: statements sharing one image pair, alternately true and false "
                            "(default 2, at most 10)")
    synth.add_argument("--min-objects", type=positive_int, default=1, help="objects per scene, at least (default 1)")
    synth.add_argument("--max-objects", type=positive_int, default=4, help="objects per scene, at most (default 4)")
    synth.add_argument("--noise", type=int, default=8, help="pixel noise amplitude, 0-255 units (default 8)")
    synth.add_argument("--force", action="store_true", help="write into a non-empty directory")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=cmd_data_synth)


