"""The DAS Serve BentoML service: VQA, NLVR2 and image-text retrieval over per-task DAS plans.

Thin by design: each endpoint turns HTTP input into a call on ``models.runtime.DASRuntime`` with a
plan from ``service.registry.PlanRegistry``, and the result back into JSON. The settings (the DAS_*
environment variables, docs/configuration.md) are read once, at import, into ``SETTINGS``
(``service.config.Settings``) and handed down from here; a bad value stops the import.

The layers below: ``service.store`` (the plan store on disk), ``service.policy`` (plan costs, budget
and ladder choice), ``service.registry`` (what one worker has loaded), ``service.batching``,
``service.adaptive``, ``service.guard`` and ``service.errors`` (ASGI middleware), ``service.inputs``,
``service.schemas`` and ``service.openapi`` (request and response shapes), ``service.metrics``,
``service.memory``; ``service.openai_api`` serves /v1 (OpenAI-compatible chat completions) for a
generative backbone, which also answers /vqa by generating its answer (docs/api.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import threading
import time
from collections.abc import Callable, Sequence
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
from service import openai_api, openapi
from service.adaptive import LoadShifter
from service.batching import MicroBatcher, Overloaded, each_alone_on, run_where_ready, unwrap
from service.config import DEFAULT_PLANS, Settings, SettingsError
from service.errors import ErrorShapeMiddleware, RegistryError, quiet_client_errors
from service.guard import (
    ADMIN_DISABLED,
    ADMIN_UNAUTHORIZED,
    ARRIVED_KEY,
    FORM_LISTS_KEY,
    RETRY_AFTER_S,
    InputGuardMiddleware,
    JsonOnlyMiddleware,
    install_header_timeout,
    serve_behind_edge,
)
from service.inputs import ImageUpload, InputError, check_text, decode_all, open_image, text_list
from service.memory import pin_malloc_thresholds, trim_heap
from service.policy import check_flops_budget
from service.registry import PlanRegistry
from service.schemas import (
    AdminResponse,
    ImageRankingResponse,
    NLVR2Response,
    PlansOverview,
    TextRankingResponse,
    VQAResponse,
    flops_info,
    plan_info,
    plans_overview,
)
from service.store import PlanStore, default_store_for

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


try:
    SETTINGS = Settings.from_env()  # the one read of the environment (in each worker process, at import)
except SettingsError as exc:
    raise SystemExit(str(exc)) from None  # `bentoml serve` stops at once, naming the variable


def _set_torch_threads(threads: int | None) -> None:
    """DAS_TORCH_THREADS; None keeps torch's default (one per core), which oversubscribes a busy or
    shared host, or one with several workers."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)  # process-wide: the model thread picks it up too
    with contextlib.suppress(RuntimeError):  # refused once inter-op work has started; intra-op is what counts
        torch.set_num_interop_threads(threads)


# uvicorn has no timeout for a request's headers: slowly trickled headers held a connection forever
if SETTINGS.header_timeout_s:
    install_header_timeout(SETTINGS.header_timeout_s)


def _error(ctx: bentoml.Context, message: str, status: int, **headers: str) -> JSONResponse:
    """A JSON error body. BentoML copies ctx.response.status_code onto the response of APIs that
    take a context, so the status is set there too."""
    ctx.response.status_code = status
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers or None)


async def _list_plans(request: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().plans_overview().model_dump(mode="json"))


async def _docs_json(request: Request) -> JSONResponse:
    return JSONResponse(openapi.spec(DASService))


# Mounted at the root: GET /plans answers without a redirect, and /docs.json (BentoML's own route
# comes after mounted apps) serves the OpenAPI spec corrected by service/openapi.py.
root_app = Starlette(routes=[Route("/plans", _list_plans, methods=["GET"]), Route("/plans/", _list_plans, methods=["GET"]),
                             Route("/docs.json", _docs_json, methods=["GET"])])
