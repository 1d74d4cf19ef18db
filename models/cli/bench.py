"""`das bench`: latency vs FLOPs of DAS plans (the benchmark itself is models/bench/)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import models.bench  # the package docstring only (its modules load when the command runs)
from models.cli.argtypes import fraction, non_negative_int, positive_int, positive_int_list

DEFAULT_SKIPS = (2, 4, 6)
DEFAULT_BATCH_SIZES = (1, 32)


def cmd_bench(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.producer:
        return cmd_bench_producer(args)
    # heavy (torch): only when the command runs
    from models.bench.fixtures import log
    from models.bench.report import busy_warning, describe_machine, markdown_table, output_stem, write_outputs
    from models.bench.run import BenchOptions, run_benchmark

    if args.generation:
        return cmd_bench_generation(args)
    if args.arch == "meter" and args.size == "embedded":
        print("error: --size embedded is the shipped ViLT; use --arch vilt with it", file=sys.stderr)
        return 2
    if args.compile and args.size == "base" and args.repeats is None:
        log("note: --compile compiles one graph per plan and batch size; the first rounds take minutes")
    options = BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions)})
    result = run_benchmark(options)
    print(describe_machine(result))
    print()
    print(markdown_table(result["rows"]))
    warning = busy_warning(result)
    if warning:
        print("\n" + warning)
    if args.out:
        write_outputs(result, Path(args.out))
        stem = Path(args.out) / output_stem(args.size, args.arch)
        print(f"\nwrote {stem}.json and {stem}.md")
    return 0


def cmd_bench_generation(args: argparse.Namespace) -> int:
    # heavy (torch): only when the command runs
    from models.bench.generation import GenerationOptions, markdown, run_generation_benchmark, write_outputs

    options = GenerationOptions(
        short=args.short or args.size == "tiny", device=args.device, dtype=args.dtype, skips=list(args.skips),
        placement=args.placement, repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens, threads=args.threads,
    )
    result = run_generation_benchmark(options)
    print(markdown(result))
    if args.out:
        stem = write_outputs(result, Path(args.out))
        print(f"wrote {stem}.json and {stem}.md")
    return 0


def cmd_bench_producer(args: argparse.Namespace) -> int:
    # heavy (torch): only when the command runs
    from models.bench.producer import ProducerBenchOptions, producer_table, run_producer_bench, write_producer_outputs

    options = ProducerBenchOptions(sizes=tuple(args.producer_sizes), batch_size=args.producer_batch,
                                   steps=args.producer_steps, short=args.short, ddp=not args.no_ddp,
                                   workers=args.workers, device=args.device, dtype=args.dtype, threads=args.threads)
    result = run_producer_bench(options)
    print(producer_table(result))
    if args.out:
        json_path, md_path = write_producer_outputs(result, Path(args.out))
        print(f"\nwrote {json_path} and {md_path}")
    return 0


def _sizes(text: str) -> list[str]:
    sizes = [part.strip() for part in text.split(",") if part.strip()]
    if not sizes or any(s not in ("embedded", "base", "tiny") for s in sizes):
        raise argparse.ArgumentTypeError(f"expected sizes among embedded, base, tiny like embedded,base; got {text!r}")
    return sizes


def register(commands: argparse._SubParsersAction) -> None:
    """Add `das bench` to the `das` command line."""
    bench = commands.add_parser(
        "bench",
        help="latency vs FLOPs of DAS plans on a ViLT-B/32-size backbone (a benchmark, not a test)",
        description=models.bench.__doc__.split("\n", 1)[1].strip() + (
            "\n\nThe default run (ViLT-B/32 size, batches 1 and 32, on CPU) takes about 4 minutes on 2\n"
            "CPU cores; `--size tiny` is a smoke run of a few seconds. `make bench-runtime` runs\n"
            "`das bench --out bench-results`."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--size", choices=["base", "tiny", "embedded"], default="base",
                       help="base: ViLT-B/32 size (default); tiny: a small 12-layer config for a quick smoke run; "
                            "embedded: the shipped plans/backbone with its trained VQA plans skip2 and skip4 "
                            "(--skips and --placement do not apply)")
    bench.add_argument("--arch", choices=["vilt", "meter"], default="vilt",
                       help="vilt (default): ViLT-B/32 size; meter: METER-B size (CLIP-ViT-B/16 at 288 px, "
                            "RoBERTa-base, 6+6 fusion layers = 12 arms, skip bottleneck 288), results in "
                            "bench-runtime-meter.{json,md}")
    bench.add_argument("--batch-sizes", type=positive_int_list, default=list(DEFAULT_BATCH_SIZES),
                       metavar="N,N", help="comma-separated batch sizes (default 1,32)")
    bench.add_argument("--skips", type=positive_int_list, default=list(DEFAULT_SKIPS), metavar="K,K",
                       help="numbers of layers the benchmarked plans skip, beside the full plan (default 2,4,6)")
    bench.add_argument("--placement", choices=["even", "last"], default="even",
                       help="which layers are skipped: even = spread over the depth, ending with the last "
                            "(skip 4 of 12 -> 2,5,8,11; default); last = the last K layers")
    bench.add_argument("--repeats", type=positive_int, default=None,
                       help="timed runs per plan and batch size; latency is their median "
                            "(default: 25 at batch 1, 12 at batch <= 8, 5 above)")
    bench.add_argument("--warmup", type=non_negative_int, default=None,
                       help="untimed warm-up rounds (each runs every plan once) per batch size "
                            "(default: 3 at batch 1, 1 above)")
    bench.add_argument("--max-others-cpu", type=fraction, default=0.05, metavar="F",
                       help="a timed round in which other processes used more than this share of all CPUs "
                            "(read from /proc/stat) counts as busy and is replaced by an extra round; the "
                            "quietest --repeats rounds are kept (default 0.05; 1 turns this off)")
    bench.add_argument("--extra-rounds", type=non_negative_int, default=None, metavar="N",
                       help="at most this many extra rounds per batch size to replace busy ones "
                            "(default: as many as --repeats)")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto = CUDA if available, else CPU (default auto)")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                       help="backbone and adapter dtype (default float32)")
    bench.add_argument("--threads", type=positive_int, default=None,
                       help="torch intra-op threads (default: torch's default, one per core)")
    bench.add_argument("--compile", action="store_true",
                       help="also time the forward under torch.compile (an extra set of rows; compiling "
                            "takes minutes at base size)")
    bench.add_argument("--out", metavar="DIR",
                       help="also write DIR/bench-runtime.json (every timing) and DIR/bench-runtime.md")
    generation = bench.add_argument_group(
        "generation", "--generation: decode tokens/s and time to first token of plans on a random ~1B LaVIN "
                      "(models/bench/generation.py); --skips, --placement, --repeats, --warmup, --device, --dtype, "
                      "--threads and --out apply")
    generation.add_argument("--generation", action="store_true",
                            help="run the generation benchmark instead (writes bench-generation.{json,md} with --out)")
    generation.add_argument("--short", action="store_true",
                            help="a quick run: with --generation a tiny LaVIN, 4 new tokens, 2 rounds (seconds); with "
                                 "--producer fewer steps")
    generation.add_argument("--new-tokens", type=positive_int, default=None,
                            help="with --generation: tokens generated per request (default 32)")
    generation.add_argument("--prompt-tokens", type=positive_int, default=None,
                            help="with --generation: prompt text tokens (default 128, a ScienceQA-like prompt)")
    producer = bench.add_argument_group(
        "producer row (--producer)",
        "Training throughput of `das train` (1 process and 2-process DDP under torchrun) against the same plan's "
        "forward+backward on pre-made tensors; results in bench-producer.{json,md}. See models/bench/producer.py.")
    producer.add_argument("--producer", action="store_true", help="run the producer row instead of the latency benchmark")
    producer.add_argument("--producer-sizes", type=_sizes, default=["embedded", "base"], metavar="S,S",
                          help="embedded (the shipped backbone), base (ViLT-B/32 size), tiny (default embedded,base)")
    producer.add_argument("--producer-batch", type=positive_int, default=8, help="global batch size (default 8)")
    producer.add_argument("--producer-steps", type=positive_int, default=None,
                          help="timed steps per measurement (default 30; 6 with --short)")
    producer.add_argument("--workers", type=non_negative_int, default=2,
                          help="DataLoader workers per process of das train (default 2)")
    producer.add_argument("--no-ddp", action="store_true", help="leave out the 2-process DDP row")
    bench.set_defaults(func=cmd_bench)
