"""`das`: the DAS Serve command line.

    das plan inspect PATH [--json]           what a plan is (no backbone needed)
    das plan validate PATH --backbone DIR    every check the service makes before loading a plan
    das flops --backbone DIR --task T ...    analytic FLOPs of one request, full model vs a plan
    das bench ...                            latency vs FLOPs benchmark (see `das bench --help`)
    das data synth --task T --out DIR ...    write a synthetic VQA/NLVR2/retrieval data set
    das meter convert CKPT --out DIR         METER Lightning checkpoint -> backbone directory
    das lavin convert CKPT... --out DIR      LaVIN's released .pth layout -> backbone directory
    das llava pipeline|pretrain|train|eval   the tiny generative LLaVA and its plans (plans/llava/)

Exit status: 0 on success, 2 when a plan or checkpoint is refused (the message says why).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# Each command group's module is light (argparse, paths, argtypes): the heavy libraries (torch,
# transformers) are imported inside the function that runs a command, so `das --help` is instant.
from models.cli import bench, data, flops, generative, lavin, meter, plan, producer

EXIT_REFUSED = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="das", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `das COMMAND --help` for each command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (plan, flops, bench, producer, data, meter, lavin, generative):
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # here, not at the top: after parsing, so that --help never loads torch
    from models.backbones.base import BackboneError
    from models.das.plan import PlanError
    from models.producer.engine import RunError

    try:
        return args.func(args)
    except (PlanError, BackboneError, RunError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
