"""`das bench` itself: the model-level benchmark (see ``models/bench/__init__.py``)."""

from __future__ import annotations

import datetime as _dt
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.backbones.base import resolve_device, resolve_dtype
from models.bench.fixtures import (
    TEXT_TOKENS,
    WORDS,
    build_backbone,
    build_plans,
    embedded_plans,
    log,
    make_images,
    make_questions,
    single_token_words,
)
from models.bench.timing import (
    CpuMonitor,
    efficiency_interval,
    load_average,
    machine_info,
    quartiles,
    time_round_robin,
)
from models.producer.world.language import world_vocabulary  # the embedded default's words
from models.runtime import DASRuntime

TARGET_LARGE_BATCH = 32


@dataclass
class BenchOptions:
    """What a run measures (the `das bench` options)."""

    arch: str = "vilt"  # vilt | meter
    size: str = "base"  # base | tiny | embedded
    batch_sizes: tuple[int, ...] = (1, 32)
    skips: tuple[int, ...] = (2, 4, 6)
    placement: str = "even"  # even | last
    repeats: int | None = None  # None: auto_repeats
    warmup: int | None = None  # None: auto_warmup
    max_others_cpu: float = 0.05
    extra_rounds: int | None = None  # None: as many as the repeats
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None
    compile: bool = False


def efficiency_target(batch_size: int) -> float:
    """Wanted speedup efficiency: 0.9 from batch 32 on (compute bound), 0.8 below (fixed costs weigh more)."""
    return 0.9 if batch_size >= TARGET_LARGE_BATCH else 0.8


def auto_repeats(batch_size: int) -> int:
    """Timed runs per plan when --repeats is not given: many where a run is cheap, 5 at batch >= 32."""
    return 25 if batch_size <= 1 else 12 if batch_size <= 8 else 5


def auto_warmup(batch_size: int) -> int:
    return 3 if batch_size <= 1 else 1


@dataclass
class Row:
    variant: str  # "eager" or "compiled"
    batch_size: int
    plan: str
    skipped_layers: list[int]
    gflops_per_sample: float
    flops_saved: float  # fraction of the full model's FLOPs
    latency_ms: float  # median
    latency_p25_ms: float
    latency_p75_ms: float
    latency_min_ms: float
    throughput: float  # samples per second at the median latency
    latency_saved: float | None  # fraction of the full plan's median latency
    efficiency: float | None  # latency_saved / flops_saved
    efficiency_ci90: list[float] | None  # bootstrap over the kept rounds: 5th and 95th percentiles
    target: float | None
    result: str  # PASS, MISS or "-" (the full plan)
    others_cpu: float | None  # share of all CPUs other processes used during the timed runs
    times_ms: list[float]