quiet_client_errors()


@bentoml.asgi_app(openai_api.app, path="/v1")  # /v1/models, /v1/chat/completions (404 unless generative)
@bentoml.asgi_app(root_app, path="/")
@bentoml.service(
    name="das-serve",
    workers=SETTINGS.workers,
    # DAS_MAX_CONCURRENCY is per worker; BentoML's max_concurrency is per service and split evenly over
    # the workers. Its 429 is the cheapest refusal there is (outside every middleware, before the body
    # is read); 64 = the running batch plus three full batches waiting (DAS_MAX_BATCH_SIZE 16): more in
    # flight adds only queueing latency and upload memory.
    traffic={"timeout": 120, **({"max_concurrency": SETTINGS.max_concurrency * SETTINGS.workers}
                                if SETTINGS.max_concurrency else {})},
)
class DASService:
    """One frozen backbone, per-task DAS plans, hot-swappable."""

    def __init__(self) -> None:
        self.settings = settings = SETTINGS
        _set_torch_threads(settings.torch_threads)  # before any torch work in this worker
        # worker memory under a varied input mix (service/memory.py): a periodic heap trim (_trim_loop)
        # by default; a pinned mmap threshold instead only when asked (it slows forward passes by 10-40%)
        if settings.malloc_threshold:
            pin_malloc_thresholds(settings.malloc_threshold)
        from models.backbones.base import load_backbone
        from models.runtime import DASRuntime
        from service.metrics import ServiceMetrics

        self.backbone = load_backbone(settings.backbone, settings.device, settings.dtype)
        self.runtime = DASRuntime(self.backbone)
        # a generative backbone (LLaVA) answers in text: /vqa and /v1/chat/completions generate through it
        self.generative = bool(getattr(self.backbone, "generative", False))
        self.generator = None
        if self.generative:
            from models.backbones.llava.generation import LlavaRuntime

            self.generator = LlavaRuntime(self.backbone)
        # no DAS_PLANS: the store the backbone ships in (DAS_BACKBONE=plans/meter/backbone serves plans/meter)
        plans_dir = settings.plans or default_store_for(settings.backbone, DEFAULT_PLANS)
        self.registry = PlanRegistry(self.backbone, PlanStore(plans_dir, settings.max_plan_archive_bytes))
        self.metrics = ServiceMetrics()
        # DAS_MAX_QUEUE: requests waiting for a batch, per worker; past it the handler answers 503 +
        # Retry-After, after the upload was read and decoded. By default the in-flight cap: the cheap
        # 429 at the door sheds first and the queue limit backs it up.
        self.batcher = MicroBatcher(
            max_batch_size=settings.max_batch_size,
            max_latency_ms=settings.max_latency_ms,  # work-conserving: no wait by default
            max_queue=settings.max_queue,
            on_batch=lambda key, size: self.metrics.batch_size.labels(key[0]).observe(size),
        )
        self.shifter = LoadShifter(on_shift=self.metrics.observe_shift, on_serving=self.metrics.set_served_plan)
        self.admin_token = settings.admin_token
        self._sync()
        self._stop = threading.Event()
        threading.Thread(target=self._sync_loop, name="das-plan-sync", daemon=True).start()
        if settings.malloc_trim_s:
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
        while not self._stop.wait(self.settings.malloc_trim_s):
            trim_heap()

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self._stop.set()

    def plans_overview(self) -> PlansOverview:
        """GET /plans/: the loaded plans per task, with their costs and load-adaptive status."""
        return plans_overview(self.registry, self.shifter.status(time.perf_counter()))

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
        return response.model_validate({**body, "plan": self.used_plan(plan, chosen_by), "flops": flops_info(flops),
                                        "latency_ms": round(seconds * 1000, 3)})

    def used_plan(self, plan, chosen_by: str) -> dict[str, Any]:
        """The response's ``plan`` block: the plan that ran, its cost and why it was chosen."""
        return {**plan_info(plan), "flops_ratio": self.registry.cost(plan).flops_ratio, "chosen_by": chosen_by}

    def _image(self, path: Path | None, field: str) -> ImageUpload:
        """An uploaded image, its header checked within DAS_MAX_IMAGE_BYTES and DAS_MAX_IMAGE_PIXELS;
        decoded later, in the batch (``_decoded``)."""
        return open_image(path, field, self.settings.max_image_bytes, self.settings.max_image_pixels)

    @staticmethod
    def _decoded(uploads: Sequence[ImageUpload]) -> list:
        """Images decoded in the model thread, just before the forward pass: on a busy host,
        decoding on the event loop would preempt one of torch's threads mid-operation while the
        others wait for it. (Not in a thread pool: each pool thread's malloc arena kept the decoded
        images' memory, and worker memory grew 6-12% over 3 plan swaps under load.) Raises the
        first upload's InputError."""
        pictures = decode_all(uploads)
        for picture in pictures:
            if isinstance(picture, InputError):
                raise picture
        return pictures

    def _per_item(self, items: Sequence[Any], uploads_of: Callable[[Any], Sequence[ImageUpload]],
                  run: Callable[[list, list], Sequence[Any]]) -> list:
        """A batch's images decoded (as ``_decoded``); the items whose images all decode run
        together as ``run(items, their images)``, the others fail alone with their InputError:
        one bad upload never fails its batch-mates."""
        groups = [list(uploads_of(item)) for item in items]
        flat = iter(decode_all([upload for group in groups for upload in group]))
        pictures = [[next(flat) for _ in group] for group in groups]
        inputs = [next((p for p in group if isinstance(p, InputError)), group) for group in pictures]
        return run_where_ready(items, inputs, run)

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
        used, this request's FLOPs (full vs executed) and latency. A generative backbone returns one
        answer, whatever top_k: the generated one, scored with its sequence probability."""

        async def work(chosen):
            if not 1 <= top_k <= 100:
                raise InputError("top_k must be between 1 and 100")
            upload, text = self._image(image, "image"), check_text(question, "question")
            if self.generative:
                return await self._generated_answer(chosen, upload.decode(), text, ctx.request.scope.get(ARRIVED_KEY))

            def run(items, pictures):  # one batch may hold different top_k values: compute the largest, cut each
                results = self.runtime.vqa(chosen, [p[0] for p in pictures], [i[1] for i in items], max(i[2] for i in items))
                return [dataclasses.replace(r, answers=r.answers[: i[2]]) for r, i in zip(results, items)]

            result = unwrap(await self.batcher.submit(self._batch_key(chosen), (upload, text, top_k),
                                                      lambda items: self._per_item(items, lambda i: i[:1], run)))
            body = {"answers": [{"answer": a.answer, "score": round(a.score, 6)} for a in result.answers],
                    "question_truncated": result.truncated}
            return body, result.flops

        return await self._serve(ctx, "vqa", plan, work, VQAResponse, max_flops_ratio)

    async def _generated_answer(self, plan, picture, question: str, arrived: float | None) -> tuple[dict, Any]:
        """/vqa on a generative backbone: the short greedy answer and its sequence probability, batched
        with other questions for the same plan (a question too long for the context fails alone)."""
        def run(items):
            batch_started = time.perf_counter()
            answers = self.generator.answer(plan, [i[0] for i in items], [i[1] for i in items])
            return [(a, batch_started) for a in answers]

        result = await self.batcher.submit((*self._batch_key(plan), "answer"), (picture, question),
                                           each_alone_on((ValueError,), run))
        try:
            answer, batch_started = unwrap(result)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        completion = answer.completion
        first_token = batch_started + completion.time_to_first_token_s
        self.metrics.observe_generation(plan.task, plan.name, completion.completion_tokens,
                                        first_token - (arrived or batch_started))
        return {"answers": [{"answer": answer.text, "score": round(answer.probability, 6)}],
                "question_truncated": False}, answer.flops

    @bentoml.api(route="/nlvr2")
    async def nlvr2(self, ctx: bentoml.Context, image_left: ImageFile, image_right: ImageFile, statement: Statement, plan: PlanName = None,
                    max_flops_ratio: FlopsBudget = None) -> NLVR2Response:
        """Is the statement true of the pair of images? Returns label, probability, plan, FLOPs, latency."""

        async def work(chosen):
            left, right = self._image(image_left, "image_left"), self._image(image_right, "image_right")
            text = check_text(statement, "statement")

            def run(items, pictures):
                return self.runtime.nlvr2(chosen, [p[0] for p in pictures], [p[1] for p in pictures], [i[2] for i in items])

            result = unwrap(await self.batcher.submit(self._batch_key(chosen), (left, right, text),
                                                      lambda items: self._per_item(items, lambda i: i[:2], run)))
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
            candidates = text_list(texts, repeated, "texts", self.settings.max_candidates)
            upload = self._image(image, "image")
            result = await self.batcher.run_alone(lambda: self.runtime.rank_texts(chosen, *self._decoded([upload]), candidates))
            ranking = [{"index": r.index, "text": candidates[r.index], "score": round(r.score, 6)} for r in result.ranking]
            return {"ranking": ranking}, result.flops

        return await self._serve(ctx, "retrieval", plan, work, TextRankingResponse, max_flops_ratio)

    @bentoml.api(route="/retrieval/images")
    async def retrieval_images(self, ctx: bentoml.Context, text: Caption, images: list[ImageFile], plan: PlanName = None,
                               max_flops_ratio: FlopsBudget = None) -> ImageRankingResponse:
        """Rank candidate images for one caption (image retrieval)."""
        limit = self.settings.max_candidates

        async def work(chosen):
            caption = check_text(text, "text")
            if not images:
                raise InputError("'images' needs at least one file")
            if len(images) > limit:
                raise InputError(f"'images' has {len(images)} candidates; the limit is {limit}", 413)
            uploads = [self._image(path, f"images[{i}]") for i, path in enumerate(images)]
            result = await self.batcher.run_alone(lambda: self.runtime.rank_images(chosen, caption, self._decoded(uploads)))
            return {"ranking": [{"index": r.index, "score": round(r.score, 6)} for r in result.ranking]}, result.flops

        return await self._serve(ctx, "retrieval", plan, work, ImageRankingResponse, max_flops_ratio)

    # -- admin API (bearer token) ---------------------------------------------------------------------
    def _authorized(self, ctx: bentoml.Context) -> JSONResponse | None:
        if not self.admin_token:
            return _error(ctx, ADMIN_DISABLED, 403)
        header = ctx.request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            return _error(ctx, ADMIN_UNAUTHORIZED, 401)
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
        return AdminResponse(ok=True, plan=plan_info(plan), active=self.registry.active_name(plan.task))

    @bentoml.api(route="/list_plans")
    def list_plans(self) -> PlansOverview:
        """The loaded plans per task, as GET /plans: for clients that speak only BentoML APIs (POST),
        such as bentoml.SyncHTTPClient (client.list_plans())."""
        return self.plans_overview()

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
DASService.add_asgi_middleware(InputGuardMiddleware, admin_token=SETTINGS.admin_token,  # inside BentoML's
                               max_body_bytes=SETTINGS.max_body_bytes,  # middlewares, before the handlers
                               max_archive_bytes=SETTINGS.max_plan_archive_bytes)
DASService.add_asgi_middleware(JsonOnlyMiddleware, routes=("/list_plans", "/admin/plans/activate", "/admin/plans/rollback",
                                                           "/admin/plans/unload"))
serve_behind_edge(DASService)  # outside them all: unknown routes, and BentoML's 429/504 in our shape
