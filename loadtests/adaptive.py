"""Load-adaptive plans under overload: does shifting to cheaper plans hold a p95 latency SLO that the
fixed plan misses?

One `bentoml serve` (1 worker) over a copy of the embedded plans of ``--task`` (VQA by default; or
text retrieval with ``--candidates`` captions per request, which puts more model work behind each
HTTP request) in a temporary folder, active plan ``--active`` (default ``adapters``, the dearest, so
there are cheaper plans to shift to):

1. calibration, closed loop: the fixed plan's latency with one request at a time (the SLO is
   ``--slo-factor`` times its p95, unless ``--slo-ms`` is given), then its capacity (throughput
   with ``--concurrency`` requests in flight) and, for reference, the cheapest plan's capacity;
2. fixed mode, open loop: requests at ``--overload`` times the fixed plan's capacity, arriving at a
   fixed rate whatever the service does (open loop is what makes overload visible: latencies are
   measured from each request's scheduled send time, so a slow service cannot slow the load);
3. adaptive mode: the same load after store.json gains ``"adaptive": {TASK: {"slo_p95_ms": SLO, ...}}``.

The summary (printed, and written as JSON and markdown under ``--out``) gives per mode the p50/p95/
p99 latency, the failed share (503s count as SLO misses), the share of requests each plan served,
the plan shifts counted by ``das_plan_shifts_total``, and the accuracy cost: the mean of the served
plans' scores (plan.json metrics, as ``GET /plans/`` lists them) against the fixed plan's. It also
says when the offered load is beyond even the cheapest plan's measured capacity: then no plan can
hold the SLO and the adaptive mode can only slow the queue's growth.

    python -m loadtests.adaptive --duration 25

``--model base`` serves a ViLT-B/32-size VQA checkpoint (random init, made in the temporary folder)
with the built-in ``full`` plan active and plans of random skip adapters skipping ``--base-skips``
(4, 8 and 10) of its 12 layers, evenly spread: a model whose forward pass dominates each request, as a
production one does. The deepest rung matters: holding the SLO at 2x overload needs a plan that serves
well over twice what the fixed plan serves (skip10: 0.2x the FLOPs).
Its plans carry no accuracy metrics, so that run reports no accuracy cost (the embedded run does).

    python -m loadtests.adaptive --model base --calibrate-s 40 --duration 180 --window-s 15
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm
from urllib3 import encode_multipart_formdata

from loadtests.harness import (
    DEFAULT_RESULTS, REPO, http_get_json, positive_float, positive_int, running_service, stop_on_sigterm,
)
from service.store import STATE_FILE

SHIPPED_STORE = REPO / "plans"
MAX_CONNECTIONS = 256  # open-loop requests in flight at most, as a proxy in front would bound them (more only thrash the HTTP layer)
ROUTES = {"vqa": "/vqa", "retrieval": "/retrieval/texts"}  # the task -> the endpoint the load goes to
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
QUESTIONS = ("what color is the circle?", "how many shapes are there?", "is there a red square?",
             "what shape is the blue one?")
CAPTIONS = [f"a {size} {color} {shape}" for size in ("small", "large") for color in COLORS
            for shape in ("circle", "square")]


# -- requests -------------------------------------------------------------------------------------------
def payloads(task: str, candidates: int, count: int = 16, size: int = 96, seed: int = 0) -> list[tuple[bytes, str]]:
    """Multipart bodies encoded once, (body, content type): a scene image and a question (vqa) or
    ``candidates`` captions to rank (retrieval, one JSON array field)."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        image = Image.new("RGB", (size, size), (245, 245, 245))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            x, y, r = rng.randint(10, size - 10), rng.randint(10, size - 10), rng.randint(5, 14)
            color = rng.choice(list(COLORS.values()))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=color)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        text = ({"question": rng.choice(QUESTIONS)} if task == "vqa" else
                {"texts": json.dumps([rng.choice(CAPTIONS) for _ in range(candidates)])})
        bodies.append(encode_multipart_formdata({"image": ("scene.png", buffer.getvalue(), "image/png"), **text}))
    return bodies