def run_benchmark(args: BenchOptions) -> dict[str, Any]:
    """Time every plan at every batch size; the result is what report.write_outputs writes."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(device)
    machine["load_average_before"] = load_average()
    log(f"machine: {machine['device_name']}, {machine['cpu_cores']} cores, torch {machine['torch']} "
         f"({machine['torch_threads']} threads)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="das-bench-") as workdir:
        backbone = build_backbone(args.size, device, dtype, Path(workdir), args.arch)
    if args.size == "embedded":
        plans, placement = embedded_plans(backbone), "shipped plans (DAS search)"
        words = single_token_words(backbone, world_vocabulary())
    else:
        plans, placement, words = build_plans(backbone, args.skips, args.placement), args.placement, WORDS
    adapters = [plan.spec.adapters for plan in plans if plan.spec.skipped_layers]
    runtime = DASRuntime(backbone)

    variants: list[tuple[str, Any]] = [("eager", runtime.vqa_logits)]
    if args.compile:
        from torch import _dynamo as dynamo  # only with --compile

        # one compiled graph per (plan, batch size); the default limit of 8 would fall back to eager
        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
        dynamo.config.accumulated_recompile_limit = max(dynamo.config.accumulated_recompile_limit, 256)
        variants.append(("compiled", torch.compile(runtime.vqa_logits, dynamic=False)))

    settings = {
        "arch": args.arch, "size": args.size, "device": str(device), "dtype": args.dtype, "compile": args.compile,
        "batch_sizes": args.batch_sizes, "text_tokens": TEXT_TOKENS,
        "image_size": backbone.config.image_size, "patch_size": backbone.config.patch_size,
        "skip_bottleneck": adapters[0].skip_bottleneck if adapters else None,
        "parallel_bottleneck": adapters[0].parallel_bottleneck if adapters else None, "placement": placement,
        "repeats": {b: args.repeats or auto_repeats(b) for b in args.batch_sizes},
        "warmup_rounds": {b: args.warmup if args.warmup is not None else auto_warmup(b) for b in args.batch_sizes},
        "num_layers": backbone.num_layers, "hidden_size": backbone.config.hidden_size,
        "max_others_cpu": args.max_others_cpu, "rounds": {},
    }
    total_runs = sum(
        (settings["repeats"][b] + settings["warmup_rounds"][b]) * len(plans) * len(variants) for b in args.batch_sizes
    )
    monitor, cpus = CpuMonitor(), os.cpu_count() or 1
    if not monitor.available:
        log("note: /proc/stat is not readable here; other processes' CPU use is not measured")
    rows: list[Row] = []
    with tqdm(total=total_runs, desc="das bench", unit="run", file=sys.stderr, mininterval=2.0,
              dynamic_ncols=True) as progress, torch.inference_mode():
        for batch_size in args.batch_sizes:
            progress.set_postfix_str(f"batch {batch_size}")
            batch = backbone.preprocess(make_images(batch_size), make_questions(batch_size, words))
            text_len = batch.text_lengths[0]
            if set(batch.text_lengths) != {TEXT_TOKENS}:
                log(f"warning: questions have {sorted(set(batch.text_lengths))} tokens, expected {TEXT_TOKENS}")
            batch = batch.to(backbone.device, backbone.dtype)
            reports = [backbone.flops("vqa", plan.spec, text_len, [batch.patch_grids[0]]) for plan in plans]
            forwards = [
                (lambda fn=fn, plan=plan: fn(plan, batch)) for _, fn in variants for plan in plans
            ]
            repeats = settings["repeats"][batch_size]
            timings, round_log = time_round_robin(
                forwards, device, settings["warmup_rounds"][batch_size], repeats, progress, monitor,
                max_others_cpu=args.max_others_cpu,
                extra_rounds=args.extra_rounds if args.extra_rounds is not None else repeats,
            )
            settings["rounds"][batch_size] = asdict(round_log) | {"kept_busy": round_log.kept_busy}
            if round_log.rounds_run > repeats:
                log(f"batch {batch_size}: other processes were busy; ran {round_log.rounds_run} timed rounds, kept "
                    f"the {repeats} quietest (others' CPU per round: "
                    f"{', '.join(f'{x:.0%}' for x in round_log.others_cpu)})")
            for v, (variant, _) in enumerate(variants):
                block = timings[v * len(plans):(v + 1) * len(plans)]
                full_latency = statistics.median(block[0].seconds)
                for plan, report, timing in zip(plans, reports, block):
                    seconds = timing.seconds
                    others = timing.others_cpu_seconds / (sum(seconds) * cpus) if monitor.available else None
                    latency = statistics.median(seconds)
                    p25, p75 = quartiles(seconds)
                    flops_saved = report.saved_ratio
                    latency_saved = efficiency = target = ci = None
                    result = "-"
                    if plan.spec.skipped_layers:
                        latency_saved = 1 - latency / full_latency
                        efficiency = latency_saved / flops_saved
                        ci = efficiency_interval(block[0].seconds, seconds, flops_saved)
                        target = efficiency_target(batch_size)
                        result = "PASS" if efficiency >= target else "MISS"
                    rows.append(Row(
                        variant=variant, batch_size=batch_size, plan=plan.name,
                        skipped_layers=list(plan.skipped_layers),
                        gflops_per_sample=report.executed / 1e9, flops_saved=flops_saved,
                        latency_ms=latency * 1e3, latency_p25_ms=p25 * 1e3, latency_p75_ms=p75 * 1e3,
                        latency_min_ms=min(seconds) * 1e3, throughput=batch_size / latency,
                        latency_saved=latency_saved, efficiency=efficiency, efficiency_ci90=ci, target=target,
                        result=result,
                        others_cpu=others, times_ms=[round(s * 1e3, 3) for s in seconds],
                    ))
            del batch, forwards
    # ViLT: one joint sequence; METER: text and image tokens (two streams)
    settings["seq_len"] = reports[0].seq_lens[0] if len(reports[0].seq_lens) == 1 else list(reports[0].seq_lens)
    machine["load_average_after"] = load_average()
    return {
        "benchmark": "das bench (model-level latency vs FLOPs)",
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "settings": settings,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": [asdict(row) for row in rows],
    }


