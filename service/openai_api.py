"""OpenAI-compatible chat completions for generative backbones (LLaVA): ``GET /v1/models`` and
``POST /v1/chat/completions``, as vLLM and TGI serve vision-language models.

A Starlette app, mounted at /v1 by ``service.service`` (``@bentoml.asgi_app``): BentoML APIs are
POSTs with typed arguments, while this protocol takes arbitrary JSON and answers with server-sent
events. The handlers call into the service instance (``bentoml.get_current_service()``): its plan
choice (``DASService._choose``: a plan named by ``model``, a FLOPs budget, the active plan or
the load-adaptive one), its batcher (generation runs on the model thread; a batch never mixes
plans or decoding parameters; a streamed request runs alone, its tokens handed over through a
bounded queue, and a client that goes away stops it) and its metrics.

Here: the request and response bodies (pydantic), turning messages with ``image_url`` parts into a
prompt and images (``data:`` URLs with base64 only: the service never fetches a URL), the decoding
parameters and their limits, and the SSE framing. Errors have the service's one shape
``{"error": str, "status": int}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.batching import STREAM_BUFFER, Overloaded, each_alone_on, unwrap
from service.errors import RegistryError, validation_summary
from service.guard import ARRIVED_KEY, RETRY_AFTER_S
from service.inputs import InputError, load_image
from service.schemas import FlopsReport, UsedPlan, flops_info

OWNER = "das-serve"
MODEL_SEPARATOR = ":"  # model "vqa:skip2" names task and plan; "vqa" the task (its plan chosen per request)
MAX_STOP_CHARS = 256  # per stop string
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, which torch.Generator.manual_seed takes
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
CREATED = int(time.time())  # GET /v1/models' "created": when this worker started


# -- request ------------------------------------------------------------------------------------
class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")  # as vLLM: fields this service does not use are ignored


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageURL(_Open):
    url: str = Field(description="A data: URL with base64 content (data:image/png;base64,...); "
                                 "http(s) URLs are refused: the service never fetches anything.")
    detail: str | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="developer is read as system.")
    content: str | list[ContentPart] = Field(description="Text, or a list of text and image_url parts "
                                                         "(images in user messages only).")


class StreamOptions(_Open):
    include_usage: bool = Field(default=False, description="Send a last chunk with `usage` (and no choices).")


class ChatCompletionRequest(_Open):
    """The body of POST /v1/chat/completions (OpenAI's fields this service uses; others are ignored)."""

    model: str = Field(description="'task:plan' (e.g. 'vqa:skip2') runs that plan; a task ('vqa') runs the "
                                   "task's active plan, or the load-adaptive or max_flops_ratio choice. "
                                   "GET /v1/models lists them.", examples=["vqa:skip2"])
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate (default and cap: "
                                                                   "the service's limit, 256 unless configured).")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Same as max_tokens; wins if both.")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0: greedy. Default 1.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass. Default 1.")
    stop: str | list[str] | None = Field(default=None, description="Up to 8 strings that end the answer "
                                                                   "(cut from the text).")
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1],
                             description="Seeds sampling: the same request and seed give the same answer.")
    stream: bool = Field(default=False, description="Answer with server-sent events (chat.completion.chunk).")
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, description="Only 1 is supported.")
    max_flops_ratio: float | None = Field(default=None, description="DAS extension: FLOPs budget as a fraction of "
                                          "the full backbone (0 < x <= 1); runs the most accurate plan within it. "
                                          "With a task as model only.", examples=[0.6])


# -- responses ----------------------------------------------------------------------------------
def _omitted(description: str) -> Any:
    return Field(default=None, exclude_if=lambda value: value is None, description=description)