@dataclass
class Outcome:
    sent_at: float  # seconds since the phase started (scheduled time in open loop)
    latency_s: float  # from the scheduled send time to the answer
    status: int  # HTTP status; 0: no answer (connection error or client timeout)
    plan: str | None
    server_ms: float | None = None  # the response's latency_ms: from arrival at the service to the answer


class _StaleConnection(Exception):
    """The server closed a connection before answering on it."""


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, at most ``max_connections`` open.

    The load generator shares the machine's cores with the service, so it must spend as little CPU
    per request as it can: httpx costs about a millisecond per request, this a tenth of that."""

    def __init__(self, url: str, max_connections: int, timeout_s: float = 60) -> None:
        parsed = urlparse(url)
        self.host, self.port, self.timeout_s = parsed.hostname, parsed.port, timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for _, writer in self._idle:
            writer.close()

    async def post(self, path: str, data: bytes, content_type: str) -> tuple[int, bytes]:
        """(status, body); raises ConnectionError when there is no complete answer within timeout_s."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        async with self._slots:
            while True:
                reused = bool(self._idle)
                try:
                    reader, writer = self._idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
                except OSError as exc:
                    raise ConnectionError(str(exc)) from None
                try:
                    writer.write(head + data)
                    status, body, keep_alive = await asyncio.wait_for(self._response(reader), self.timeout_s)
                except _StaleConnection:
                    writer.close()
                    if reused:  # the server closed it while idle (keep-alive timeout): send again on a new one
                        continue
                    raise ConnectionError("the server closed the connection without answering") from None
                except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                    writer.close()
                    raise ConnectionError(repr(exc)) from None
                if keep_alive:
                    self._idle.append((reader, writer))
                else:
                    writer.close()
                return status, body

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        status_line = await reader.readline()
        if not status_line:
            raise _StaleConnection()
        status = int(status_line.split()[1])
        length, chunked, keep_alive = 0, False, True
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                keep_alive = value != b"close"
        if not chunked:
            return status, await reader.readexactly(length), keep_alive
        body = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readline()
        await reader.readline()
        return status, body, keep_alive


async def _send(client: RawClient, route: str, body: tuple[bytes, str],
                plan: str | None) -> tuple[int, str | None, float | None]:
    """POST one request; (status, the plan that served it, the service's latency_ms). Status 0: no answer."""
    data, content_type = _with_field(body, "plan", plan) if plan else body
    try:
        status, answer = await client.post(route, data, content_type)
    except ConnectionError:
        return 0, None, None
    if status != 200:
        return status, None, None
    parsed = json.loads(answer)
    return 200, parsed["plan"]["name"], parsed["latency_ms"]


def _with_field(body: tuple[bytes, str], name: str, value: str) -> tuple[bytes, str]:
    """The multipart body with one more text field (its boundary is kept)."""
    data, content_type = body
    boundary = content_type.split("boundary=")[1].encode()
    field = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n'
             + value.encode() + b"\r\n")
    return field + data, content_type


async def closed_loop(url: str, route: str, bodies, concurrency: int, seconds: float, plan: str | None) -> list[Outcome]:
    """``concurrency`` clients, each sending its next request as soon as the last one is answered."""
    outcomes: list[Outcome] = []
    async with RawClient(url, concurrency) as client:
        start = time.perf_counter()

        async def user(index: int) -> None:
            i = index
            while time.perf_counter() - start < seconds:
                sent = time.perf_counter()
                status, served, server_ms = await _send(client, route, bodies[i % len(bodies)], plan)
                outcomes.append(Outcome(sent - start, time.perf_counter() - sent, status, served, server_ms))
                i += concurrency

        await asyncio.gather(*(user(i) for i in range(concurrency)))
    return outcomes


