"""`das bench`: the model-level benchmark. Does skipping layers buy the latency its FLOPs promise?

For a ViLT backbone of ViLT-B/32 size (transformers' default ``ViltConfig`` with a 3129-answer VQA
head, randomly initialised: timing does not depend on the weights' values), written to a temporary
directory with ``save_vilt_checkpoint`` and read back with ``ViltBackbone.from_pretrained`` (the
loading path the service uses), the benchmark times ``DASRuntime.vqa_logits`` under
``torch.inference_mode`` for the built-in full plan and for plans that skip 2, 4 and 6 layers (skip
adapters of bottleneck 192, no parallel adapters).

Inputs are made once per batch size and preprocessed once (images resized by the checkpoint's
processor to 384x384, questions of 16 tokens including [CLS]/[SEP]); only the forward pass is
timed. Latency is the median of ``--repeats`` timed runs after ``--warmup`` untimed rounds. The plans
are interleaved round-robin (every round runs each plan once, and the starting plan rotates), so
drifts in machine speed hit all plans alike. On a shared machine, a round during which other
processes used more than ``--max-others-cpu`` of the CPUs (read from /proc/stat) is replaced by an
extra one (at most ``--extra-rounds``), and the quietest rounds are kept; the table reports the
share other processes still took ("others' CPU").

The FLOPs are ``backbone.flops(...)`` for the actual input. The speedup efficiency of a plan is the
fraction of latency it saves divided by the fraction of FLOPs it saves: 1.0 means the saved FLOPs
turn into saved time one for one. Targets: >= 0.9 at batch >= 32, >= 0.8 below (PASS/MISS per row).
This is a measurement, not a test: the exit status is 0 whatever the efficiency.

``--arch meter`` runs the same benchmark on a METER-size backbone (``MeterConfig()``: CLIP-ViT-B/16
at 288 px, RoBERTa-base, 6 fusion layers per stream, 3129-answer VQA head, random init, written with
``save_meter_checkpoint``); its 12 arms are the fusion layers (0-5 text side, 6-11 image side), skip
adapters of bottleneck 288 (the DAS reference's), results in ``bench-runtime-meter.{json,md}``.

``--size embedded`` times the embedded default instead (``plans/``: the shipped backbone and its
trained VQA plans skip2 and skip4, adapters as trained). That backbone checkpoint has no VQA head,
so its "full" plan is built here from the shipped ``adapters`` plan: the same pooler and head, no
adapters, no skipped layer (:func:`full_plan_with_parts_of`). Questions are 16 tokens of the
synthetic world's words; results go to ``bench-runtime-embedded.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# A few dozen words: the questions are made of them, so every word is one WordPiece token.
WORDS = [
    "what", "color", "is", "the", "dog", "cat", "on", "left", "right", "of", "a", "an", "there", "how",
    "many", "people", "are", "in", "picture", "image", "sitting", "standing", "next", "to", "table",
    "car", "red", "blue", "green", "white", "black", "man", "woman", "holding", "wearing", "shirt",
    "under", "tree", "street", "sky", "this", "room", "kind", "food", "plate", "small", "large",
    "near", "window", "does", "have", "any", "which", "side", "behind", "chair", "yellow",
]
TEXT_TOKENS = 16  # per question, [CLS] and [SEP] included
SOURCE_IMAGE_SIZE = 480  # pre-made square images; the processor resizes them to the model's 384
SKIP_BOTTLENECK = 192
DEFAULT_SKIPS = (2, 4, 6)
DEFAULT_BATCH_SIZES = (1, 32)
NUM_VQA_LABELS = 3129
TARGET_LARGE_BATCH = 32
ARCH_NAMES = {"vilt": "ViLT", "meter": "METER"}


def efficiency_target(batch_size: int) -> float:
    """Wanted speedup efficiency: 0.9 from batch 32 on (compute bound), 0.8 below (fixed costs weigh more)."""
    return 0.9 if batch_size >= TARGET_LARGE_BATCH else 0.8


def auto_repeats(batch_size: int) -> int:
    """Timed runs per plan when --repeats is not given: many where a run is cheap, 5 at batch >= 32."""
    return 25 if batch_size <= 1 else 12 if batch_size <= 8 else 5


def auto_warmup(batch_size: int) -> int:
    return 3 if batch_size <= 1 else 1


# ---------------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------------
def bench_config(size: str):
    """ViLT-B/32 (transformers' default ViltConfig: 12 layers, hidden 768, 384 px, 32 px patches)
    with a 3129-answer VQA head, or a tiny config of the same depth for a quick smoke run."""
    from transformers import ViltConfig

    labels = {i: f"answer{i}" for i in range(NUM_VQA_LABELS)}
    label2id = {v: k for k, v in labels.items()}
    if size == "base":
        return ViltConfig(id2label=labels, label2id=label2id)
    if size == "tiny":
        return ViltConfig(
            hidden_size=256, num_hidden_layers=12, num_attention_heads=4, intermediate_size=1024,
            image_size=128, patch_size=32, id2label=labels, label2id=label2id,
        )
    raise ValueError(f"unknown size {size!r} (use base or tiny)")


def meter_bench_config(size: str):
    """METER-B (``MeterConfig()`` defaults, 288 px) with a 3129-answer VQA head, or a tiny METER with
    the same 12 arms for a quick smoke run."""
    from models.backbones.meter.modeling import MeterConfig

    labels = {i: f"answer{i}" for i in range(NUM_VQA_LABELS)}
    if size == "base":
        return MeterConfig(id2label=labels)
    if size == "tiny":
        small = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
        return MeterConfig(
            vision={**small, "image_size": 64, "patch_size": 16, "num_channels": 3, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5},
            text={**small, "vocab_size": 512, "max_position_embeddings": 64, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
                  "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
            hidden_size=128, num_attention_heads=4, intermediate_size=512, id2label=labels,
        )
    raise ValueError(f"unknown METER size {size!r} (use base or tiny)")


def skipped_layers(num_layers: int, count: int, placement: str) -> tuple[int, ...]:
    """Which layers a plan skipping ``count`` of ``num_layers`` leaves out.

    ``even``: spread over the depth, ending with the last layer (12 layers: 2 -> 5,11;
    4 -> 2,5,8,11; 6 -> 1,3,5,7,9,11). ``last``: the last ``count`` layers. Every ViLT layer costs
    the same, so the placement changes the FLOPs not at all and the latency hardly."""
    if not 0 < count < num_layers:
        raise ValueError(f"cannot skip {count} of {num_layers} layers")
    if placement == "last":
        return tuple(range(num_layers - count, num_layers))
    if placement == "even":
        return tuple(sorted({round((j + 1) * num_layers / count) - 1 for j in range(count)}))
    raise ValueError(f"unknown placement {placement!r} (use even or last)")


def make_questions(batch_size: int, words: list[str] = WORDS) -> list[str]:
    """``batch_size`` different questions of TEXT_TOKENS - 2 words each (one token per word)."""
    words_per_question = TEXT_TOKENS - 2
    return [
        " ".join(words[(i * 7 + j) % len(words)] for j in range(words_per_question)) for i in range(batch_size)
    ]


def single_token_words(backbone, candidates: list[str]) -> list[str]:
    """The candidates the backbone's tokenizer keeps as one token (so a question's length is known)."""
    tokenizer = backbone.processor.tokenizer
    return [w for w in candidates if len(tokenizer.tokenize(w)) == 1]


def make_images(batch_size: int, seed: int = 0) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, size=(SOURCE_IMAGE_SIZE, SOURCE_IMAGE_SIZE, 3), dtype=np.uint8))
        for _ in range(batch_size)
    ]


def machine_info(device) -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})",
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


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


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def efficiency_interval(
    full: list[float], plan: list[float], flops_saved: float, resamples: int = 2000, seed: int = 0
) -> list[float] | None:
    """90% bootstrap interval of the efficiency: resample the timed rounds (each round timed the
    full plan and this plan alike, so they are resampled in pairs) and take the 5th and 95th
    percentiles of (1 - median(plan) / median(full)) / flops_saved."""
    import random

    n = len(full)
    if n < 3 or len(plan) != n or flops_saved <= 0:
        return None
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        ratio = statistics.median(plan[i] for i in picks) / statistics.median(full[i] for i in picks)
        values.append((1 - ratio) / flops_saved)
    values.sort()
    return [round(values[int(0.05 * (resamples - 1))], 3), round(values[int(0.95 * (resamples - 1))], 3)]


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def build_backbone(size: str, device, dtype, workdir: Path, arch: str = "vilt"):
    """Save a random checkpoint in the Hugging Face layout and load it as the service does
    (``embedded``: load the shipped backbone)."""
    import torch
    from transformers.utils import logging as transformers_logging

    from models.backbones.vilt.checkpoint import save_vilt_checkpoint
    from models.backbones.vilt.modeling import ViltBackbone

    if size == "embedded":
        backbone = ViltBackbone.from_pretrained(EMBEDDED_DIR / "backbone", device=device, dtype=dtype)
        _log(f"backbone: embedded default {EMBEDDED_DIR / 'backbone'}, on {device} as {str(dtype).replace('torch.', '')}")
        return backbone
    transformers_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    started = time.perf_counter()
    if arch == "meter":
        from models.backbones.meter.modeling import MeterBackbone
        from models.backbones.meter.convert import save_meter_checkpoint

        model, loader = save_meter_checkpoint(workdir, meter_bench_config(size), ["vqa"], WORDS, seed=0), MeterBackbone
    else:
        model, loader = save_vilt_checkpoint(workdir, bench_config(size), "vqa", WORDS, seed=0), ViltBackbone
    del model
    gc.collect()
    saved = time.perf_counter()
    backbone = loader.from_pretrained(workdir, device=device, dtype=dtype)
    loaded = time.perf_counter()
    params = sum(p.numel() for p in backbone.parameters())
    _log(f"backbone: {arch} {size}, {params / 1e6:.1f} M parameters, written in {saved - started:.1f} s, "
         f"loaded in {loaded - saved:.1f} s, on {device} as {str(dtype).replace('torch.', '')}")
    torch.manual_seed(0)
    return backbone


def build_plans(backbone, skips: list[int], placement: str, skip_bottleneck: int | None = None) -> list:
    """The full plan and one plan per skip count; skip adapters of the architecture's reference
    bottleneck unless given (ViLT 192, METER 288)."""
    from models.das.plan import AdapterShapes, BackboneRef, Plan, PlanSpec, builtin_full_plan

    skip_bottleneck = skip_bottleneck or getattr(backbone, "default_skip_bottleneck", SKIP_BOTTLENECK)

    plans = [builtin_full_plan(backbone, "vqa")]
    for count in skips:
        spec = PlanSpec(
            task="vqa", name=f"skip{count}", version=1,
            backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
            skipped_layers=skipped_layers(backbone.num_layers, count, placement),
            adapters=AdapterShapes(skip_bottleneck=skip_bottleneck, parallel_bottleneck=None),
        )
        modules = backbone.build_plan_modules(spec).to(device=backbone.device, dtype=backbone.dtype)
        plans.append(Plan(spec, modules.eval().requires_grad_(False)))
    return plans


# The embedded default (plans/): a backbone checkpoint without a VQA head, and trained VQA plans.
EMBEDDED_DIR = Path(__file__).resolve().parents[2] / "plans"
EMBEDDED_HEAD_SOURCE = "adapters"  # the shipped plan whose pooler and head the "full" plan uses
EMBEDDED_SKIP_PLANS = ("skip2", "skip4")


def full_plan_with_parts_of(backbone, source, name: str = "full"):
    """The full model (no skipped layer, no adapter) with ``source``'s own per-task parts (pooler,
    token-type embeddings, head): what the built-in ``full`` plan would be if the backbone
    checkpoint carried those parts. For backbones without a head for the task, as the embedded one."""
    from models.das.plan import Plan, PlanSpec

    spec = PlanSpec(
        task=source.task, name=name, version=1, backbone=source.spec.backbone, own_head=source.spec.own_head,
        labels=source.spec.labels, own_parts=source.spec.own_parts,
        metrics={"trainable_params": 0, "parts_from": f"{source.task}/{source.name}"},
    )
    modules = backbone.build_plan_modules(spec)
    adapters = ("skip_adapters.", "parallel_adapters.")
    modules.load_state_dict({k: v for k, v in source.modules.state_dict().items() if not k.startswith(adapters)})
    modules.to(device=backbone.device, dtype=backbone.dtype).eval().requires_grad_(False)
    return Plan(spec, modules)


def embedded_plans(backbone, plans_dir: Path = EMBEDDED_DIR, skip_names=EMBEDDED_SKIP_PLANS) -> list:
    """[full (parts of the shipped adapters plan), the shipped VQA skip plans], validated against ``backbone``."""
    from models.das.plan import load_plan

    source = load_plan(plans_dir / "vqa" / EMBEDDED_HEAD_SOURCE, backbone)
    return [full_plan_with_parts_of(backbone, source)] + [load_plan(plans_dir / "vqa" / n, backbone) for n in skip_names]


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CpuMonitor:
    """CPU time used by *other* processes while a run is timed: all CPUs' busy time from
    /proc/stat (steal included) minus this process's own CPU time. On a quiet machine it is ~0;
    where it is not, the latencies are inflated and noisy. Linux only (None elsewhere)."""

    def __init__(self) -> None:
        self.available = Path("/proc/stat").is_file()
        self.ticks = os.sysconf("SC_CLK_TCK") if self.available else 100

    def sample(self) -> tuple[float, float]:
        """(seconds all CPUs were busy since boot, seconds this process has used)."""
        own = os.times()
        if not self.available:
            return 0.0, own.user + own.system
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / self.ticks, own.user + own.system


@dataclass
class Timing:
    seconds: list[float]  # wall time of each kept timed run
    others_cpu_seconds: float = 0.0  # CPU time other processes used during those runs


@dataclass
class RoundLog:
    """What happened at one batch size: timed rounds run, and which were kept."""

    rounds_run: int
    kept: list[int]  # indices of the kept rounds, in the order they ran
    others_cpu: list[float]  # per timed round: share of all CPUs other processes used
    busy: list[bool]  # per timed round: above --max-others-cpu (beyond clock-tick rounding)

    @property
    def kept_busy(self) -> int:
        return sum(self.busy[r] for r in self.kept)


def time_round_robin(
    forwards: list, device, warmup: int, repeats: int, progress, monitor: CpuMonitor,
    max_others_cpu: float = 1.0, extra_rounds: int = 0,
) -> tuple[list[Timing], RoundLog]:
    """Time each forward: ``warmup`` untimed rounds, then timed rounds; every round runs each
    forward once, starting one later each round.

    A timed round in which other processes used more than ``max_others_cpu`` of all CPUs is busy:
    while fewer than ``repeats`` rounds are clean, another round is run, at most ``extra_rounds``
    more. The ``repeats`` rounds with the least such load are kept (whole rounds, so every plan is
    measured under the same conditions). The garbage collector is off meanwhile (as in timeit)."""
    n = len(forwards)
    cpus = os.cpu_count() or 1
    seconds: list[list[float]] = []  # per timed round, per forward: wall seconds
    others: list[list[float]] = []  # per timed round, per forward: CPU seconds other processes used
    rounds: list[tuple[float, float]] = []  # per timed round: (others' CPU seconds, wall seconds)
    # /proc/stat and os.times() count in clock ticks: forgive two ticks of rounding per round
    slack = 2.0 / monitor.ticks

    def share(r: int) -> float:
        return rounds[r][0] / (rounds[r][1] * cpus)

    def busy(r: int) -> bool:
        return rounds[r][0] - slack > max_others_cpu * rounds[r][1] * cpus

    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        round_index = 0
        while True:
            timed = round_index >= warmup
            if timed:
                clean = sum(not busy(r) for r in range(len(rounds)))
                if clean >= repeats or len(rounds) >= repeats + extra_rounds:
                    break
                if len(rounds) >= repeats:  # an extra round, to replace a busy one
                    progress.total += n
                    progress.refresh()
            round_seconds, round_others = [0.0] * n, [0.0] * n
            round_cpu_before, round_own_before = monitor.sample()
            round_started = time.perf_counter()
            for k in range(n):
                i = (round_index + k) % n
                _synchronize(device)
                busy_before, own_before = monitor.sample()
                started = time.perf_counter()
                forwards[i]()
                _synchronize(device)
                round_seconds[i] = time.perf_counter() - started
                busy_after, own_after = monitor.sample()
                round_others[i] = max(0.0, (busy_after - busy_before) - (own_after - own_before))
                progress.update(1)
            round_wall = time.perf_counter() - round_started
            busy_after, own_after = monitor.sample()
            if timed:
                seconds.append(round_seconds)
                others.append(round_others)
                rounds.append((max(0.0, (busy_after - round_cpu_before) - (own_after - round_own_before)), round_wall))
            round_index += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    kept = sorted(sorted(range(len(rounds)), key=lambda r: (busy(r), share(r)))[:repeats])
    timings = [Timing([seconds[r][i] for r in kept], sum(others[r][i] for r in kept)) for i in range(n)]
    return timings, RoundLog(
        len(rounds), kept, [round(share(r), 4) for r in range(len(rounds))], [busy(r) for r in range(len(rounds))]
    )


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from models.backbones.base import resolve_device, resolve_dtype
    from models.runtime import DASRuntime

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(device)
    machine["load_average_before"] = _load_average()
    _log(f"machine: {machine['device_name']}, {machine['cpu_cores']} cores, torch {machine['torch']} "
         f"({machine['torch_threads']} threads)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="das-bench-") as workdir:
        backbone = build_backbone(args.size, device, dtype, Path(workdir), args.arch)
    if args.size == "embedded":
        from models.producer.world.language import world_vocabulary

        plans, placement = embedded_plans(backbone), "shipped plans (DAS search)"
        words = single_token_words(backbone, world_vocabulary())
    else:
        plans, placement, words = build_plans(backbone, args.skips, args.placement), args.placement, WORDS
    adapters = [plan.spec.adapters for plan in plans if plan.spec.skipped_layers]
    runtime = DASRuntime(backbone)

    variants: list[tuple[str, Any]] = [("eager", runtime.vqa_logits)]
    if args.compile:
        import torch._dynamo

        # one compiled graph per (plan, batch size); the default limit of 8 would fall back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 256)
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
        _log("note: /proc/stat is not readable here; other processes' CPU use is not measured")
    rows: list[Row] = []
    with tqdm(total=total_runs, desc="das bench", unit="run", file=sys.stderr, mininterval=2.0,
              dynamic_ncols=True) as progress, torch.inference_mode():
        for batch_size in args.batch_sizes:
            progress.set_postfix_str(f"batch {batch_size}")
            batch = backbone.preprocess(make_images(batch_size), make_questions(batch_size, words))
            text_len = batch.text_lengths[0]
            if set(batch.text_lengths) != {TEXT_TOKENS}:
                _log(f"warning: questions have {sorted(set(batch.text_lengths))} tokens, expected {TEXT_TOKENS}")
            batch = batch.to(backbone.device, backbone.dtype)
            reports = [backbone.flops("vqa", plan.spec, text_len, [batch.patch_grids[0]]) for plan in plans]
            forwards = [
                (lambda fn=fn, plan=plan: fn(plan, batch)) for _, fn in variants for plan in plans
            ]
            repeats = settings["repeats"][batch_size]
            timings, log = time_round_robin(
                forwards, device, settings["warmup_rounds"][batch_size], repeats, progress, monitor,
                max_others_cpu=args.max_others_cpu,
                extra_rounds=args.extra_rounds if args.extra_rounds is not None else repeats,
            )
            settings["rounds"][batch_size] = asdict(log) | {"kept_busy": log.kept_busy}
            if log.rounds_run > repeats:
                _log(f"batch {batch_size}: other processes were busy; ran {log.rounds_run} timed rounds, kept the "
                     f"{repeats} quietest (others' CPU per round: {', '.join(f'{x:.0%}' for x in log.others_cpu)})")
            for v, (variant, _) in enumerate(variants):
                block = timings[v * len(plans):(v + 1) * len(plans)]
                full_latency = statistics.median(block[0].seconds)
                for plan, report, timing in zip(plans, reports, block):
                    seconds = timing.seconds
                    others = timing.others_cpu_seconds / (sum(seconds) * cpus) if monitor.available else None
                    latency = statistics.median(seconds)
                    p25, p75 = _quartiles(seconds)
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
    machine["load_average_after"] = _load_average()
    return {
        "benchmark": "das bench (model-level latency vs FLOPs)",
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "settings": settings,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": [asdict(row) for row in rows],
    }


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _efficiency_cell(row: dict[str, Any]) -> str:
    if row["efficiency"] is None:
        return "-"
    ci = row.get("efficiency_ci90")
    return f"{row['efficiency']:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    compiled = any(row["variant"] != "eager" for row in rows)
    header = (["mode"] if compiled else []) + [
        "batch", "plan", "skipped layers", "GFLOPs/sample", "FLOPs saved", "latency ms (p25-p75)",
        "samples/s", "latency saved", "efficiency (90% CI)", "target", "result", "others' CPU",
    ]
    aligns = (["---"] if compiled else []) + ["--:", "---", "---", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "---", "--:"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    for row in rows:
        cells = ([row["variant"]] if compiled else []) + [
            str(row["batch_size"]),
            row["plan"],
            ",".join(map(str, row["skipped_layers"])) or "none",
            f"{row['gflops_per_sample']:.3g}",
            _pct(row["flops_saved"]) if row["skipped_layers"] else "-",
            f"{row['latency_ms']:.1f} ({row['latency_p25_ms']:.1f}-{row['latency_p75_ms']:.1f})",
            f"{row['throughput']:.2f}",
            _pct(row["latency_saved"]),
            _efficiency_cell(row),
            "-" if row["target"] is None else f">= {row['target']:.1f}",
            row["result"],
            _pct(row["others_cpu"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_machine(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    arch = s.get("arch", "vilt")
    layers = "fusion layers (DAS arms)" if arch == "meter" else "layers"
    sequence = (f"sequence {s['seq_len']}" if isinstance(s["seq_len"], int)  # METER: two streams
                else f"{s['seq_len'][0]} text and {s['seq_len'][1]} image tokens")
    return (
        f"Machine: {m['device_name']}; {m['cpu_cores']} CPU cores ({m['torch_threads']} torch threads); "
        f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; {m['platform']}.\n"
        f"Setup: {ARCH_NAMES[arch]} {s['size']} ({s['num_layers']} {layers}, hidden {s['hidden_size']}), "
        f"{s['dtype']} on {s['device']}{', torch.compile' if s['compile'] else ''}; {s['text_tokens']} text tokens + "
        f"{s['image_size']}x{s['image_size']} image ({s['patch_size']} px patches) = {sequence}; "
        f"skip adapters of bottleneck {s['skip_bottleneck']}, "
        + (f"parallel adapters of bottleneck {s['parallel_bottleneck']}" if s.get("parallel_bottleneck")
           else "no parallel adapters")
        + f", placement '{s['placement']}'"
        + (f" (full = no skip, no adapters, pooler and head of the shipped '{EMBEDDED_HEAD_SOURCE}' plan)"
           if s["size"] == "embedded" else "") + ".\n"
        f"Timing: median of {', '.join(f'{n} runs at batch {b}' for b, n in s['repeats'].items())} after "
        f"{', '.join(f'{n} warm-up round(s) at batch {b}' for b, n in s['warmup_rounds'].items())}; "
        f"plans interleaved round-robin{_rounds_note(s)}. Whole run: {result['wall_seconds']:.0f} s."
        + (f"\nLoad average (1, 5, 15 min) before the run: {', '.join(map(str, m['load_average_before']))}."
           if m.get("load_average_before") else "")
    )


def _rounds_note(settings: dict[str, Any]) -> str:
    extra = {b: log for b, log in settings.get("rounds", {}).items() if log["rounds_run"] > len(log["kept"])}
    if not extra:
        return ""
    return "; busy rounds (others' CPU > {:.0%}) replaced: ".format(settings["max_others_cpu"]) + ", ".join(
        f"kept the {len(log['kept'])} quietest of {log['rounds_run']} at batch {b}" for b, log in extra.items()
    )


def busy_warning(result: dict[str, Any]) -> str | None:
    """A warning when some kept rounds were still busy (other processes took CPU during them)."""
    settings = result["settings"]
    busy = {b: log for b, log in settings.get("rounds", {}).items() if log["kept_busy"]}
    if not busy:
        return None
    return (
        "Warning: other processes used more than {:.0%} of the CPUs during ".format(settings["max_others_cpu"])
        + ", ".join(f"{log['kept_busy']} of the {len(log['kept'])} kept rounds at batch {b}" for b, log in busy.items())
        + " (column \"others' CPU\"); those latencies are inflated and noisy. Re-run on a quiet machine."
    )


def output_stem(size: str, arch: str = "vilt") -> str:
    """File name stem of a run's results: the embedded default's and METER's go beside the base size's."""
    if arch == "meter":
        return "bench-runtime-meter"
    return "bench-runtime-embedded" if size == "embedded" else "bench-runtime"


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(result["settings"]["size"], result["settings"].get("arch", "vilt"))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n\n".join([
        "# das bench: latency vs FLOPs of DAS plans",
        f"Run {result['created_at']}.",
        describe_machine(result).replace("\n", "  \n"),
        markdown_table(result["rows"]),
        *([busy_warning(result)] if busy_warning(result) else []),
        "Efficiency = (fraction of the full plan's median latency saved) / (fraction of its FLOPs saved). "
        "FLOPs per sample from `backbone.flops` (1 multiply-add = 2 FLOPs), for the actual input. "
        "Latency: median of the timed runs of one forward pass (`DASRuntime.vqa_logits` under "
        "`torch.inference_mode`); preprocessing is not timed. samples/s = batch / median latency. "
        "90% CI: bootstrap over the timed rounds (resampled in pairs with the full plan's); a wide "
        "interval means the machine was too noisy for the number of repeats. "
        "others' CPU: share of all CPUs that other processes used while the row's runs were timed "
        "(from /proc/stat; ~0% on a quiet machine).",
    ])
    (out / f"{stem}.md").write_text(text + "\n")


def cmd_bench(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.arch == "meter" and args.size == "embedded":
        print("error: --size embedded is the shipped ViLT; use --arch vilt with it", file=sys.stderr)
        return 2
    if args.compile and args.size == "base" and args.repeats is None:
        _log("note: --compile compiles one graph per plan and batch size; the first rounds take minutes")
    result = run_benchmark(args)
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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _positive_int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,32; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,32; got {text!r}")
    return values


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def register(commands: argparse._SubParsersAction) -> None:
    """Add `das bench` to the `das` command line."""
    from models.cli.main import positive_int

    bench = commands.add_parser(
        "bench",
        help="latency vs FLOPs of DAS plans on a ViLT-B/32-size backbone (a benchmark, not a test)",
        description=__doc__.split("\n", 1)[1].strip() + (
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
    bench.add_argument("--batch-sizes", type=_positive_int_list, default=list(DEFAULT_BATCH_SIZES),
                       metavar="N,N", help="comma-separated batch sizes (default 1,32)")
    bench.add_argument("--skips", type=_positive_int_list, default=list(DEFAULT_SKIPS), metavar="K,K",
                       help="numbers of layers the benchmarked plans skip, beside the full plan (default 2,4,6)")
    bench.add_argument("--placement", choices=["even", "last"], default="even",
                       help="which layers are skipped: even = spread over the depth, ending with the last "
                            "(skip 4 of 12 -> 2,5,8,11; default); last = the last K layers")
    bench.add_argument("--repeats", type=positive_int, default=None,
                       help="timed runs per plan and batch size; latency is their median "
                            "(default: 25 at batch 1, 12 at batch <= 8, 5 above)")
    bench.add_argument("--warmup", type=_non_negative_int, default=None,
                       help="untimed warm-up rounds (each runs every plan once) per batch size "
                            "(default: 3 at batch 1, 1 above)")
    bench.add_argument("--max-others-cpu", type=_fraction, default=0.05, metavar="F",
                       help="a timed round in which other processes used more than this share of all CPUs "
                            "(read from /proc/stat) counts as busy and is replaced by an extra round; the "
                            "quietest --repeats rounds are kept (default 0.05; 1 turns this off)")
    bench.add_argument("--extra-rounds", type=_non_negative_int, default=None, metavar="N",
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
    bench.set_defaults(func=cmd_bench)