class DasInfo(BaseModel):
    """What DAS did for the request: the plan that ran, its FLOPs, latency."""

    plan: UsedPlan
    flops: FlopsReport
    latency_ms: float = Field(description="Time in the service, queueing included.")
    time_to_first_token_ms: float = Field(description="From the request's arrival to its first generated token.")
    probability: float = Field(description="Probability of exactly this answer under the model (exp of the sum of "
                                           "its tokens' log-probabilities, end of sequence included).")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens, image tokens included.")
    completion_tokens: int = Field(description="Generated tokens, the end-of-sequence token included.")
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="'task:plan' of the plan that ran.")
    choices: list[Choice]
    usage: Usage
    das: DasInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = _omitted("In the first chunk.")
    content: str | None = _omitted("Text this chunk adds.")


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (`data: {chunk}`; the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = _omitted("In the last chunk (empty choices), when stream_options.include_usage.")
    das: DasInfo | None = _omitted("In the chunk with the finish_reason.")


class ModelDas(BaseModel):
    task: str
    plan: str | None = Field(description="The plan; null for a task entry (its plan is chosen per request).")
    active: str | bool = Field(description="Task entry: the task's active plan; plan entry: whether it is active.")
    version: int | None = _omitted("Plan entries: the plan's version.")
    skipped_layers: list[int] | None = _omitted("Plan entries: decoder blocks the plan skips.")
    flops_ratio: float | None = _omitted("Plan entries: executed / full FLOPs at the plan's reference input.")


class ModelCard(BaseModel):
    id: str = Field(examples=["vqa:skip2"])
    object: Literal["model"] = "model"
    created: int
    owned_by: str = OWNER
    das: ModelDas


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- helpers ------------------------------------------------------------------------------------
def error(message: str, status: int, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers or None)


def not_generative(backbone) -> JSONResponse:
    return error(f"the backbone is not generative ({getattr(backbone, 'architecture', 'unknown')}): /v1/models and "
                 "/v1/chat/completions serve generative (LLaVA) backbones only; use /vqa, /nlvr2 and /retrieval/*", 404)


def parse_model(model: str) -> tuple[str, str | None]:
    """'vqa:skip2' -> ('vqa', 'skip2'); 'vqa' -> ('vqa', None)."""
    task, _, plan = model.strip().partition(MODEL_SEPARATOR)
    if not task or (MODEL_SEPARATOR in model and not plan):
        raise InputError(f"model {model!r}: name a task ('vqa') or a task and plan ('vqa:skip2'); "
                         "GET /v1/models lists them", 404)
    return task, plan or None


def decode_data_url(url: str, field: str, max_bytes: int, max_pixels: int):
    """An image from a ``data:image/...;base64,...`` URL, within the upload limits (service.inputs)."""
    if not url.startswith("data:"):
        shown = url if len(url) <= 60 else url[:60] + "..."
        raise InputError(f"{field}: {shown!r} is not a data: URL; send images inline as "
                         "data:image/png;base64,<data>: the service never fetches http(s) or other URLs")
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise InputError(f"{field}: a data: URL must carry base64 content (data:image/png;base64,<data>)")
    media = header[len("data:"):-len(";base64")].split(";")[0].strip().lower()
    if media and not media.startswith("image/"):
        raise InputError(f"{field}: the data: URL holds {media}, not an image", 415)
    payload = "".join(payload.split())
    if len(payload) > 4 * math.ceil(max_bytes / 3) + 4:
        raise InputError(f"{field}: the image is over {max_bytes} bytes (about {len(payload) * 3 // 4} "
                         f"decoded); the limit is {max_bytes}", 413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{field}: the data: URL's content is not valid base64") from None
    return load_image(data, field, max_bytes, max_pixels)


def to_prompt(messages: list[ChatMessage], settings, image_token: str) -> tuple[list[dict[str, Any]], list]:
    """Chat messages -> (the conversation for the chat template, the images in placeholder order).
    Bounded by the settings' message count, total text and images per request."""
    if len(messages) > settings.max_messages:
        raise InputError(f"{len(messages)} messages; the limit is {settings.max_messages}", 413)
    conversation: list[dict[str, Any]] = []
    images: list = []
    chars = 0

    def text(value: str, where: str) -> str:
        nonlocal chars
        if image_token and image_token in value:
            raise InputError(f"{where}: the text contains {image_token!r}; send images as image_url parts")
        chars += len(value)
        if chars > settings.max_prompt_chars:
            raise InputError(f"the messages' text is over {settings.max_prompt_chars} characters", 413)
        return value

    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        where = f"messages[{i}]"
        if isinstance(message.content, str):
            conversation.append({"role": role, "content": text(message.content, f"{where}.content")})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            at = f"{where}.content[{j}]"
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": text(part.text, at)})
                continue
            if role != "user":
                raise InputError(f"{at}: images belong in user messages, not {message.role} ones")
            if len(images) >= settings.max_request_images:
                raise InputError(f"more than {settings.max_request_images} images; the limit is "
                                 f"{settings.max_request_images} per request", 413)
            images.append(decode_data_url(part.image_url.url, f"{at}.image_url", settings.max_image_bytes,
                                          settings.max_image_pixels))
            parts.append({"type": "image"})
        if not parts:
            raise InputError(f"{where}.content is an empty list")
        if role == "system":  # the chat templates read a system message as text
            if any(p["type"] != "text" for p in parts):
                raise InputError(f"{where}: a system message holds text only")
            conversation.append({"role": role, "content": "".join(p["text"] for p in parts)})
        else:
            conversation.append({"role": role, "content": parts})
    if not any(m["role"] != "system" for m in conversation):
        raise InputError("messages: send at least one user message")
    return conversation, images


def generation_params(body: ChatCompletionRequest, max_new_tokens: int):
    """The request's decoding parameters (models.backbones.llava.generation.GenerationParams)."""
    from models.backbones.llava.generation import GenerationParams

    if body.n not in (None, 1):
        raise InputError(f"n={body.n}: only one choice per request (n=1) is supported")
    wanted = body.max_completion_tokens or body.max_tokens
    if wanted is not None and wanted > max_new_tokens:
        raise InputError(f"max_tokens is {wanted}; this service generates at most {max_new_tokens} tokens per request")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise InputError(f"stop: each stop string may have at most {MAX_STOP_CHARS} characters")
    temperature = 1.0 if body.temperature is None else body.temperature
    seed = body.seed
    if seed is None and temperature > 0:  # an unseeded sample of its own (batch-mates never share a stream)
        seed = secrets.randbits(63)
    try:
        return GenerationParams(max_new_tokens=wanted or max_new_tokens, temperature=temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, seed=seed, stop=tuple(stop))
    except ValueError as exc:
        raise InputError(str(exc)) from None


def sse(payload: BaseModel | dict) -> bytes:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


async def _read_body(request: Request) -> ChatCompletionRequest:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("application/json"):
        raise InputError(f"send application/json to {request.url.path}; got {content_type or 'no content type'}", 415)
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"the body is not valid JSON: {exc}") from None
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise InputError(validation_summary(exc.errors(include_context=False, include_input=False))) from None


class EventStream(StreamingResponse):
    """Server-sent events whose body iterator is always closed when the response ends, also when the
    client went away mid-stream (Starlette only cancels the send then): closing it stops the generation."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


# -- routes -------------------------------------------------------------------------------------
def _service():
    import bentoml

    return bentoml.get_current_service()


async def list_models(request: Request) -> JSONResponse:
    svc = _service()
    if not svc.generative:
        return not_generative(svc.backbone)
    cards = []
    for task, entry in svc.registry.snapshot().items():
        cards.append({"id": task, "created": CREATED, "das": {"task": task, "plan": None, "active": entry["active"]}})
        for name, plan in sorted(entry["plans"].items()):
            cards.append({"id": f"{task}{MODEL_SEPARATOR}{name}", "created": CREATED, "das": {
                "task": task, "plan": name, "active": name == entry["active"], "version": plan.version,
                "skipped_layers": list(plan.skipped_layers), "flops_ratio": svc.registry.cost(plan).flops_ratio}})
    return JSONResponse(ModelList.model_validate({"data": cards}).model_dump(mode="json"))


async def chat_completions(request: Request) -> Response:
    svc = _service()
    started = request.scope.get(ARRIVED_KEY) or time.perf_counter()
    if not svc.generative:
        return not_generative(svc.backbone)
    task, label = "vqa", "unknown"  # labels: served tasks and loaded plan names only, never client strings
    try:
        body = await _read_body(request)
        task_named, plan_name = parse_model(body.model)
        if plan_name is not None and body.max_flops_ratio is not None:
            raise InputError(f"model {body.model!r} names a plan; with max_flops_ratio name the task only "
                             f"(model {task_named!r})")
        params = generation_params(body, svc.settings.max_new_tokens)
        conversation, images = to_prompt(body.messages, svc.settings, svc.backbone.image_placeholder)
        chosen_at = time.perf_counter()
        plan, chosen_by = svc._choose(task_named, plan_name, body.max_flops_ratio, chosen_at)
        task, label = plan.task, plan.name
        call = Call(svc, plan, chosen_by, started, chosen_at, f"chatcmpl-{uuid.uuid4().hex}")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await call.stream(conversation, images, params, include_usage)
        return await call.complete(conversation, images, params)
    except (InputError, RegistryError) as exc:
        svc.metrics.observe_request(task, label, "client_error")
        return error(str(exc), exc.status)
    except Overloaded:
        svc.metrics.observe_request(task, label, "overloaded")
        return error("the service is overloaded; retry shortly", 503, **{"Retry-After": RETRY_AFTER_S})
    except Exception:
        svc.metrics.observe_request(task, label, "error")
        raise


class Call:
    """One chat completion under its chosen plan: runs it, records its metrics, builds the bodies."""

    def __init__(self, svc, plan, chosen_by: str, started: float, chosen_at: float, call_id: str) -> None:
        self.svc, self.plan, self.chosen_by = svc, plan, chosen_by
        self.started, self.chosen_at, self.id = started, chosen_at, call_id
        self.model = f"{plan.task}{MODEL_SEPARATOR}{plan.name}"
        self.created = int(time.time())

    def _das(self, completion, finished: float, first_token_s: float) -> dict[str, Any]:
        return {"plan": self.svc.used_plan(self.plan, self.chosen_by), "flops": flops_info(completion.flops),
                "latency_ms": round((finished - self.started) * 1000, 3),
                "time_to_first_token_ms": round(first_token_s * 1000, 3),
                "probability": round(completion.probability, 6)}

    def _usage(self, completion) -> dict[str, int]:
        return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens}

    def _finished(self, completion, first_token_s: float) -> float:
        finished = time.perf_counter()
        svc, plan = self.svc, self.plan
        svc.metrics.observe_request(plan.task, plan.name, "ok", finished - self.started, completion.flops.full,
                                    completion.flops.executed)
        svc.metrics.observe_generation(plan.task, plan.name, completion.completion_tokens, first_token_s)
        svc.shifter.observe(plan.task, finished - self.started, self.chosen_at, finished)
        return finished

    async def complete(self, conversation, images, params) -> JSONResponse:
        """Batched with other requests of the same plan and decoding parameters."""
        generator, plan = self.svc.generator, self.plan

        def run(items):
            batch_started = time.perf_counter()
            completions = generator.generate(plan, [i[0] for i in items], [i[1] for i in items], params)
            return [(c, batch_started) for c in completions]

        key = (*self.svc._batch_key(plan), "chat", params)
        result = await self.svc.batcher.submit(key, (conversation, images), each_alone_on((ValueError,), run))
        try:
            completion, batch_started = unwrap(result)
        except ValueError as exc:  # the prompt does not fit the model's context, or its images do not match
            raise InputError(str(exc)) from None
        first_token_s = batch_started + completion.time_to_first_token_s - self.started
        finished = self._finished(completion, first_token_s)
        body = {"id": self.id, "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"content": completion.text},
                             "finish_reason": completion.finish_reason}],
                "usage": self._usage(completion), "das": self._das(completion, finished, first_token_s)}
        return JSONResponse(ChatCompletion.model_validate(body).model_dump(mode="json"))

    async def stream(self, conversation, images, params, include_usage: bool) -> Response:
        """Alone on the model thread; the first event is awaited here, so a refusal (a prompt that
        does not fit, an overloaded queue) is still an HTTP error, not an event."""
        from models.backbones.llava.generation import Finished

        generator, plan = self.svc.generator, self.plan
        # room for the whole answer (a token event each, then Finished): the shared model thread never
        # waits on a slow reader, and the buffer is still bounded by max_tokens
        events = self.svc.batcher.stream_alone(lambda: generator.stream(plan, [conversation], [images], params),
                                               buffer=max(STREAM_BUFFER, params.max_new_tokens + 2))
        try:
            first = await anext(events)
        except ValueError as exc:
            await events.aclose()
            raise InputError(str(exc)) from None
        except BaseException:
            await events.aclose()
            raise
        first_token_s = time.perf_counter() - self.started

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> bytes:
            return sse(ChatCompletionChunk.model_validate({
                "id": self.id, "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}))

        async def body() -> AsyncIterator[bytes]:
            outcome = "cancelled"  # until the stream is through: a client that went away
            try:
                yield chunk({"role": "assistant", "content": ""})
                event = first
                while True:
                    if isinstance(event, Finished):
                        completion = event.completion
                        finished = self._finished(completion, first_token_s)
                        outcome = "ok"
                        yield chunk({}, completion.finish_reason, das=self._das(completion, finished, first_token_s))
                        if include_usage:
                            yield sse(ChatCompletionChunk.model_validate({
                                "id": self.id, "created": self.created, "model": self.model, "choices": [],
                                "usage": self._usage(completion)}))
                        break
                    if event.text:
                        yield chunk({"content": event.text})
                    event = await anext(events)
                yield DONE
            except StopAsyncIteration:  # the generation ended without a Finished event: not expected
                outcome = "error"
                yield sse({"error": "the generation ended early", "status": 500})
                yield DONE
            except Exception as exc:  # after the 200 went out: an error event, then the end
                outcome = "error"
                yield sse({"error": f"generation failed: {exc}", "status": 500})
                yield DONE
            finally:
                await events.aclose()
                if outcome != "ok":
                    self.svc.metrics.observe_request(plan.task, plan.name, outcome)

        return EventStream(body(), media_type="text/event-stream", headers=SSE_HEADERS)


app = Starlette(routes=[Route("/models", list_models, methods=["GET"]),
                        Route("/chat/completions", chat_completions, methods=["POST"])])