async def open_loop(url: str, route: str, bodies, rate: float, seconds: float, label: str) -> list[Outcome]:
    """Requests scheduled every 1/rate s for ``seconds``, each sent on time however many are pending."""
    count = int(rate * seconds)
    outcomes: list[Outcome] = []
    async with RawClient(url, MAX_CONNECTIONS) as client:
        progress = tqdm(total=count, desc=label, unit="req", leave=False)
        start = time.perf_counter()

        async def one(i: int, scheduled: float) -> None:
            status, served, server_ms = await _send(client, route, bodies[i % len(bodies)], None)
            outcomes.append(Outcome(scheduled - start, time.perf_counter() - scheduled, status, served, server_ms))
            progress.update()

        tasks = []
        for i in range(count):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
        progress.close()
    return outcomes


# -- statistics -----------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (as the service's controller computes p95); inf for failed requests."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def completed_rate(outcomes: list[Outcome], seconds: float) -> float:
    """Requests per second answered (200) within the first ``seconds`` of a closed-loop run. The requests
    still in flight when it ends are not counted: with 64 in flight on a model that serves a few per
    second, counting them overstated capacity by a third."""
    return sum(o.status == 200 and o.sent_at + o.latency_s <= seconds for o in outcomes) / seconds


def latencies_ms(outcomes: list[Outcome], since_s: float = 0.0) -> list[float]:
    """Latencies in ms of requests sent after ``since_s``; a failed request counts as infinitely slow."""
    return [o.latency_s * 1000 if o.status == 200 else math.inf for o in outcomes if o.sent_at >= since_s]


def phase_summary(outcomes: list[Outcome], seconds: float, scores: dict[str, float | None], slo_ms: float,
                  settle_s: float) -> dict[str, Any]:
    served = Counter(o.plan for o in outcomes if o.status == 200)
    ok = sum(served.values())
    known = {plan: n for plan, n in served.items() if scores.get(plan) is not None}
    mean_score = sum(scores[p] * n for p, n in known.items()) / sum(known.values()) if known else None
    every, settled = latencies_ms(outcomes), latencies_ms(outcomes, settle_s)
    return {
        "requests": len(outcomes), "ok": ok, "failed_share": round(1 - ok / len(outcomes), 4) if outcomes else None,
        "failed_by_status": dict(Counter(str(o.status) for o in outcomes if o.status != 200)),
        # served per second from the first send to the last answer (the queue may drain after the load stops)
        "throughput_rps": round(ok / max([seconds] + [o.sent_at + o.latency_s for o in outcomes]), 2),
        "p50_ms": _round(percentile(every, 0.5)), "p95_ms": _round(percentile(every, 0.95)),
        "p99_ms": _round(percentile(every, 0.99)),
        f"p95_ms_after_{settle_s:g}s": _round(percentile(settled, 0.95)),
        "server_p95_ms": _round(percentile([o.server_ms for o in outcomes if o.server_ms is not None], 0.95)),
        "slo_held": percentile(every, 0.95) <= slo_ms,
        "plan_share": {plan: round(n / ok, 4) for plan, n in sorted(served.items())} if ok else {},
        "mean_score": None if mean_score is None else round(mean_score, 4),
        "timeline": timeline(outcomes, seconds),
    }


def timeline(outcomes: list[Outcome], seconds: float, step_s: float = 5.0) -> list[dict[str, Any]]:
    """Per ``step_s`` of send time: p95 and which plans served."""
    rows = []
    for start in range(0, math.ceil(seconds), int(step_s)):
        window = [o for o in outcomes if start <= o.sent_at < start + step_s]
        plans = Counter(o.plan for o in window if o.status == 200)
        rows.append({"from_s": start, "p95_ms": _round(percentile(latencies_ms(window), 0.95)),
                     "plans": dict(plans.most_common())})
    return rows


def _round(value: float) -> float | None:
    return None if math.isnan(value) else (value if math.isinf(value) else round(value, 1))


