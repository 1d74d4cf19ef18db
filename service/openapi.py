"""The OpenAPI spec /docs.json serves: BentoML's, with DAS Serve's title and description, the
error body and every error status each endpoint can answer, and the routes of the mounted ASGI
apps, which are not in BentoML's spec: GET /plans and the OpenAI-compatible /v1 routes
(service/openai_api.py; they answer 404 unless the backbone is generative)."""

from __future__ import annotations

import copy
import importlib.metadata
import threading
import typing
from typing import Any

from pydantic import BaseModel

from service.openai_api import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ModelList
from service.schemas import ErrorBody, PlansOverview

TITLE = "DAS Serve"
DESCRIPTION = (
    "Vision-language inference (VQA, NLVR2, image-text retrieval) on one frozen ViLT or METER backbone. "
    "Each task runs a *DAS plan*: a small set of adapters trained to skip some backbone layers, so a request "
    "costs a fraction of the full model's FLOPs; every answer reports the plan used, its FLOPs and latency. "
    "Plans are loaded, activated, rolled back and unloaded at run time through the admin API (bearer token), "
    "without a restart; GET /plans lists them with their FLOPs ratio and score.\n\n"
    "Every error answer is `{\"error\": str, \"status\": int}`, with a `detail` list for requests that do not "
    "match an endpoint's input schema.\n\n"
    "With a generative (LLaVA) backbone, /vqa generates its answer and the OpenAI-compatible "
    "POST /v1/chat/completions (streaming with server-sent events) and GET /v1/models serve the plans too; "
    "with any other backbone those two answer 404."
)
REF = "#/components/schemas/{}"
REF_TEMPLATE = "#/components/schemas/{model}"  # for pydantic
# statuses each endpoint can answer besides 200 (every route can answer 500 too)
INFERENCE_ERRORS = (400, 404, 413, 415, 422, 429, 503)
ADMIN_ERRORS = (400, 401, 403, 404, 409, 413, 415, 422, 429)
ERRORS: dict[str, tuple[int, ...]] = {
    "/vqa": INFERENCE_ERRORS,
    "/nlvr2": INFERENCE_ERRORS,
    "/retrieval/texts": INFERENCE_ERRORS,
    "/retrieval/images": INFERENCE_ERRORS,
    "/admin/plans/load": ADMIN_ERRORS,
    "/admin/plans/activate": (400, 401, 403, 404, 409, 415, 422, 429),
    "/admin/plans/rollback": (400, 401, 403, 404, 409, 415, 422, 429),
    "/admin/plans/unload": (400, 401, 403, 404, 409, 415, 422, 429),
    "/list_plans": (400, 415, 429),
}
WHY = {
    400: "Bad request: a missing or invalid field, a malformed body.",
    401: "Missing or wrong admin token.",
    403: "The admin API is disabled (DAS_ADMIN_TOKEN unset).",
    404: "The task is not served, or no such plan is loaded (/v1: or the backbone is not generative).",
    409: "The operation conflicts with the store's state (e.g. unloading the active plan).",
    413: "The body, an image or the candidate list is over its limit.",
    415: "Unsupported content type.",
    422: "The plan was refused (checksum, backbone), or no loaded plan fits max_flops_ratio.",
    429: "Too many requests in flight; retry shortly.",
    500: "Unexpected server error (see the server log).",
    503: "Overloaded: the batch queue is full; retry after Retry-After seconds.",
}
NULL = {"nullable": True, "enum": [None]}  # {"type": "null"} in OpenAPI 3.0 (openapi30)
_lock = threading.Lock()
_cached: dict[str, Any] | None = None


def _error_response(status: int) -> dict[str, Any]:
    return {"description": WHY[status], "content": {"application/json": {"schema": {"$ref": REF.format("ErrorBody")}}}}


def openapi30(node: Any) -> Any:
    """pydantic's JSON schema in OpenAPI 3.0 terms: ``anyOf [X, {type: null}]`` becomes X with
    ``nullable: true`` (BentoML's conversion drops the null, so a null field would not validate);
    ``const`` a one-value ``enum``, ``type: null`` a nullable enum of null, a numeric
    ``exclusiveMinimum: x`` ``minimum: x`` with ``exclusiveMinimum: true``."""
    if isinstance(node, list):
        return [openapi30(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: openapi30(value) for key, value in node.items()}
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node[bound], bool):
            node = {**node, plain: node[bound], bound: True}  # 3.0's form: a flag on minimum/maximum
    if "const" in node:  # OpenAPI 3.0 has no const: a one-value enum
        node = {**{k: v for k, v in node.items() if k != "const"}, "enum": [node["const"]]}
    if node.get("type") == "null":  # nor a null type: a nullable value that can only be null
        node = {**{k: v for k, v in node.items() if k != "type"}, **NULL}
    options = node.get("anyOf")
    if isinstance(options, list) and NULL in options:
        others = [o for o in options if o != NULL]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(others) != 1:
            return {**rest, "anyOf": others, "nullable": True}
        if "$ref" in others[0]:
            return {**rest, "allOf": others, "nullable": True}
        return {**rest, **others[0], "nullable": True}
    return node


