#!/usr/bin/env python
"""Service-level benchmark: DAS Serve side by side with a plain BentoML + transformers service.

Services, each a `bentoml serve` with 1 worker, on the same weights, take turns under the same
load on this machine (only one receives requests at any time):

  baseline          loadtests/baseline: transformers' ViltProcessor + ViltForQuestionAnswering, one
                    forward pass per request (the usual way to serve ViLT with BentoML)
  baseline-batched  the same model behind BentoML's adaptive batching (an HTTP service and a
                    batchable model service, as BentoML composes them)
  das-full          DAS Serve (service.service:DASService) with the full plan active (no layer skipped)
  das-<skip>        DAS Serve with a skip plan active, one service per skip plan

Weights. --model embedded (default): the embedded default, plans/backbone. Its checkpoint carries no
VQA head (its VQA plans carry their own), so das-full runs the full model with the pooler and head
of the shipped vqa/adapters plan and no adapters (models.bench.fixtures.full_plan_with_parts_of), saved as
plan "noskip" in a temporary plan store ("full" is reserved for built-in plans); the baseline
loads a ViltForQuestionAnswering checkpoint written from the same tensors
(models.backbones.vilt.checkpoint.save_vqa_checkpoint_with_plan_parts), and the benchmark checks that both
answer alike. A backbone with a convolutional stem (the embedded default's) is not transformers'
ViLT: no plain service can run it, so the run has DAS services only and das-full's p50 at
concurrency 1 sets the latency budget (the comparison with a plain service is --model base's). The
skip plan is a shipped one (--skip-plan, default skip4), as trained (--skip-plan takes a
comma-separated list). --checkpoint DIR: a ViLT checkpoint with a VQA
head, served as is by every service (DAS's built-in full plan) with skip plans of random adapters,
one per count in --skip-layers (e.g. 4,6), each skipping that many evenly spread layers; --model base
makes such a checkpoint of ViLT-B/32 size (random init, 3129 answers) first.

Load. Every request is the same: one synthetic-world image (PNG, the model's image size) and one
question, top_k=5. Closed loop: at each --concurrency level, that many clients (httpx, asyncio) send
requests back to back for --warmup seconds (not counted), then --duration seconds (stretched until
enough requests completed); a request counts if it completes inside that window. Every level of
every service is measured --rounds times and the services take turns, in an order that rotates with
the round and the level, so that a change in the machine's speed (other jobs on a shared machine)
hits every service alike; the rounds are pooled. Reported per level: throughput (successful
requests/s, and per round), latency p50/p95/p99 (client side, and p50 per round), errors, and for the
DAS services the mean size of the model batches that formed (from das_batch_size in /metrics).

Budget and ratios. The latency budget is --budget-factor (default 4) x the baseline's p50 at
concurrency 1. "Throughput at budget" is the highest throughput among levels whose p95 is within
the budget and that had no errors. Targets (PASS/MISS):
  das-full vs the better plain service, throughput at budget:  ratio >= 1.0
  das-<skip> vs das-full, throughput at budget: gain >= 0.9 * X / (1 - X), X = the FLOPs saved
      fraction the skip plan's responses report (flops.saved_ratio)
Paired per round, at every concurrency level above 1 (the ratios are taken within a round, where
the services ran back to back, and the median over rounds is judged; the per-round values show the
spread):
  das-<skip> vs das-full, throughput gain: >= 0.9 * X / (1 - X)
  das-<skip> vs das-full, p50 latency saved: >= 0.9 * X
  das-full vs the better of baseline and baseline-batched in that round, throughput: >= 1.0
  HTTP overhead: end-to-end p50 of single sequential requests to das-full vs the in-process call
      for the same input (PNG decode + models.runtime.DASRuntime.vqa: preprocessing, forward,
      top-k), pairs interleaved; overhead = e2e / in-process - 1 <= 15%. Each pair also times one
      request to a no-op BentoML service with the same inputs (loadtests/baseline/floor_service.py):
      BentoML's own cost, so the report says how much of the overhead DAS adds. Measured with the service's
      settings (DAS_MAX_LATENCY_MS, default 0: a lone request runs at once) and, with
      --zero-wait-overhead, again on a das-full started with DAS_MAX_LATENCY_MS=0 (useful only when
      the inherited environment sets a wait).

The client runs on the same machine as the server: on a small CPU machine it takes a share of the
cores (--threads 1 leaves it one; the default is torch's own setting, as `make serve` runs). Results: OUT/bench-service.json
(every level) and OUT/bench-service.md; with --model-results (das bench JSON files) also a combined
OUT/bench.json and OUT/bench.md with every target of the model and service levels. A measurement,
not a test: the exit status is 0 whatever the results (non-zero only if a service fails to start).

`make bench` runs the model level and this in one go; `make bench BENCH_SHORT=1` is a quick run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: make the models package importable
    sys.path.insert(0, str(REPO))

BASELINE_DIR = REPO / "loadtests" / "baseline"
BASELINE_SERVICE = "baseline_service:ViltVQABaseline"
BATCHED_BASELINE_SERVICE = "baseline_service:ViltVQABatched"  # BentoML's adaptive batching
FLOOR_SERVICE = "floor_service:BentoMLFloor"  # no model: BentoML's own cost for the same inputs
DAS_SERVICE = "service.service:DASService"
OVERHEAD_TARGET = 0.15
FULL_VS_BASELINE_TARGET = 1.0
SKIP_EFFICIENCY = 0.9  # the skip plan should turn 90% of its FLOPs saving into throughput
DEFAULT_LEVELS = (1, 2, 4, 8, 16, 32)
SHORT_LEVELS = (1, 4, 16)
TOP_K = 5
NOSKIP_PLAN = "noskip"  # the embedded default's full model, as a plan on disk ("full" is reserved)
# transformers' ViLT has no convolutional stem, so neither plain service can load such weights
NO_PLAIN_SERVICE = "a convolutional stem, which transformers' ViLT lacks: no plain service runs these weights"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# What the services load
# ---------------------------------------------------------------------------------------------
@dataclass
class Setup:
    das_backbone: Path  # DAS_BACKBONE
    store: Path  # DAS_PLANS: a temporary plan store
    on_disk: list[str]  # VQA plans in the store (besides a built-in full plan)
    full_plan: str
    skip_plans: list[str]
    baseline_checkpoint: Path | None  # BASELINE_CHECKPOINT; None: transformers cannot run these weights
    weights: str  # one sentence: where the weights come from
    backbone: Any = None  # loaded here too, for the in-process call
    full: Any = None  # the full plan, in process


def prepare(args: argparse.Namespace, workdir: Path, device, dtype) -> Setup:
    """Write the temporary plan store (and checkpoints) the three services load."""
    from models.backbones.base import load_backbone
    from models.bench.fixtures import (
        EMBEDDED_DIR, EMBEDDED_HEAD_SOURCE, WORDS, bench_config, build_plans, full_plan_with_parts_of,
    )
    from models.backbones.vilt.checkpoint import save_vilt_checkpoint, save_vqa_checkpoint_with_plan_parts
    from models.backbones.vilt.modeling import conv_stem_channels
    from models.das.plan import load_plan, save_plan

    store = workdir / "plans"
    store.mkdir()
    if args.checkpoint is None and args.model == "embedded":
        backbone_dir = EMBEDDED_DIR / "backbone"
        backbone = load_backbone(backbone_dir, device, dtype)
        source = load_plan(EMBEDDED_DIR / "vqa" / EMBEDDED_HEAD_SOURCE, backbone)
        full = full_plan_with_parts_of(backbone, source, name=NOSKIP_PLAN)
        save_plan(store / "vqa" / full.name, full.spec, full.modules)
        for name in args.skip_plan:
            skip_dir = EMBEDDED_DIR / "vqa" / name
            if not (skip_dir / "plan.json").is_file():
                raise SystemExit(f"no shipped VQA plan {name!r} in {EMBEDDED_DIR / 'vqa'}")
            shutil.copytree(skip_dir, store / "vqa" / name)
        weights = (f"embedded default {backbone_dir.relative_to(REPO)}; '{NOSKIP_PLAN}' = no skip, no adapters, pooler and "
                   f"head of the shipped vqa/{EMBEDDED_HEAD_SOURCE} plan")
        if conv_stem_channels(backbone.config):
            baseline_dir = None
            weights += f" ({NO_PLAIN_SERVICE})"
        else:
            baseline_dir = save_vqa_checkpoint_with_plan_parts(backbone_dir, full, workdir / "baseline")
            weights += " (the baseline loads the same tensors as a ViltForQuestionAnswering checkpoint)"
        weights += f"; {', '.join(repr(n) for n in args.skip_plan)} = the shipped plans"
        return Setup(backbone_dir, store, [full.name, *args.skip_plan], full.name, list(args.skip_plan), baseline_dir,
                     weights, backbone, full)
    if args.checkpoint is None:  # base: a ViLT-B/32-size VQA checkpoint, random init
        backbone_dir = workdir / "checkpoint"
        save_vilt_checkpoint(backbone_dir, bench_config("base"), "vqa", WORDS, seed=0)
        origin = "ViLT-B/32 size (transformers' default ViltConfig), random init, 3129-answer VQA head"
    else:
        backbone_dir = Path(args.checkpoint)
        origin = str(backbone_dir)
    backbone = load_backbone(backbone_dir, device, dtype)
    if "vqa" not in backbone.task_heads():
        raise SystemExit(f"{backbone_dir}: the checkpoint has no VQA head (the baseline needs one)")
    counts = sorted(set(args.skip_layers or [max(1, backbone.num_layers // 2)]))
    # skip adapters of bottleneck hidden / 4 (192 at ViLT-B/32 size, as das bench uses)
    full, *skips = build_plans(backbone, counts, "even", skip_bottleneck=max(1, backbone.config.hidden_size // 4))
    for skip in skips:
        save_plan(store / "vqa" / skip.name, skip.spec, skip.modules)
    weights = (f"{origin}; 'full' = the built-in plan; "
               + "; ".join(f"'{skip.name}' skips layers {','.join(map(str, skip.skipped_layers))}" for skip in skips)
               + f"; random skip adapters of bottleneck {skips[0].spec.adapters.skip_bottleneck}")
    names = [skip.name for skip in skips]
    has_stem = bool(conv_stem_channels(backbone.config))
    return Setup(backbone_dir, store, names, full.name, names, None if has_stem else backbone_dir,
                 weights + (f" ({NO_PLAIN_SERVICE})" if has_stem else ""), backbone, full)


def store_with_active(setup: Setup, directory: Path, active: str) -> Path:
    """A copy of the prepared plan store in ``directory`` whose store.json makes ``active`` the VQA default."""
    if not directory.exists():
        shutil.copytree(setup.store, directory)
    (directory / "store.json").write_text(json.dumps({"loaded": {"vqa": setup.on_disk}, "active": {"vqa": active}}))
    return directory


def request_payload(image_size: int, seed: int = 0) -> tuple[bytes, str]:
    """One synthetic-world scene as PNG and a question about it."""
    from models.producer.world.language import vqa_questions
    from models.producer.world.scenes import render_scene, sample_scene

    rng = random.Random(seed)
    scene = sample_scene(rng)
    buffer = io.BytesIO()
    render_scene(scene, image_size=image_size).save(buffer, format="PNG")
    return buffer.getvalue(), vqa_questions(scene, rng, k=1)[0].question


# ---------------------------------------------------------------------------------------------
# Running a service
# ---------------------------------------------------------------------------------------------
ServiceSpec = tuple[str, str, Path, dict[str, str]]  # name, bentoml target, working directory, added env


@contextlib.contextmanager
def running(services: list[ServiceSpec], log_dir: Path, start_timeout: float) -> Iterator[dict[str, str]]:
    """Start a `bentoml serve` per service, all at once (they load in parallel), each in its own
    process group; yield {name: base URL} once every one answers /readyz; stop them all on exit."""
    from loadtests.harness import wait_ready, free_port, stop_process_tree

    bentoml = Path(sys.executable).parent / "bentoml"
    started: list[tuple[str, subprocess.Popen, str, Path]] = []
    try:
        for name, target, cwd, env in services:
            port = free_port()
            log_path = log_dir / f"{name}.log"
            with open(log_path, "w") as log:
                process = subprocess.Popen(
                    [str(bentoml), "serve", target, "--host", "127.0.0.1", "--port", str(port)],
                    cwd=cwd, env=dict(os.environ, HF_HUB_OFFLINE="1", BENTOML_DO_NOT_TRACK="true", **env),
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            started.append((name, process, f"http://127.0.0.1:{port}", log_path))
        for _, process, url, log_path in started:
            wait_ready(url, process, log_path, start_timeout)
        yield {name: url for name, _, url, _ in started}
    finally:
        for name, process, _, log_path in started:
            if not stop_process_tree(process):
                _log(f"note: {name} needed SIGKILL to stop (see {log_path})")


def _files(png: bytes) -> dict[str, tuple[str, bytes, str]]:
    return {"image": ("scene.png", png, "image/png")}


def _data(question: str) -> dict[str, str]:
    return {"question": question, "top_k": str(TOP_K)}


def probe(url: str, png: bytes, question: str, tries: int = 3) -> dict[str, Any]:
    """A few warm-up requests; the last response body (the answers, and DAS's plan and FLOPs)."""
    import httpx

    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(tries):
            response = client.post("/vqa", files=_files(png), data=_data(question))
            if response.status_code != 200:
                plans = client.get("/plans/")  # a DAS service says there why a plan was not loaded
                errors = plans.json().get("load_errors") if plans.status_code == 200 else None
                raise RuntimeError(f"{url}/vqa answered {response.status_code}: {response.text[:500]}"
                                   + (f"; plan load errors: {errors}" if errors else ""))
        return response.json()


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
@dataclass
class Level:
    concurrency: int
    seconds: float  # length of the counted window
    ok: int
    errors: int
    throughput: float  # successful requests per second in the window
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    statuses: dict[str, int] = field(default_factory=dict)  # non-200 statuses and transport errors
    round_throughputs: list[float] = field(default_factory=list)  # per round: its spread shows the noise
    round_p50_ms: list[float | None] = field(default_factory=list)  # per round, for ratios paired within a round
    mean_batch_size: float | None = None  # DAS services: requests per model batch under this load


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


Record = tuple[float, bool, str]  # one request: latency in seconds, whether it succeeded, status


def _p50_ms(records: list[Record]) -> float | None:
    latencies = [latency * 1e3 for latency, ok, _ in records if ok]
    return round(percentile(latencies, 50), 3) if latencies else None


def summarize(concurrency: int, seconds: float, records: list[Record], round_throughputs: list[float],
              round_p50_ms: list[float | None] = (), mean_batch_size: float | None = None) -> Level:
    """records: the requests completed in the counted windows, which lasted ``seconds`` in all."""
    latencies = [latency * 1e3 for latency, ok, _ in records if ok]
    statuses: dict[str, int] = {}
    for _, ok, status in records:
        if not ok:
            statuses[status] = statuses.get(status, 0) + 1

    def stat(q: float) -> float | None:
        return round(percentile(latencies, q), 3) if latencies else None

    return Level(
        concurrency=concurrency, seconds=round(seconds, 3), ok=len(latencies), errors=len(records) - len(latencies),
        throughput=round(len(latencies) / seconds, 3), p50_ms=stat(50), p95_ms=stat(95), p99_ms=stat(99),
        mean_ms=round(statistics.fmean(latencies), 3) if latencies else None, statuses=statuses,
        round_throughputs=round_throughputs, round_p50_ms=list(round_p50_ms), mean_batch_size=mean_batch_size,
    )


async def closed_loop(url: str, png: bytes, question: str, concurrency: int, warmup: float, duration: float,
                      min_requests: int = 1) -> tuple[list[Record], float]:
    """``concurrency`` clients send requests back to back; count those completing in the window.
    The window lasts ``duration`` seconds, longer if needed until ``min_requests`` completed in it."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    records: list[Record] = []
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        window_start = time.perf_counter() + warmup
        planned_end = window_start + duration
        window_end: float | None = None  # set once the window is over

        async def client_loop() -> None:
            nonlocal window_end
            while window_end is None:
                sent = time.perf_counter()
                try:
                    response = await client.post("/vqa", files=_files(png), data=_data(question))
                    ok, status = response.status_code == 200, str(response.status_code)
                except httpx.HTTPError as exc:
                    ok, status = False, type(exc).__name__
                done = time.perf_counter()
                if window_end is not None or done < window_start:
                    continue
                if done > planned_end and len(records) >= min_requests:
                    window_end = planned_end
                    continue
                records.append((done - sent, ok, status))
                if done >= planned_end and len(records) >= min_requests:  # a window stretched to min_requests
                    window_end = done

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return records, window_end - window_start


def batch_counters(url: str) -> tuple[float, float] | None:
    """(requests, batches) so far from a DAS service's das_batch_size histogram; None when it has none."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics", timeout=30)
    if response.status_code != 200:
        return None
    totals = {"das_batch_size_sum": 0.0, "das_batch_size_count": 0.0}
    found = False
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
                found = True
    return (totals["das_batch_size_sum"], totals["das_batch_size_count"]) if found else None


def interleaved_sweep(urls: dict[str, str], png: bytes, question: str, levels: list[int], rounds: int,
                      warmup: float, duration: float, min_requests: int, progress,
                      batched: frozenset[str] = frozenset()) -> dict[str, list[Level]]:
    """Every level of every service, ``rounds`` times. The services take turns (one under load at a
    time) in an order that rotates with the round and the level; each level's rounds are pooled. For
    the services in ``batched`` (DAS), the mean model batch size over each level's load (warm-up
    included) comes from their /metrics."""
    names = list(urls)
    records: dict[tuple[str, int], list[Record]] = {(n, c): [] for n in names for c in levels}
    seconds = dict.fromkeys(records, 0.0)
    per_round: dict[tuple[str, int], list[float]] = {key: [] for key in records}
    p50s: dict[tuple[str, int], list[float | None]] = {key: [] for key in records}
    batches: dict[tuple[str, int], list[float]] = {key: [0.0, 0.0] for key in records}
    per_window = max(1, -(-min_requests // rounds))  # the rounds together reach min_requests
    for r in range(rounds):
        for i, concurrency in enumerate(levels):
            shift = (r + i) % len(names)
            for name in names[shift:] + names[:shift]:
                progress.set_postfix_str(f"round {r + 1}/{rounds}, concurrency {concurrency}, {name}")
                before = batch_counters(urls[name]) if name in batched else None
                window, length = asyncio.run(
                    closed_loop(urls[name], png, question, concurrency, warmup, duration, per_window))
                key = (name, concurrency)
                if before is not None and (after := batch_counters(urls[name])) is not None:
                    batches[key][0] += after[0] - before[0]
                    batches[key][1] += after[1] - before[1]
                records[key] += window
                seconds[key] += length
                per_round[key].append(round(sum(ok for _, ok, _ in window) / length, 3))
                p50s[key].append(_p50_ms(window))
                progress.update(1)

    def mean_batch(key: tuple[str, int]) -> float | None:
        requests, count = batches[key]
        return round(requests / count, 3) if count else None

    return {n: [summarize(c, seconds[(n, c)], records[(n, c)], per_round[(n, c)], p50s[(n, c)], mean_batch((n, c)))
                for c in levels] for n in names}


def throughput_at_budget(levels: list[dict[str, Any]], budget_ms: float) -> float | None:
    """The highest throughput among error-free levels whose p95 is within the budget."""
    within = [lv["throughput"] for lv in levels if not lv["errors"] and lv["p95_ms"] is not None
              and lv["p95_ms"] <= budget_ms]
    return max(within) if within else None


# ---------------------------------------------------------------------------------------------
# HTTP overhead
# ---------------------------------------------------------------------------------------------
def measure_overhead(url: str, setup: Setup, png: bytes, question: str, pairs: int, max_seconds: float,
                     progress, floor_url: str | None = None) -> dict[str, Any]:
    """Interleaved pairs: one request to the service (nothing else in flight), one in-process call
    (PNG decode + DASRuntime.vqa with the same plan). Medians of each, and their ratio. With
    ``floor_url`` (the no-op BentoML service), each pair also gets one request to it: BentoML's own
    cost for the same inputs, and what DAS adds = e2e - in-process - floor."""
    import httpx
    from PIL import Image

    from models.runtime import DASRuntime

    runtime = DASRuntime(setup.backbone)

    def in_process() -> None:
        image = Image.open(io.BytesIO(png)).convert("RGB")
        runtime.vqa(setup.full, [image], [question], TOP_K)

    for _ in range(3):  # warm up the in-process path
        in_process()
    def request_ms(client: httpx.Client) -> float:
        started = time.perf_counter()
        response = client.post("/vqa", files=_files(png), data=_data(question))
        elapsed = (time.perf_counter() - started) * 1e3
        if response.status_code != 200:
            raise RuntimeError(f"{response.request.url} answered {response.status_code}: {response.text[:500]}")
        return elapsed

    e2e, local, floor = [], [], []
    started = time.monotonic()
    with contextlib.ExitStack() as clients:
        client = clients.enter_context(httpx.Client(base_url=url, timeout=300))
        floor_client = clients.enter_context(httpx.Client(base_url=floor_url, timeout=300)) if floor_url else None
        for i in range(pairs):
            e2e.append(request_ms(client))
            t0 = time.perf_counter()
            in_process()
            local.append((time.perf_counter() - t0) * 1e3)
            if floor_client is not None:
                floor.append(request_ms(floor_client))
            progress.update(1)
            if time.monotonic() - started > max_seconds and i >= 4:
                progress.update(pairs - i - 1)
                break
    e2e_p50, local_p50 = statistics.median(e2e), statistics.median(local)
    overhead = e2e_p50 / local_p50 - 1
    floor_p50 = statistics.median(floor) if floor else None
    return {
        "pairs": len(e2e), "e2e_p50_ms": round(e2e_p50, 3), "inprocess_p50_ms": round(local_p50, 3),
        # BentoML alone (a no-op endpoint with the same inputs), and what DAS adds beyond it and the model call
        "bentoml_floor_p50_ms": None if floor_p50 is None else round(floor_p50, 3),
        "das_added_ms": None if floor_p50 is None else round(e2e_p50 - local_p50 - floor_p50, 3),
        "e2e_p95_ms": round(percentile(e2e, 95), 3), "inprocess_p95_ms": round(percentile(local, 95), 3),
        "overhead": round(overhead, 4), "target": OVERHEAD_TARGET,
        "result": "PASS" if overhead <= OVERHEAD_TARGET else "MISS",
    }


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def answers_agree(a: dict[str, Any], b: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Do two services answer alike (same labels in the same order, scores within tolerance)?"""
    labels_a = [x["answer"] for x in a.get("answers", [])]
    labels_b = [x["answer"] for x in b.get("answers", [])]
    difference = max((abs(x["score"] - y["score"]) for x, y in zip(a["answers"], b["answers"])), default=None)
    same = labels_a == labels_b and difference is not None and difference <= tolerance
    return {"same": same, "labels": [labels_a, labels_b], "max_score_difference": difference, "tolerance": tolerance}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from models.backbones.base import resolve_device, resolve_dtype
    from models.bench.timing import machine_info

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(device)
    machine["load_average_before"] = [round(v, 2) for v in os.getloadavg()]
    started = time.perf_counter()
    levels = sorted(set(args.concurrency) | {1})
    thread_env = {name: str(args.threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} if args.threads else {}
    das_env = {"DAS_WORKERS": "1", "DAS_DEVICE": str(device.type), "DAS_DTYPE": args.dtype, **thread_env}
    baseline_env = {"BASELINE_DEVICE": str(device.type), "BASELINE_DTYPE": args.dtype, **thread_env}
    # settings the user exported (DAS_MAX_BATCH_SIZE, ...) reach the DAS service unchanged; record them
    inherited = {k: v for k, v in os.environ.items() if k.startswith("DAS_") and k not in das_env and k != "DAS_ADMIN_TOKEN"}
    result: dict[str, Any] = {"benchmark": "service level: DAS Serve vs a plain BentoML + transformers service"}
    with tempfile.TemporaryDirectory(prefix="das-bench-service-") as tmp:
        workdir = Path(tmp)
        log_dir = Path(args.out) / "service-logs" if args.out else workdir
        log_dir.mkdir(parents=True, exist_ok=True)
        _log("preparing the checkpoints and the plan store ...")
        setup = prepare(args, workdir, device, dtype)
        png, question = request_payload(setup.backbone.config.image_size)
        das_env["DAS_BACKBONE"] = str(setup.das_backbone)
        full_store = store_with_active(setup, workdir / "plans-full", setup.full_plan)
        baseline_checkpoint = {**baseline_env, "BASELINE_CHECKPOINT": str(setup.baseline_checkpoint)}
        plain_services = [
            ("baseline", BASELINE_SERVICE, BASELINE_DIR, baseline_checkpoint, None, "baseline"),
            ("baseline-batched", BATCHED_BASELINE_SERVICE, BASELINE_DIR, baseline_checkpoint, None, "baseline"),
        ] if setup.baseline_checkpoint is not None else []
        services = plain_services + [  # name, bentoml target, working directory, env, plan, role
            ("das-full", DAS_SERVICE, REPO, {**das_env, "DAS_PLANS": str(full_store)}, setup.full_plan, "full"),
        ] + [
            (f"das-{plan}", DAS_SERVICE, REPO,
             {**das_env, "DAS_PLANS": str(store_with_active(setup, workdir / f"plans-{plan}", plan))}, plan, "skip")
            for plan in setup.skip_plans
        ]
        steps = (args.rounds * len(services) * len(levels)
                 + args.overhead_requests * (2 if args.zero_wait_overhead else 1))
        overhead: list[dict[str, Any]] = []
        with tqdm(total=steps, desc="bench-service", unit="step", file=sys.stderr, dynamic_ncols=True,
                  mininterval=2.0) as progress, contextlib.ExitStack() as stack:
            progress.set_postfix_str("starting the services")
            # all up at once; only one is under load at any time
            floor = ("bentoml-floor", FLOOR_SERVICE, BASELINE_DIR, thread_env)
            urls = stack.enter_context(running([spec[:4] for spec in services] + [floor], log_dir, args.start_timeout))
            probes = {}
            for name, _, _, _, plan, _ in services:
                probes[name] = probe(urls[name], png, question)
                if plan is not None and probes[name]["plan"]["name"] != plan:
                    raise RuntimeError(f"{name}: expected plan {plan!r}, the service ran {probes[name]['plan']}")
            overhead.append({"service": "das-full", "batching_wait_ms": inherited.get("DAS_MAX_LATENCY_MS", "default"),
                             **measure_overhead(urls["das-full"], setup, png, question, args.overhead_requests,
                                                args.overhead_seconds, progress, floor_url=urls[floor[0]])})
            measured = interleaved_sweep({name: urls[name] for name, *_ in services}, png, question, levels,
                                         args.rounds, args.warmup, args.duration, args.min_requests, progress,
                                         batched=frozenset(name for name, *_, role in services if role != "baseline"))
            stack.close()
            rows = [{
                "service": name, "role": role, "plan": plan, "probe": probes[name],
                "flops_saved": probes[name].get("flops", {}).get("saved_ratio") if plan else None,
                "levels": [asdict(level) for level in measured[name]],
            } for name, _, _, _, plan, role in services]
            if args.zero_wait_overhead:
                name = "das-full-wait0"
                progress.set_postfix_str(f"starting {name}")
                env = {**das_env, "DAS_PLANS": str(full_store), "DAS_MAX_LATENCY_MS": "0"}
                with running([(name, DAS_SERVICE, REPO, env)], log_dir, args.start_timeout) as started:
                    url = started[name]
                    probe(url, png, question)
                    overhead.append({"service": name, "batching_wait_ms": "0",
                                     **measure_overhead(url, setup, png, question, args.overhead_requests,
                                                        args.overhead_seconds, progress)})
        weights = setup.weights
    tolerance = 1e-4 if args.dtype == "float32" else 2e-2
    by_name = {row["service"]: row for row in rows}
    agreement = batched_agreement = None  # no plain service ran
    if "baseline" in by_name:
        agreement = answers_agree(by_name["baseline"]["probe"], by_name["das-full"]["probe"], tolerance)
        if not agreement["same"]:
            _log(f"warning: the baseline and das-full answer differently ({agreement}); they may not run the same weights")
        batched_agreement = answers_agree(by_name["baseline"]["probe"], by_name["baseline-batched"]["probe"], tolerance)
        if not batched_agreement["same"]:
            _log(f"warning: the two baselines answer differently ({batched_agreement})")
    machine["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    result.update({
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "settings": {
            "model": "checkpoint" if args.checkpoint else args.model, "weights": weights,
            "device": str(device), "dtype": args.dtype, "torch_threads": args.threads or "torch default",
            "workers": 1, "concurrency": levels, "rounds": args.rounds, "warmup_s": args.warmup,
            "duration_s": args.duration, "min_requests": args.min_requests,
            "image_size": setup.backbone.config.image_size, "question": question, "top_k": TOP_K,
            "budget_factor": args.budget_factor, "das_env": inherited,
        },
        "services": rows,
        "overhead": overhead,
        "answers_agree": agreement,
        "baselines_agree": batched_agreement,
        "wall_seconds": round(time.perf_counter() - started, 1),
    })
    result.update(evaluate(result))
    return result


def _spread(values: list[float]) -> dict[str, Any]:
    """Median and range of per-round values (None where a round had no data)."""
    present = [v for v in values if v is not None]
    return {"median": round(statistics.median(present), 4) if present else None,
            "min": round(min(present), 4) if present else None, "max": round(max(present), 4) if present else None,
            "rounds": [None if v is None else round(v, 4) for v in values]}


def _level(row: dict[str, Any], concurrency: int) -> dict[str, Any]:
    return next(lv for lv in row["levels"] if lv["concurrency"] == concurrency)


def wanted_gain(x: float) -> float:
    """The throughput gain a plan saving ``x`` of the FLOPs should reach: 0.9 * X / (1 - X)."""
    return SKIP_EFFICIENCY * x / (1 - x) if x < 1 else float("inf")


def paired_ratios(result: dict[str, Any]) -> list[dict[str, Any]]:
    """At every concurrency level above 1, ratios taken within each round (the services ran back to
    back there): each skip plan against das-full (throughput gain, p50 latency saved), and das-full
    against the better plain service of that round."""
    rows = result["services"]
    baselines = [row for row in rows if row["role"] == "baseline"]
    full = next(row for row in rows if row["role"] == "full")
    paired = []
    for concurrency in [c for c in result["settings"]["concurrency"] if c > 1]:
        f = _level(full, concurrency)
        if baselines:
            plain = [max(_level(b, concurrency)["round_throughputs"][r] for b in baselines)
                     for r in range(len(f["round_throughputs"]))]
            paired.append({"concurrency": concurrency, "comparison": f"{full['service']} vs the better plain service",
                           "measure": "throughput ratio", "flops_saved": 0.0,
                           **_spread([t / p if p else None for t, p in zip(f["round_throughputs"], plain)])})
        for skip in (row for row in rows if row["role"] == "skip"):
            k = _level(skip, concurrency)
            gains = [t / u - 1 if u else None for t, u in zip(k["round_throughputs"], f["round_throughputs"])]
            saved = [1 - a / b if a is not None and b else None for a, b in zip(k["round_p50_ms"], f["round_p50_ms"])]
            common = {"concurrency": concurrency, "comparison": f"{skip['service']} vs {full['service']}",
                      "flops_saved": skip["flops_saved"] or 0.0}
            paired.append({**common, "measure": "throughput gain", **_spread(gains)})
            paired.append({**common, "measure": "p50 latency saved", **_spread(saved)})
    return paired


def evaluate(result: dict[str, Any]) -> dict[str, Any]:
    """The latency budget, throughput at budget per service, the paired per-round ratios, and the targets."""
    rows = result["services"]
    full = next(row for row in rows if row["role"] == "full")
    # without a plain service (weights transformers cannot run), das-full sets the budget
    reference = next((row for row in rows if row["service"] == "baseline"), full)
    reference_p50 = next(lv["p50_ms"] for lv in reference["levels"] if lv["concurrency"] == 1)
    if reference_p50 is None:  # no request finished inside the window: --duration is too short
        raise SystemExit(f"{reference['service']} completed no request at concurrency 1 within --duration; raise it")
    budget = result["settings"]["budget_factor"] * reference_p50
    for row in rows:
        row["throughput_at_budget"] = throughput_at_budget(row["levels"], budget)
        row["peak_throughput"] = max(lv["throughput"] for lv in row["levels"])
        row["p50_ms_at_1"] = next(lv["p50_ms"] for lv in row["levels"] if lv["concurrency"] == 1)
    targets = []

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def judged(value: float | None, wanted: float) -> str:
        return "MISS" if value is None or value < wanted else "PASS"

    if reference is not full:
        plain_at_budget = [row["throughput_at_budget"] for row in rows if row["role"] == "baseline"
                           and row["throughput_at_budget"] is not None]
        value = ratio(full["throughput_at_budget"], max(plain_at_budget, default=None))
        targets.append({
            "name": f"{full['service']} vs the better plain service: throughput at the p95 budget", "value": value,
            "shown": "-" if value is None else f"{value:.2f}x", "target": f">= {FULL_VS_BASELINE_TARGET:.1f}x",
            "result": judged(value, FULL_VS_BASELINE_TARGET),
        })
    for skip in (row for row in rows if row["role"] == "skip"):
        x = skip["flops_saved"] or 0.0
        wanted = wanted_gain(x)
        gain = ratio(skip["throughput_at_budget"], full["throughput_at_budget"])
        gain = None if gain is None else gain - 1
        targets.append({
            "name": f"{skip['service']} vs {full['service']}: throughput gain at the p95 budget (FLOPs saved X = {x:.1%})",
            "value": gain, "shown": "-" if gain is None else f"{gain:+.1%}",
            "target": f">= 0.9X/(1-X) = {wanted:+.1%}", "result": judged(gain, wanted),
        })
    paired = paired_ratios(result)
    for row in paired:
        x, median = row["flops_saved"], row["median"]
        if row["measure"] == "throughput ratio":
            wanted, fmt, target = FULL_VS_BASELINE_TARGET, "{:.2f}x", f">= {FULL_VS_BASELINE_TARGET:.1f}x"
        elif row["measure"] == "throughput gain":
            wanted, fmt = wanted_gain(x), "{:+.1%}"
            target = f">= 0.9X/(1-X) = {wanted:+.1%}"
        else:
            wanted, fmt = SKIP_EFFICIENCY * x, "{:.1%}"
            target = f">= 0.9X = {wanted:.1%}"
        shown = "-" if median is None else fmt.format(median)
        spread_fmt = "{:.2f}x" if row["measure"] == "throughput ratio" else "{:+.1%}"
        spread = "" if median is None else f" (rounds {spread_fmt.format(row['min'])} to {spread_fmt.format(row['max'])})"
        targets.append({
            "name": f"paired per round, concurrency {row['concurrency']}: {row['comparison']}, {row['measure']}"
                    + (f" (X = {x:.1%})" if row["measure"] != "throughput ratio" else "") + spread,
            "value": median, "shown": shown, "target": target, "result": judged(median, wanted),
        })
    for row in result["overhead"]:
        targets.append({
            "name": f"HTTP overhead, {row['service']} (DAS_MAX_LATENCY_MS={row['batching_wait_ms']}): "
                    f"e2e p50 {row['e2e_p50_ms']:.1f} ms vs in-process {row['inprocess_p50_ms']:.1f} ms"
                    + ("" if row.get("bentoml_floor_p50_ms") is None else
                       f" (a no-op BentoML endpoint: {row['bentoml_floor_p50_ms']:.1f} ms; DAS adds "
                       f"{row['das_added_ms']:.1f} ms)"),
            "value": row["overhead"], "shown": f"{row['overhead']:+.1%}", "target": f"<= {OVERHEAD_TARGET:.0%}",
            "result": row["result"],
        })
    return {"paired": paired, "budget_ms": round(budget, 3),
            "budget_rule": f"{result['settings']['budget_factor']:g} x {reference['service']} p50 at concurrency 1 "
                           f"({reference_p50:.1f} ms)",
            "targets": targets}


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def levels_table(result: dict[str, Any]) -> str:
    lines = ["| service | concurrency | req/s | req/s per round | p50 ms | p50 ms per round | p95 ms | p99 ms | "
             "mean batch | errors | within budget |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for row in result["services"]:
        for lv in row["levels"]:
            within = lv["p95_ms"] is not None and lv["p95_ms"] <= result["budget_ms"] and not lv["errors"]
            rounds = ", ".join(f"{t:.1f}" for t in lv["round_throughputs"])
            p50s = ", ".join(_ms(t) for t in lv.get("round_p50_ms", []))
            batch = "-" if lv.get("mean_batch_size") is None else f"{lv['mean_batch_size']:.2f}"
            lines.append(f"| {row['service']} | {lv['concurrency']} | {_rate(lv['throughput'])} | {rounds} | "
                         f"{_ms(lv['p50_ms'])} | {p50s} | "
                         f"{_ms(lv['p95_ms'])} | {_ms(lv['p99_ms'])} | {batch} | {lv['errors']} | "
                         f"{'yes' if within else 'no'} |")
    return "\n".join(lines)


def services_table(result: dict[str, Any]) -> str:
    lines = ["| service | plan | FLOPs saved | p50 ms at concurrency 1 | req/s at p95 <= budget | peak req/s |",
             "|---|---|--:|--:|--:|--:|"]
    for row in result["services"]:
        saved = "-" if row["flops_saved"] is None else f"{row['flops_saved']:.1%}"
        lines.append(f"| {row['service']} | {row['plan'] or 'transformers'} | {saved} | {_ms(row['p50_ms_at_1'])} | "
                     f"{_rate(row['throughput_at_budget'])} | {_rate(row['peak_throughput'])} |")
    return "\n".join(lines)


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| measure | value | target | result |", "|---|--:|--:|---|"]
    lines += [f"| {t['name']} | {t['shown']} | {t['target']} | {t['result']} |" for t in targets]
    return "\n".join(lines)


def describe(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    agree = result["answers_agree"]
    return (
        f"Machine: {m['device_name']}; {m['cpu_cores']} CPU cores; torch {m['torch']}, transformers "
        f"{m['transformers']}, Python {m['python']}. Load average before/after: "
        f"{', '.join(map(str, m['load_average_before']))} / {', '.join(map(str, m['load_average_after']))}.\n"
        f"Weights: {s['weights']}.\n"
        f"Setup: {s['dtype']} on {s['device']}, 1 worker per service, torch threads {s['torch_threads']}; "
        f"{s['image_size']} px PNG + \"{s['question']}\", top_k {s['top_k']}; closed loop at concurrency "
        f"{', '.join(map(str, s['concurrency']))}; per level and service {s['rounds']} rounds (services taking turns) "
        f"of {s['warmup_s']:g} s warm-up + {s['duration_s']:g} s counted (at least {s['min_requests']} requests in all)"
        + (f"; DAS settings from the environment: {s['das_env']}" if s["das_env"] else "") + ".\n"
        f"Latency budget: {result['budget_ms']:.1f} ms = {result['budget_rule']}. "
        + ("No plain service ran (see Weights). " if agree is None else
           f"Baseline and das-full answer alike: "
           f"{'yes' if agree['same'] else 'NO'} (max score difference {agree['max_score_difference']}). ")
        + f"Whole run: {result['wall_seconds']:.0f} s."
    )


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-service.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n\n".join([
        "# Service-level benchmark: DAS Serve vs a plain BentoML + transformers service",
        f"Run {result['created_at']}.",
        describe(result).replace("\n", "  \n"),
        "## Targets", targets_table(result["targets"]),
        "## Per service", services_table(result),
        "## Every load level", levels_table(result),
        "req/s: successful requests per second in the counted window; latencies are client side "
        "(request sent to response read). A level is within budget when its p95 is and it had no errors.",
    ])
    (out / "bench-service.md").write_text(text + "\n")


# ---------------------------------------------------------------------------------------------
# Combined summary with the model level (das bench)
# ---------------------------------------------------------------------------------------------
def model_targets(path: Path) -> list[dict[str, Any]]:
    """The target rows of one das bench result file."""
    model = json.loads(path.read_text())
    size = model["settings"]["size"]
    rows = []
    for row in model["rows"]:
        if row["efficiency"] is None:
            continue
        rows.append({
            "level": f"model ({size}, {model['settings']['dtype']})",
            "name": f"batch {row['batch_size']}, {row['plan']}: speedup efficiency "
                    f"(latency saved {row['latency_saved']:.1%} / FLOPs saved {row['flops_saved']:.1%})",
            "value": row["efficiency"], "shown": f"{row['efficiency']:.2f}", "target": f">= {row['target']:.1f}",
            "result": row["result"],
        })
    return rows


def service_level(result: dict[str, Any]) -> str:
    """The summary's level label of a service run: which weights it served."""
    model = result["settings"]["model"]
    return f"service ({'ViLT-B/32 size' if model == 'base' else model}, {result['settings']['dtype']})"


def write_summary(service: dict[str, Any], model_files: list[Path], out: Path,
                  service_files: list[Path] = ()) -> str:
    """bench.json / bench.md: the targets of the das bench files, of earlier service runs
    (``service_files``, e.g. the ViLT-B/32-size one) and of this run."""
    targets = []
    for path in model_files:
        targets += model_targets(path)
    for path in service_files:
        earlier = json.loads(path.read_text())
        targets += [{"level": service_level(earlier), **t} for t in earlier["targets"]]
    targets += [{"level": service_level(service), **t} for t in service["targets"]]
    lines = ["| level | measure | value | target | result |", "|---|---|--:|--:|---|"]
    lines += [f"| {t['level']} | {t['name']} | {t['shown']} | {t['target']} | {t['result']} |" for t in targets]
    table = "\n".join(lines)
    summary = {
        "created_at": service["created_at"], "machine": service["machine"], "targets": targets,
        "files": [str(p) for p in [*model_files, *service_files]] + [str(out / "bench-service.json")],
        "passed": sum(t["result"] == "PASS" for t in targets), "missed": sum(t["result"] == "MISS" for t in targets),
    }
    (out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "bench.md").write_text("\n\n".join([
        "# make bench: every target", f"Run {service['created_at']}; {describe(service).splitlines()[0]}",
        table, "Details: " + ", ".join(f"`{_relative(Path(f).with_suffix('.md'), out)}`" for f in summary["files"]) + ".",
    ]) + "\n")
    return table


def _relative(path: Path, out: Path) -> str:
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _levels(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,4,16; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,4,16; got {text!r}")
    return values


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated plan names like skip2,skip4; got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    from loadtests.harness import non_negative_int, positive_float, positive_int

    parser = argparse.ArgumentParser(
        prog="bench_service.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("weights")
    source.add_argument("--model", choices=["embedded", "base"], default="embedded",
                        help="embedded: the shipped plans/backbone and its VQA plans (default); base: a random "
                             "ViLT-B/32-size VQA checkpoint made here (about 0.65 s a request on one CPU core; make bench "
                             "runs it with --concurrency 1,2,4,8)")
    source.add_argument("--checkpoint", metavar="DIR",
                        help="a ViLT checkpoint directory with a VQA head and processor files (instead of --model)")
    source.add_argument("--skip-plan", type=_names, default=["skip4"], metavar="NAME,NAME",
                        help="embedded: the shipped VQA plans to compare with the full plan, one service each "
                             "(default skip4)")
    source.add_argument("--skip-layers", type=_levels, default=None, metavar="K,K",
                        help="base / --checkpoint: one skip plan per K, skipping K evenly spread layers "
                             "(default: half of them)")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=_levels, default=None, metavar="N,N",
                      help=f"closed-loop concurrency levels; 1 is always included (default "
                           f"{','.join(map(str, DEFAULT_LEVELS))}; --short: {','.join(map(str, SHORT_LEVELS))})")
    load.add_argument("--rounds", type=positive_int, default=None, metavar="R",
                      help="times every level of every service is measured, the services taking turns "
                           "(default 3; --short: 2)")
    load.add_argument("--duration", type=positive_float, default=None, metavar="S",
                      help="counted seconds per level and round (default 3; --short: 1.5)")
    load.add_argument("--warmup", type=positive_float, default=None, metavar="S",
                      help="uncounted seconds at the start of each level and round (default 1; --short: 0.5)")
    load.add_argument("--min-requests", type=positive_int, default=20, metavar="N",
                      help="a level's windows are stretched until at least N requests completed in them (over "
                           "all rounds), so its percentiles rest on some data on slow machines (default 20)")
    load.add_argument("--budget-factor", type=positive_float, default=4.0, metavar="F",
                      help="p95 latency budget = F x the baseline's p50 at concurrency 1 (default 4)")
    load.add_argument("--overhead-requests", type=positive_int, default=None, metavar="N",
                      help="request / in-process pairs for the HTTP overhead (default 200; --short: 40)")
    load.add_argument("--overhead-seconds", type=positive_float, default=120.0, metavar="S",
                      help="stop the overhead pairs after this long (at least 5 pairs; default 120)")
    load.add_argument("--zero-wait-overhead", action=argparse.BooleanOptionalAction, default=False,
                      help="also measure the overhead on a das-full started with DAS_MAX_LATENCY_MS=0 (one more "
                           "service start; default off: 0 is the service's default, so this matters only when "
                           "your environment sets DAS_MAX_LATENCY_MS)")
    load.add_argument("--short", action="store_true", help="a quick run: fewer levels, shorter windows")
    run_group = parser.add_argument_group("machine")
    run_group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                           help="auto = CUDA if available; passed to the services as DAS_DEVICE / BASELINE_DEVICE")
    run_group.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                           help="passed as DAS_DTYPE / BASELINE_DTYPE (the baseline casts the model, e.g. .half())")
    run_group.add_argument("--start-timeout", type=positive_float, default=900.0, metavar="S",
                           help="give up when a service is not ready after this long (default 900: a busy "
                                "2-core machine can take minutes to start one)")
    run_group.add_argument("--threads", type=non_negative_int, default=0, metavar="N",
                           help="torch threads of every service (OMP_NUM_THREADS) and of the in-process call "
                                "(default 0: torch's default, one per core, as `make serve` runs; on a 2-core host "
                                "that serves 1.65-1.8x what 1 thread does, load generator included: docs/benchmarks.md)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR",
                     help="write DIR/bench-service.json and .md (and service logs in DIR/service-logs)")
    out.add_argument("--model-results", nargs="*", default=[], metavar="FILE",
                     help="das bench JSON files to combine with this run into DIR/bench.json and DIR/bench.md")
    out.add_argument("--service-results", nargs="*", default=[], metavar="FILE",
                     help="bench-service.json files of earlier runs (e.g. --model base) to add to that summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    from loadtests.harness import stop_on_sigterm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stop_on_sigterm()  # so that `timeout` or CI stopping this run also stops the services it started
    args = build_parser().parse_args(argv)
    args.concurrency = args.concurrency or list(SHORT_LEVELS if args.short else DEFAULT_LEVELS)
    args.rounds = args.rounds or (2 if args.short else 3)
    args.duration = args.duration or (1.5 if args.short else 3.0)
    args.warmup = args.warmup or (0.5 if args.short else 1.0)
    args.overhead_requests = args.overhead_requests or (40 if args.short else 200)
    if (args.model_results or args.service_results) and not args.out:
        raise SystemExit("--model-results and --service-results need --out")
    result = run(args)
    print(describe(result))
    print()
    print(services_table(result))
    print()
    print(targets_table(result["targets"]))
    if args.out:
        out = Path(args.out)
        write_outputs(result, out)
        print(f"\nwrote {out / 'bench-service.json'} and {out / 'bench-service.md'}")
        if args.model_results or args.service_results:
            table = write_summary(result, [Path(p) for p in args.model_results], out,
                                  [Path(p) for p in args.service_results])
            print("\nEvery target of this run (model and service level):\n")
            print(table)
            print(f"\nwrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