def shift_counts(url: str, task: str) -> dict[str, float]:
    """das_plan_shifts_total for the task, keyed "direction from->to"."""
    with httpx.Client(base_url=url, timeout=30) as client:
        text = client.get("/metrics").text
    counts = {}
    for family in text_string_to_metric_families(text):
        if family.name == "das_plan_shifts":
            for s in family.samples:
                if s.name == "das_plan_shifts_total" and s.labels["task"] == task and s.value:
                    counts[f"{s.labels['direction']} {s.labels['from_plan']}->{s.labels['to_plan']}"] = s.value
    return counts


# -- the plan store ---------------------------------------------------------------------------------------
BASE_SKIPS = (4, 8, 10)  # --model base: layers of 12 its cheaper plans skip (about 0.69x, 0.38x, 0.22x the FLOPs)


def make_base_store(root: Path, base_skips: tuple[int, ...] = BASE_SKIPS) -> tuple[Path, Path]:
    """--model base: a ViLT-B/32-size VQA checkpoint (random init) and a store with the built-in full plan
    active and random-adapter plans skipping ``base_skips`` layers each. Returns (backbone dir, store)."""
    from models.backbones.base import load_backbone
    from models.bench.fixtures import WORDS, bench_config, build_plans
    from models.backbones.vilt.checkpoint import save_vilt_checkpoint
    from models.das.plan import save_plan

    backbone_dir, store = root / "checkpoint", root / "plans"
    save_vilt_checkpoint(backbone_dir, bench_config("base"), "vqa", WORDS, seed=0)
    backbone = load_backbone(backbone_dir, "cpu")
    # skip adapters of bottleneck hidden / 4 (192), as `das bench` uses at this size
    _, *skips = build_plans(backbone, list(base_skips), "even", skip_bottleneck=backbone.config.hidden_size // 4)
    for plan in skips:
        save_plan(store / "vqa" / plan.name, plan.spec, plan.modules)
    write_state(store, {"loaded": {"vqa": [plan.name for plan in skips]}, "active": {"vqa": "full"}})
    return backbone_dir, store


def make_store(root: Path, task: str, active: str) -> Path:
    """A copy of the shipped plans of ``task`` with ``active`` active (the backbone is read in place)."""
    store = root / "plans"
    names = sorted(p.parent.name for p in (SHIPPED_STORE / task).glob("*/plan.json"))
    if active not in names:
        raise SystemExit(f"--active must be one of the shipped {task} plans: {', '.join(names)}")
    shutil.copytree(SHIPPED_STORE / task, store / task)
    write_state(store, {"loaded": {task: names}, "active": {task: active}})
    return store


def write_state(store: Path, state: dict[str, Any]) -> None:
    """Replace store.json atomically (workers re-read it every 0.5 s and must never see half of it)."""
    tmp = store / f".{STATE_FILE}.loadtest.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, store / STATE_FILE)


def wait_idle(url: str, route: str, body: tuple[bytes, str], plan: str, fast_s: float, pause_s: float,
              timeout_s: float = 300) -> None:
    """Wait ``pause_s``, then until a lone request is answered within ``fast_s`` (the queue is empty)."""
    time.sleep(pause_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        started = time.perf_counter()
        status, _, _ = asyncio.run(_probe(url, route, body, plan))
        if status == 200 and time.perf_counter() - started < fast_s:
            return
        time.sleep(1)
    raise SystemExit(f"the service was still busy {timeout_s:.0f} s after the load stopped")


async def _probe(url: str, route: str, body: tuple[bytes, str], plan: str):
    async with RawClient(url, 1, timeout_s=120) as client:
        return await _send(client, route, body, plan)


def wait_for(predicate, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.25)


# -- the run ----------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    task, route = args.task, ROUTES[args.task]
    bodies = payloads(task, args.candidates)
    with tempfile.TemporaryDirectory(prefix="das-adaptive-") as tmp:
        backbone_env = {}
        if args.model == "base":
            if task != "vqa":
                raise SystemExit("--model base loads VQA only")
            args.active = args.active or "full"
            backbone_dir, store = make_base_store(Path(tmp), args.base_skips)
            backbone_env = {"DAS_BACKBONE": str(backbone_dir)}
        else:
            args.active = args.active or "adapters"
            store = make_store(Path(tmp), task, args.active)
        args.out.mkdir(parents=True, exist_ok=True)
        threads = str(args.torch_threads)
        # its own BENTOML_HOME: every `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it
        # starts, so one started elsewhere on this machine would wipe this run's counters (shifts)
        with running_service(args.out / "serve.log", workers=1, ready_timeout_s=args.start_timeout_s,
                             DAS_PLANS=str(store), DAS_DEVICE="cpu", OMP_NUM_THREADS=threads,
                             # the overload must show as queueing (what the controller reacts to), not as
                             # 429s from the service's in-flight cap (64 by default)
                             DAS_MAX_CONCURRENCY=str(MAX_CONNECTIONS),
                             MKL_NUM_THREADS=threads, BENTOML_HOME=str(Path(tmp) / "bentoml-home"),
                             **backbone_env) as service:
            url = service.url
            listing = http_get_json(f"{url}/plans/")["tasks"][task]
            plans = {p["name"]: p for p in listing["plans"]}
            scores = {name: p["score"] for name, p in plans.items()}
            cheapest = min(plans, key=lambda n: plans[n]["flops_ratio"])
            print("plans: " + ", ".join(f"{n} (flops ratio {p['flops_ratio']:.3f}, score "
                                         f"{'-' if p['score'] is None else format(p['score'], '.3f')})"
                                         for n, p in sorted(plans.items(), key=lambda kv: -kv[1]["flops_ratio"])),
                  flush=True)

            asyncio.run(closed_loop(url, route, bodies, 2, 3, args.active))  # warm-up
            print("calibrating ...", flush=True)
            single = asyncio.run(closed_loop(url, route, bodies, 1, args.calibrate_s / 2, args.active))
            unloaded_p95 = percentile(latencies_ms(single), 0.95)
            fixed_cap = asyncio.run(closed_loop(url, route, bodies, args.concurrency, args.calibrate_s, args.active))
            # the requests still in flight when a measurement ends keep the model busy: the next one starts idle
            wait_idle(url, route, bodies[0], args.active, 3 * unloaded_p95 / 1000, args.drain_s)
            cheap_cap = asyncio.run(closed_loop(url, route, bodies, args.concurrency, args.calibrate_s, cheapest))
            wait_idle(url, route, bodies[0], args.active, 3 * unloaded_p95 / 1000, args.drain_s)
            capacity = completed_rate(fixed_cap, args.calibrate_s)
            cheapest_capacity = completed_rate(cheap_cap, args.calibrate_s)
            slo_ms = args.slo_ms or round(args.slo_factor * unloaded_p95)
            rate = args.overload * capacity
            calibration = {
                "unloaded_p95_ms": _round(unloaded_p95), "capacity_rps": round(capacity, 2),
                "cheapest_plan": cheapest, "cheapest_capacity_rps": round(cheapest_capacity, 2),
                "capacity_concurrency": args.concurrency, "slo_p95_ms": slo_ms, "offered_rps": round(rate, 2),
            }
            print(f"fixed plan {args.active}: p95 {unloaded_p95:.0f} ms one at a time, capacity {capacity:.1f} req/s; "
                  f"{cheapest}: {cheapest_capacity:.1f} req/s -> SLO p95 {slo_ms} ms, offered load {rate:.1f} req/s",
                  flush=True)

            results = {}
            for mode in ("fixed", "adaptive"):
                if mode == "adaptive":
                    state = json.loads((store / STATE_FILE).read_text())
                    state["adaptive"] = {task: {"slo_p95_ms": slo_ms, "window_s": args.window_s,
                                                "min_samples": args.min_samples, "cooldown_s": args.cooldown_s}}
                    write_state(store, state)
                    wait_for(lambda: "adaptive" in http_get_json(f"{url}/plans/")["tasks"][task],
                             "the service to read the adaptive settings")
                outcomes = asyncio.run(open_loop(url, route, bodies, rate, args.duration, f"{mode} at {rate:.0f} req/s"))
                results[mode] = phase_summary(outcomes, args.duration, scores, slo_ms, args.settle_s)
                # the service keeps working on requests whose clients gave up: start the next run on an idle one
                wait_idle(url, route, bodies[0], args.active, 3 * unloaded_p95 / 1000, args.drain_s)
            results["adaptive"]["shifts"] = shift_counts(url, task)

    fixed_score = scores[args.active]
    adaptive_score = results["adaptive"]["mean_score"]
    return {
        "task": task, "route": route, "model": args.model,
        "candidates": args.candidates if task == "retrieval" else None, "active_plan": args.active,
        "duration_s": args.duration, "overload": args.overload,
        "calibration": calibration, "fixed": results["fixed"], "adaptive": results["adaptive"],
        "scores": scores,
        "accuracy_cost": None if adaptive_score is None or fixed_score is None else {
            "fixed_plan_score": round(fixed_score, 4), "adaptive_mean_score": adaptive_score,
            "relative_change": round(adaptive_score / fixed_score - 1, 4)},
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
    }


def markdown(report: dict[str, Any]) -> str:
    cal, fixed, adaptive = report["calibration"], report["fixed"], report["adaptive"]
    settle = next(k for k in fixed if k.startswith("p95_ms_after_"))
    lines = [
        f"# Load-adaptive plans under {report['overload']:g}x overload ({report['route']}"
        + (f", {report['candidates']} candidates" if report["candidates"] else "") + f", active plan {report['active_plan']}"
        + (", ViLT-B/32 size, random init" if report.get("model") == "base" else "") + ")",
        "",
        f"Calibration: {report['active_plan']} answers one request at a time with p95 {cal['unloaded_p95_ms']} ms "
        f"and serves {cal['capacity_rps']} req/s at {cal['capacity_concurrency']} in flight; the cheapest plan "
        f"({cal['cheapest_plan']}) serves {cal['cheapest_capacity_rps']} req/s. SLO: p95 <= {cal['slo_p95_ms']} ms. "
        f"Offered load: {cal['offered_rps']} req/s for {report['duration_s']} s per mode (open loop)."
        + ("" if cal["offered_rps"] <= cal["cheapest_capacity_rps"] else
           f" **That is more than even {cal['cheapest_plan']} can serve: no plan can hold the SLO at this load; "
           "adaptive mode can only slow the queue's growth.**"), "",
        f"| mode | p50 ms | p95 ms | p99 ms | {settle.replace('_', ' ')} | SLO held | failed | req/s served | "
        "service's p95 ms | plans served | mean score |",
        "|---|--:|--:|--:|--:|---|--:|--:|--:|---|--:|",
    ]
    for mode, row in (("fixed", fixed), ("adaptive", adaptive)):
        share = ", ".join(f"{p} {s:.0%}" for p, s in row["plan_share"].items())
        lines.append(f"| {mode} | {row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | {row[settle]} | "
                     f"{'yes' if row['slo_held'] else 'no'} | {row['failed_share']:.1%} | {row['throughput_rps']} | "
                     f"{row['server_p95_ms']} | {share} | {row['mean_score']} |")
    cost = report["accuracy_cost"]
    if cost:
        lines += ["", f"Accuracy cost (plan.json {report['task']} scores, val split): {cost['adaptive_mean_score']} served on average "
                      f"vs {cost['fixed_plan_score']} for the fixed plan ({cost['relative_change']:+.1%})."]
    lines += ["", f"Plan shifts (das_plan_shifts_total): {adaptive.get('shifts') or 'none'}", "",
              "Timeline of the adaptive run (p95 ms and plans per 5 s of send time):", ""]
    lines += [f"- {row['from_s']:>3} s: p95 {row['p95_ms']} ms, {row['plans']}" for row in adaptive["timeline"]]
    lines += ["", f"Machine: {report['machine']['cpus']} CPUs, 1-minute load average {report['machine']['load_average_1m']} "
                  "at the end (the load generator shares them with the service)."]
    return "\n".join(lines) + "\n"


def skip_counts(text: str) -> tuple[int, ...]:
    """'4,8,10' -> (4, 8, 10): distinct layer counts between 1 and 11 (ViLT-B/32 has 12 layers)."""
    try:
        counts = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not counts or not all(1 <= n <= 11 for n in counts):
        raise argparse.ArgumentTypeError(f"skip counts must lie between 1 and 11, got {text!r}")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.adaptive", description=__doc__.split("\n\n")[0],
        epilog="Takes about 3 x --calibrate-s + 2 x (--duration + --drain-s) + the service's start-up. "
               "Writes <out>/adaptive.json, <out>/adaptive.md and <out>/serve.log.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", choices=sorted(ROUTES), default="vqa",
                        help="vqa: POST /vqa; retrieval: POST /retrieval/texts with --candidates captions per request")
    parser.add_argument("--candidates", type=positive_int, default=32,
                        help="captions per retrieval request (more: more model work per HTTP request)")
    parser.add_argument("--model", choices=["embedded", "base"], default="embedded",
                        help="embedded: copies of the shipped plans; base: a ViLT-B/32-size checkpoint (random init) "
                             "with random-adapter plans skipping --base-skips layers (see above)")
    parser.add_argument("--base-skips", type=skip_counts, default=BASE_SKIPS, metavar="N,N,...",
                        help="--model base: how many of the 12 layers each cheaper plan skips")
    parser.add_argument("--active", default=None,
                        help="the fixed plan, and the adaptive mode's active plan (default: adapters; full with "
                             "--model base)")
    parser.add_argument("--overload", type=positive_float, default=2.0,
                        help="offered load as a multiple of the fixed plan's measured capacity")
    parser.add_argument("--duration", type=positive_float, default=25.0, help="seconds of open-loop load per mode")
    parser.add_argument("--calibrate-s", type=positive_float, default=6.0, help="seconds per capacity measurement")
    parser.add_argument("--concurrency", type=positive_int, default=64,
                        help="requests in flight while measuring capacity (enough to keep the batcher's batches "
                             "of 16 full)")
    parser.add_argument("--slo-ms", type=positive_float, default=None,
                        help="the p95 SLO; default: --slo-factor x the fixed plan's p95 one request at a time")
    parser.add_argument("--slo-factor", type=positive_float, default=4.0, help="see --slo-ms")
    parser.add_argument("--window-s", type=positive_float, default=5.0, help="adaptive setting window_s")
    parser.add_argument("--min-samples", type=positive_int, default=20, help="adaptive setting min_samples")
    parser.add_argument("--cooldown-s", type=positive_float, default=5.0, help="adaptive setting cooldown_s")
    parser.add_argument("--settle-s", type=positive_float, default=5.0,
                        help="also report p95 over requests sent after this many seconds of each run")
    parser.add_argument("--drain-s", type=positive_float, default=3.0,
                        help="pause after each run, before waiting for the service to answer a lone request fast")
    parser.add_argument("--torch-threads", type=positive_int, default=1,
                        help="the service's torch threads (OMP_NUM_THREADS): 1 leaves the second of 2 cores to "
                             "the HTTP event loop and the load generator; more threads than free cores collapse "
                             "throughput on a busy machine")
    parser.add_argument("--start-timeout-s", type=positive_float, default=600,
                        help="how long the service may take to start (minutes on a busy 2-core machine)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "adaptive", help="where the summary goes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    report = run(args)
    text = markdown(report)
    (args.out / "adaptive.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "adaptive.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