def _model_schemas(*models: type[BaseModel], mode: str = "serialization") -> dict[str, Any]:
    """OpenAPI 3.0 components for models and the models they use (``mode``: as they are sent or read)."""
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF_TEMPLATE, mode=mode)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {name: openapi30(schema) for name, schema in schemas.items()}


def _returns(service) -> dict[str, type[BaseModel]]:
    """route -> the pydantic model its API method is annotated to return."""
    models = {}
    for api in service.apis.values():
        returned = typing.get_type_hints(api.func).get("return")
        if isinstance(returned, type) and issubclass(returned, BaseModel):
            models[api.route] = returned
    return models


def _plans_route(name: str) -> dict[str, Any]:
    return {"get": {
        "tags": ["Service APIs"],
        "operationId": f"das-serve__{name}",
        "description": "The loaded plans per task: active plan, FLOPs ratio, score, known metrics; plans that "
                       "failed to load and why. (POST /list_plans returns the same body.)",
        "responses": {"200": {"description": "Successful Response",
                              "content": {"application/json": {"schema": {"$ref": REF.format("PlansOverview")}}}},
                      **{str(s): _error_response(s) for s in (429, 500)}},
    }}


def _v1_routes() -> dict[str, Any]:
    json_body = {"application/json": {"schema": {"$ref": REF.format("ChatCompletionRequest")}}}
    chat_ok = {"description": "A chat.completion, or with stream=true server-sent events: `data: {chunk}` lines "
                              "(ChatCompletionChunk), then `data: [DONE]`.",
               "content": {"application/json": {"schema": {"$ref": REF.format("ChatCompletion")}},
                           "text/event-stream": {"schema": {"type": "string"}}}}
    return {
        "/v1/chat/completions": {"post": {
            "tags": ["OpenAI-compatible"], "operationId": "das-serve__chat_completions",
            "description": "OpenAI-compatible chat completion on a generative backbone: messages with text and "
                           "image_url parts (data: URLs only), max_tokens, temperature, top_p, stop, seed, stream; "
                           "model 'task:plan' or 'task'; the extra field max_flops_ratio. The answer carries "
                           "usage and a das block (plan, FLOPs, latency).",
            "requestBody": {"required": True, "content": json_body},
            "responses": {"200": chat_ok, **{str(s): _error_response(s) for s in (*INFERENCE_ERRORS, 500)}},
        }},
        "/v1/models": {"get": {
            "tags": ["OpenAI-compatible"], "operationId": "das-serve__list_models",
            "description": "The servable models: each task, and each loaded plan as 'task:plan' (OpenAI list shape).",
            "responses": {"200": {"description": "Successful Response", "content": {
                "application/json": {"schema": {"$ref": REF.format("ModelList")}}}},
                **{str(s): _error_response(s) for s in (404, 429, 500)}},
        }},
    }


def corrected(spec: dict[str, Any], returns: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """BentoML's generated spec (as a dict) with the changes above; ``returns``: route -> response model."""
    spec = copy.deepcopy(spec)
    spec["info"] = {**spec.get("info", {}), "title": TITLE, "description": DESCRIPTION}
    spec["info"].pop("contact", None)
    if spec["info"].get("version") in (None, "None"):  # no Bento (bentoml serve from source): the package's
        try:
            spec["info"]["version"] = importlib.metadata.version("das-serve")
        except importlib.metadata.PackageNotFoundError:
            pass
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in list(components):  # BentoML's error models and its copies of the response models
        if name in ("InvalidArgument", "NotFound", "InternalServerError") or name.endswith("IODescriptor"):
            del components[name]
    components.update(_model_schemas(ErrorBody, PlansOverview, *returns.values(), ChatCompletion,
                                     ChatCompletionChunk, ModelList))
    components.update(_model_schemas(ChatCompletionRequest, mode="validation"))
    paths = spec.setdefault("paths", {})
    for route, statuses in ERRORS.items():
        operation = paths.get(route, {}).get("post")
        if operation is None:
            continue
        ok = {"description": "Successful Response",
              "content": {"application/json": {"schema": {"$ref": REF.format(returns[route].__name__)}}}}
        operation["responses"] = {"200": ok, **{str(s): _error_response(s) for s in (*statuses, 500)}}
    paths["/plans"] = _plans_route("get_plans")
    paths["/plans/"] = _plans_route("get_plans_slash")
    paths.update(_v1_routes())
    return spec


def spec(service) -> dict[str, Any]:
    """The corrected spec of a bentoml.Service, built once per process."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = corrected(service.openapi_spec.asdict(), _returns(service))
        return _cached
