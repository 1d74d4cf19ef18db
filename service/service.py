"""The DAS Serve BentoML service: VQA, NLVR2 and image-text retrieval over per-task DAS plans.

Thin by design: each endpoint turns HTTP input into a call on ``models.runtime.DASRuntime`` with a
plan from ``service.registry.PlanRegistry``, and the result back into JSON. Configuration comes
from environment variables (see the README): DAS_BACKBONE, DAS_PLANS, DAS_DEVICE, DAS_DTYPE,
DAS_ADMIN_TOKEN, DAS_WORKERS, DAS_MAX_BATCH_SIZE, DAS_MAX_LATENCY_MS, DAS_MAX_QUEUE, DAS_TORCH_THREADS,
DAS_MAX_CONCURRENCY, DAS_MALLOC_TRIM_S, DAS_MALLOC_THRESHOLD, DAS_HEADER_TIMEOUT_S.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any, TypeVar

import bentoml
from bentoml.validators import ContentType
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from models.tasks import TASKS
from service import openapi
from service.adaptive import LoadShifter
from service.batching import MicroBatcher, Overloaded
from service.errors import ErrorShapeMiddleware, RegistryError, quiet_client_errors
from service.guard import (
    ARRIVED_KEY,
    FORM_LISTS_KEY,
    InputGuardMiddleware,
    RETRY_AFTER_S,
    JsonOnlyMiddleware,
    install_header_timeout,
    serve_behind_edge,
)
from service.inputs import InputError, check_text, load_image, text_list
from service.memory import MAX_MMAP_THRESHOLD, pin_malloc_thresholds, trim_heap
from service.policy import check_flops_budget, reference_input
from service.registry import PlanRegistry
from service.store import PlanStore, default_store_for
from service.schemas import (
    AdminResponse,
    ImageRankingResponse,
    NLVR2Response,
    PlanMetrics,
    PlansOverview,
    TextRankingResponse,
    VQAResponse,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLANS = REPO_ROOT / "plans"
DEFAULT_BACKBONE = DEFAULT_PLANS / "backbone"
SYNC_INTERVAL_S = 0.5  # how often a worker re-reads the plan store (swaps reach it within this)
SYNC_ERROR_LOG_S = 60.0  # the sync loop logs the same failure again at most this often
log = logging.getLogger(__name__)
ImageFile = Annotated[Path, ContentType("image/*")]
# Field descriptions and examples for the OpenAPI page (BentoML derives the schema from these hints).
Question = Annotated[str, Field(description="Question about the image; cut to the model's maximum text length "
                                            "(the response says so).", examples=["what color is the circle?"])]
Statement = Annotated[str, Field(description="Statement about the image pair.",
                                 examples=["the left image has more circles than the right image"])]
Caption = Annotated[str, Field(description="The caption to rank images for.", examples=["a small red circle"])]
Candidates = Annotated[list[str] | str, Field(
    description="Candidate captions: repeated form fields (-F texts=a -F texts=b) or one JSON array string.",
    examples=[["a small red circle", "a large blue square"]])]
PlanName = Annotated[str | None, Field(description="Plan to run (a loaded plan of the task, see GET /plans/); "
                                                   "default: the task's active plan.", examples=["skip2"])]
TopK = Annotated[int, Field(description="How many answers to return (1-100).", examples=[5])]
FlopsBudget = Annotated[float | None, Field(
    description="FLOPs budget as a fraction of the full backbone (0 < x <= 1): runs the most accurate loaded plan "
                "whose flops_ratio (GET /plans/) fits; 422 if none does. Not together with 'plan'.", examples=[0.6])]
TaskName = Annotated[str, Field(description="vqa, nlvr2 or retrieval.", examples=["vqa"])]
LoadedPlanName = Annotated[str, Field(description="A plan name of that task.", examples=["skip2"])]
ArchiveFile = Annotated[Path, ContentType("application/*")]
Model = TypeVar("Model", bound=BaseModel)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {os.environ[name]!r}") from None


def _torch_threads_setting() -> int | None:
    """DAS_TORCH_THREADS: torch threads per worker, or None (unset) for torch's default (one per core).
    The default oversubscribes a busy or shared host, or one with several workers: set it to about
    cores / workers there. Checked at import so that `bentoml serve` stops at once on a bad value."""
    if not os.environ.get("DAS_TORCH_THREADS", "").strip():
        return None
    threads = _env_int("DAS_TORCH_THREADS", 0)
    if threads < 1:
        raise SystemExit(f"DAS_TORCH_THREADS must be an integer >= 1, got {os.environ['DAS_TORCH_THREADS']!r}")
    return threads


def _set_torch_threads(threads: int | None) -> None:
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)  # process-wide: the model thread picks it up too
    with contextlib.suppress(RuntimeError):  # refused once inter-op work has started; intra-op is what counts
        torch.set_num_interop_threads(threads)


TORCH_THREADS = _torch_threads_setting()
# Worker memory under a varied input mix (service/memory.py). Every DAS_MALLOC_TRIM_S seconds each worker
# returns the heap's free pages to the system (0 = never); DAS_MALLOC_THRESHOLD pins glibc's mmap threshold
# instead (0 = glibc's own, the default: a pin slows forward passes by 10-40%).
MALLOC_THRESHOLD = _env_int("DAS_MALLOC_THRESHOLD", 0)
if not 0 <= MALLOC_THRESHOLD <= MAX_MMAP_THRESHOLD:
    raise SystemExit(f"DAS_MALLOC_THRESHOLD must be 0 (off) or 1..{MAX_MMAP_THRESHOLD} bytes, got {MALLOC_THRESHOLD}")
try:
    MALLOC_TRIM_S = float(os.environ.get("DAS_MALLOC_TRIM_S", 10))
except ValueError:
    raise SystemExit(f"DAS_MALLOC_TRIM_S must be a number of seconds, got {os.environ['DAS_MALLOC_TRIM_S']!r}") from None
if not 0 <= MALLOC_TRIM_S < float("inf"):
    raise SystemExit(f"DAS_MALLOC_TRIM_S must be >= 0 (0: never trim), got {MALLOC_TRIM_S}")
WORKERS = _env_int("DAS_WORKERS", 1)
# In-flight HTTP requests per worker (0: no cap). Past it BentoML answers 429 (+ Retry-After, see
# service/guard.py) at once, before the body is read. 64 = the running batch plus three full batches
# waiting (DAS_MAX_BATCH_SIZE 16): more in flight adds only queueing latency and upload memory.
MAX_CONCURRENCY = _env_int("DAS_MAX_CONCURRENCY", 64)
if WORKERS < 1 or MAX_CONCURRENCY < 0:
    raise SystemExit(f"need DAS_WORKERS >= 1 and DAS_MAX_CONCURRENCY >= 0, got {WORKERS} and {MAX_CONCURRENCY}")
# Requests waiting for a batch, per worker; past it the handler answers 503 + Retry-After, after the
# upload was read and decoded. By default the in-flight cap: the cheap 429 at the door sheds first and
# the queue limit backs it up (it binds only when DAS_MAX_QUEUE is set lower, or with no in-flight cap).
MAX_QUEUE = _env_int("DAS_MAX_QUEUE", MAX_CONCURRENCY or 256)
if MAX_QUEUE < 1:
    raise SystemExit(f"DAS_MAX_QUEUE must be an integer >= 1, got {MAX_QUEUE}")
# Seconds a connection may take to send a request's headers (0: no limit); uvicorn has no such
# timeout, so slowly trickled headers held a connection forever.
try:
    HEADER_TIMEOUT_S = float(os.environ.get("DAS_HEADER_TIMEOUT_S", 10))
except ValueError:
    raise SystemExit(f"DAS_HEADER_TIMEOUT_S must be a number of seconds, got {os.environ['DAS_HEADER_TIMEOUT_S']!r}") from None
if not 0 <= HEADER_TIMEOUT_S < float("inf"):
    raise SystemExit(f"DAS_HEADER_TIMEOUT_S must be >= 0 (0: no limit), got {HEADER_TIMEOUT_S}")
if HEADER_TIMEOUT_S:
    install_header_timeout(HEADER_TIMEOUT_S)


def _error(ctx: bentoml.Context, message: str, status: int, **headers: str) -> JSONResponse:
    """A JSON error body. BentoML copies ctx.response.status_code onto the response of APIs that
    take a context, so the status is set there too."""
    ctx.response.status_code = status
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers or None)


def _plan_info(plan) -> dict[str, Any]:
    return {"task": plan.task, "name": plan.name, "version": plan.version, "skipped_layers": list(plan.skipped_layers)}


def _flops_info(report) -> dict[str, Any]:
    return {"full": report.full, "executed": report.executed, "saved_ratio": round(report.saved_ratio, 6)}


async def _list_plans(request: Request) -> JSONResponse:
    overview = PlansOverview.model_validate(bentoml.get_current_service().plans_overview())
    return JSONResponse(overview.model_dump(mode="json"))


async def _docs_json(request: Request) -> JSONResponse:
    return JSONResponse(openapi.spec(DASService))


# Mounted at the root: GET /plans answers without a redirect, and /docs.json (BentoML's own route
# comes after mounted apps) serves the OpenAPI spec corrected by service/openapi.py.
root_app = Starlette(routes=[Route("/plans", _list_plans, methods=["GET"]), Route("/plans/", _list_plans, methods=["GET"]),
                             Route("/docs.json", _docs_json, methods=["GET"])])
quiet_client_errors()


@bentoml.asgi_app(root_app, path="/")
@bentoml.service(
    name="das-serve",
    workers=WORKERS,
    # BentoML's max_concurrency is per service and split evenly over the workers; its 429 is the
    # cheapest refusal there is (outside every middleware, before the body is read)
    traffic={"timeout": 120, **({"max_concurrency": MAX_CONCURRENCY * WORKERS} if MAX_CONCURRENCY else {})},
)
class DASService:
    """One frozen backbone, per-task DAS plans, hot-swappable."""

    def __init__(self) -> None:
        _set_torch_threads(TORCH_THREADS)  # before any torch work in this worker
        if MALLOC_THRESHOLD:
            pin_malloc_thresholds(MALLOC_THRESHOLD)
        from models.backbones.base import load_backbone
        from models.runtime import DASRuntime
        from service.metrics import ServiceMetrics

        backbone_dir = os.environ.get("DAS_BACKBONE", str(DEFAULT_BACKBONE))
        self.backbone = load_backbone(backbone_dir, os.environ.get("DAS_DEVICE", "auto"), os.environ.get("DAS_DTYPE", "float32"))
        self.runtime = DASRuntime(self.backbone)
        # no DAS_PLANS: the store the backbone ships in (DAS_BACKBONE=plans/meter/backbone serves plans/meter)
        plans_dir = os.environ.get("DAS_PLANS") or default_store_for(backbone_dir, DEFAULT_PLANS)
        self.registry = PlanRegistry(self.backbone, PlanStore(plans_dir))
        self.metrics = ServiceMetrics()
        self.batcher = MicroBatcher(
            max_batch_size=_env_int("DAS_MAX_BATCH_SIZE", 16),
            max_latency_ms=_env_int("DAS_MAX_LATENCY_MS", 0),  # work-conserving: no wait by default
            max_queue=MAX_QUEUE,
            on_batch=lambda key, size: self.metrics.batch_size.labels(key[0]).observe(size),
        )
        self.shifter = LoadShifter(on_shift=self.metrics.observe_shift, on_serving=self.metrics.set_served_plan)
        self.admin_token = os.environ.get("DAS_ADMIN_TOKEN", "")
        self._sync()
        self._stop = threading.Event()
        threading.Thread(target=self._sync_loop, name="das-plan-sync", daemon=True).start()
        if MALLOC_TRIM_S:
            threading.Thread(target=self._trim_loop, name="das-malloc-trim", daemon=True).start()

    # -- plan store convergence ---------------------------------------------------------------
    def _sync(self, force: bool = False) -> None:
        try:
            changed = self.registry.sync(force=force)  # an unreadable store.json changes nothing served
        finally:
            for kind, count in self.registry.drain_store_errors().items():
                self.metrics.store_errors.labels(kind).inc(count)
        if changed:
            self.metrics.set_active_plans(self.registry.snapshot())
            self.shifter.configure(self.registry.adaptive)

    def _sync_loop(self) -> None:
        last_message, last_logged = None, 0.0
        while not self._stop.wait(SYNC_INTERVAL_S):
            try:
                self._sync()
            except Exception as exc:  # noqa: BLE001 - must not kill the worker; the next tick retries
                self.metrics.store_errors.labels("sync").inc()
                message, now = f"{type(exc).__name__}: {exc}", time.monotonic()
                if message != last_message or now - last_logged >= SYNC_ERROR_LOG_S:
                    log.warning("plan store sync failed (retried every %.1f s; the last good state serves): %s",
                                SYNC_INTERVAL_S, message, exc_info=True)
                    last_message, last_logged = message, now

    def _trim_loop(self) -> None:
        while not self._stop.wait(MALLOC_TRIM_S):
            trim_heap()

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self._stop.set()

    def plans_overview(self) -> dict[str, Any]:
        overview: dict[str, Any] = {}
        for task, entry in self.registry.snapshot().items():
            plans = []
            for name, plan in sorted(entry["plans"].items()):
                cost = self.registry.cost(plan)
                plans.append({
                    **_plan_info(plan), "active": name == entry["active"],
                    "flops_ratio": cost.flops_ratio, "flops_saved_ratio": round(1 - cost.flops_ratio, 6),
                    "score": cost.score, "reference_input": reference_input(self.backbone, plan),
                    "metrics": PlanMetrics.from_plan_json(plan.spec.metrics),
                })
            overview[task] = {"active": entry["active"], "plans": plans}
        adaptive = self.shifter.status(time.perf_counter())
        for task, status in adaptive.items():
            if task in overview:
                overview[task]["adaptive"] = {**status, "ladder": self.registry.ladder(task)}
        return {"tasks": overview, "load_errors": self.registry.errors, "store_error": self.registry.store_error}

    # -- request plumbing -----------------------------------------------------------------------
    def _choose(self, task: str, plan_name: str | None, max_flops_ratio: float | None, now: float) -> tuple[Any, str]:
        """The plan for a request and why: named by it, fitting its FLOPs budget, the active plan, or
        the cheaper plan load-adaptive mode serves while the task is over its latency SLO."""
        if check_flops_budget(max_flops_ratio) is not None:
            if plan_name:
                raise RegistryError("send either 'plan' or 'max_flops_ratio', not both", 400)
            return self.registry.within_budget(task, max_flops_ratio), "budget"
        if plan_name:
            return self.registry.get(task, plan_name), "request"
        ladder, ratios = self.registry.ladder_with_ratios(task)
        adaptive = self.shifter.choose(task, ladder, now, self.batcher.backlog_seconds(),
                                       self.batcher.busy_fraction, ratios) if ladder else None
        if adaptive is not None and adaptive != ladder[0]:
            with contextlib.suppress(RegistryError):  # unloaded a moment ago: the active plan serves
                return self.registry.get(task, adaptive), "load"
        return self.registry.get(task), "active"

    async def _serve(self, ctx: bentoml.Context, task: str, plan_name: str | None, work, response: type[Model],
                     max_flops_ratio: float | None = None) -> Model | JSONResponse:
        """Resolve the plan, run ``work(plan)``, record metrics, turn failures into 4xx/503 JSON."""
        started = ctx.request.scope.get(ARRIVED_KEY) or time.perf_counter()  # queueing before the handler counts
        label = "unknown"  # never a client-chosen string: label values must stay a small set
        try:
            chosen_at = time.perf_counter()
            plan, chosen_by = self._choose(task, plan_name, max_flops_ratio, chosen_at)
            label = plan.name
            body, flops = await work(plan)
        except (InputError, RegistryError) as exc:
            self.metrics.observe_request(task, label, "client_error")
            return _error(ctx, str(exc), exc.status)
        except Overloaded:
            self.metrics.observe_request(task, label, "overloaded")
            return _error(ctx, "the service is overloaded; retry shortly", 503, **{"Retry-After": RETRY_AFTER_S})
        except Exception:
            self.metrics.observe_request(task, label, "error")
            raise
        finished = time.perf_counter()
        seconds = finished - started
        self.metrics.observe_request(task, label, "ok", seconds, flops.full, flops.executed)
        self.shifter.observe(task, seconds, chosen_at, finished)
        plan_info = {**_plan_info(plan), "flops_ratio": self.registry.cost(plan).flops_ratio, "chosen_by": chosen_by}
        return response.model_validate(
            {**body, "plan": plan_info, "flops": _flops_info(flops), "latency_ms": round(seconds * 1000, 3)})

    def _batch_key(self, plan) -> tuple:
        """A batch never mixes plans, versions or weights."""
        return (plan.task, plan.name, plan.version, plan.spec.weights_sha256)

    # -- inference API ----------------------------------------------------------------------------
    # The return annotations document the 200 bodies (service/schemas.py); errors come back as a
    # JSONResponse, which BentoML sends as it is.
    @bentoml.api(route="/vqa")
    async def vqa(self, ctx: bentoml.Context, image: ImageFile, question: Question, plan: PlanName = None, top_k: TopK = 5,
                  max_flops_ratio: FlopsBudget = None) -> VQAResponse:
        """Answer a question about an image. Returns the top_k answers with sigmoid scores, the plan
        used, this request's FLOPs (full vs executed) and latency."""

        async def work(chosen):
            if not 1 <= top_k <= 100:
                raise InputError("top_k must be between 1 and 100")
            picture, text = load_image(image, "image"), check_text(question, "question")
            def run(items):  # one batch may hold different top_k values: compute the largest, cut each
                results = self.runtime.vqa(chosen, [i[0] for i in items], [i[1] for i in items], max(i[2] for i in items))
                return [dataclasses.replace(r, answers=r.answers[: i[2]]) for r, i in zip(results, items)]

            result = await self.batcher.submit(self._batch_key(chosen), (picture, text, top_k), run)
            body = {"answers": [{"answer": a.answer, "score": round(a.score, 6)} for a in result.answers],
                    "question_truncated": result.truncated}
            return body, result.flops

        return await self._serve(ctx, "vqa", plan, work, VQAResponse, max_flops_ratio)

    @bentoml.api(route="/nlvr2")
    async def nlvr2(self, ctx: bentoml.Context, image_left: ImageFile, image_right: ImageFile, statement: Statement, plan: PlanName = None,
                    max_flops_ratio: FlopsBudget = None) -> NLVR2Response:
        """Is the statement true of the pair of images? Returns label, probability, plan, FLOPs, latency."""

        async def work(chosen):
            left, right = load_image(image_left, "image_left"), load_image(image_right, "image_right")
            text = check_text(statement, "statement")
            result = await self.batcher.submit(
                self._batch_key(chosen), (left, right, text),
                lambda items: self.runtime.nlvr2(chosen, [i[0] for i in items], [i[1] for i in items], [i[2] for i in items]),
            )
            return {"label": result.label, "probability": round(result.probability, 6),
                    "statement_truncated": result.truncated}, result.flops

        return await self._serve(ctx, "nlvr2", plan, work, NLVR2Response, max_flops_ratio)

    @bentoml.api(route="/retrieval/texts")
    async def retrieval_texts(self, ctx: bentoml.Context, image: ImageFile, texts: Candidates, plan: PlanName = None,
                              max_flops_ratio: FlopsBudget = None) -> TextRankingResponse:
        """Rank candidate captions for one image (text retrieval). ``texts`` may be repeated form
        fields or one JSON array string."""

        async def work(chosen):
            repeated = ctx.request.scope.get(FORM_LISTS_KEY, {}).get("texts", [])
            candidates = text_list(texts, repeated, "texts")
            picture = load_image(image, "image")
            result = await self.batcher.run_alone(lambda: self.runtime.rank_texts(chosen, picture, candidates))
            ranking = [{"index": r.index, "text": candidates[r.index], "score": round(r.score, 6)} for r in result.ranking]
            return {"ranking": ranking}, result.flops

        return await self._serve(ctx, "retrieval", plan, work, TextRankingResponse, max_flops_ratio)

    @bentoml.api(route="/retrieval/images")
    async def retrieval_images(self, ctx: bentoml.Context, text: Caption, images: list[ImageFile], plan: PlanName = None,
                               max_flops_ratio: FlopsBudget = None) -> ImageRankingResponse:
        """Rank candidate images for one caption (image retrieval)."""
        from service.inputs import MAX_CANDIDATES

        async def work(chosen):
            caption = check_text(text, "text")
            if not images:
                raise InputError("'images' needs at least one file")
            if len(images) > MAX_CANDIDATES:
                raise InputError(f"'images' has {len(images)} candidates; the limit is {MAX_CANDIDATES}", 413)
            pictures = [load_image(path, f"images[{i}]") for i, path in enumerate(images)]
            result = await self.batcher.run_alone(lambda: self.runtime.rank_images(chosen, caption, pictures))
            return {"ranking": [{"index": r.index, "score": round(r.score, 6)} for r in result.ranking]}, result.flops

        return await self._serve(ctx, "retrieval", plan, work, ImageRankingResponse, max_flops_ratio)

    # -- admin API (bearer token) ---------------------------------------------------------------------
    def _authorized(self, ctx: bentoml.Context) -> JSONResponse | None:
        if not self.admin_token:
            return _error(ctx, "admin API disabled: set DAS_ADMIN_TOKEN to enable it", 403)
        header = ctx.request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            return _error(ctx, "missing or wrong admin token (Authorization: Bearer <DAS_ADMIN_TOKEN>)", 401)
        return None

    def _admin(self, ctx: bentoml.Context, task: str, operation) -> AdminResponse | JSONResponse:
        denied = self._authorized(ctx)
        if denied is not None:
            return denied
        try:
            plan = operation()
        except RegistryError as exc:
            self.metrics.plan_swaps.labels(task if task in TASKS else "unknown", "refused").inc()
            return _error(ctx, str(exc), exc.status)
        except OSError as exc:  # the plan store could not be written: not the client's fault, retry later
            self.metrics.plan_swaps.labels(task if task in TASKS else "unknown", "refused").inc()
            self.metrics.store_errors.labels("write").inc()
            return _error(ctx, f"the plan store cannot be written: {exc}", 503)
        self.metrics.plan_swaps.labels(plan.task, "ok").inc()
        self.metrics.set_active_plans(self.registry.snapshot())
        return AdminResponse(ok=True, plan=_plan_info(plan), active=self.registry.active_name(plan.task))

    @bentoml.api(route="/list_plans")
    def list_plans(self) -> PlansOverview:
        """The loaded plans per task, as GET /plans: for clients that speak only BentoML APIs (POST),
        such as bentoml.SyncHTTPClient (client.list_plans())."""
        return PlansOverview.model_validate(self.plans_overview())

    @bentoml.api(route="/admin/plans/load")
    def admin_load(self, ctx: bentoml.Context, path: str | None = None, archive: list[ArchiveFile] = []) -> AdminResponse:  # noqa: B006
        """Validate and load a plan: either ``path``, a plan directory inside the plan store (JSON
        body), or ``archive``, one uploaded .tar.gz/.zip of a plan directory (multipart), unpacked
        into the store. Every worker follows within a second. (``archive`` is typed as a list only
        because BentoML cannot make a single file field optional.)"""
        if (path is None) == (not archive) or len(archive) > 1:
            denied = self._authorized(ctx)
            return denied or _error(ctx, "send exactly one of 'path' (JSON) or 'archive' (one multipart file)", 400)
        if archive:
            return self._admin(ctx, "", lambda: self.registry.load_archive(Path(archive[0])))
        return self._admin(ctx, "", lambda: self.registry.load(path))

    @bentoml.api(route="/admin/plans/activate")
    def admin_activate(self, ctx: bentoml.Context, task: TaskName, name: LoadedPlanName) -> AdminResponse:
        """Make a loaded plan the task's default."""
        return self._admin(ctx, task, lambda: self.registry.activate(task, name))

    @bentoml.api(route="/admin/plans/rollback")
    def admin_rollback(self, ctx: bentoml.Context, task: TaskName) -> AdminResponse:
        """Re-activate the task's previously active plan."""
        return self._admin(ctx, task, lambda: self.registry.rollback(task))

    @bentoml.api(route="/admin/plans/unload")
    def admin_unload(self, ctx: bentoml.Context, task: TaskName, name: LoadedPlanName) -> AdminResponse:
        """Unload a plan that is not active (frees its memory)."""
        return self._admin(ctx, task, lambda: self.registry.unload(task, name))


# first added runs first: every answer of the guard and the APIs passes the error shaper
DASService.add_asgi_middleware(ErrorShapeMiddleware)
DASService.add_asgi_middleware(InputGuardMiddleware)  # inside BentoML's middlewares, before the handlers
DASService.add_asgi_middleware(JsonOnlyMiddleware, routes=("/list_plans", "/admin/plans/activate", "/admin/plans/rollback",
                                                           "/admin/plans/unload"))
serve_behind_edge(DASService)  # outside them all: unknown routes, and BentoML's 429/504 in our shape
