"""ASGI middleware of the service.

``InputGuardMiddleware`` (inside BentoML's middlewares, in front of the handlers) bounds request
bodies before they are read (a declared Content-Length over the limit is refused at once, a
streamed body once it passes it; the uploads and the JSON of ``JSON_BODY_ROUTES``), checks the admin token before an admin body is read, refuses
non-file values in file fields (BentoML would otherwise treat such a string as a URL and fetch it),
and keeps every value of repeated list fields (`-F texts=a -F texts=b`; BentoML keeps only the last)
in ``scope[FORM_LISTS_KEY]`` for the endpoint.

BentoML parses the multipart body again (it cannot take a parsed form). The guard's parse is cheap
next to the rest of a request: 0.1 ms for a 27 KiB VQA upload, 0.2 ms at 433 KiB, 0.4 ms with 20
retrieval texts (2026-11-23, in process); a header-only scan would save about 0.1 ms of that. Only
uploads over 1 MiB cost more (1 ms or more: both parses spool them to disk).

``EdgeMiddleware`` wraps BentoML's whole app (outside its metrics, tracing and traffic middlewares,
which ``add_asgi_middleware`` cannot reach): unknown routes get a 404 there, so BentoML's per-path
metric labels stay a fixed set, and BentoML's own overload (429) and timeout (504) answers get the
service's error shape, the 429 a Retry-After. ``install_header_timeout`` bounds how long a
connection may take to send a request's headers (uvicorn has no such timeout).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.config import DEFAULTS

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FORM_LISTS_KEY = "das.form_lists"
ARRIVED_KEY = "das.arrived"  # time.perf_counter() when the request reached the app: latency counts queueing
MAX_BODY_BYTES = DEFAULTS.max_body_bytes  # unless InputGuardMiddleware is given other limits
MAX_ARCHIVE_BYTES = DEFAULTS.max_plan_archive_bytes
ADMIN_PREFIX = "/admin/"
MAX_ADMIN_JSON_BYTES = 16 * 1024  # the admin routes' JSON bodies are a task and a name, or a path
ADMIN_LOAD = "/admin/plans/load"
MULTIPART_FRAMING_BYTES = 64 * 1024  # what an archive upload may carry around the archive itself
RETRY_AFTER_S = "1"
ADMIN_DISABLED = "admin API disabled: set DAS_ADMIN_TOKEN to enable it"  # as service._authorized says
ADMIN_UNAUTHORIZED = "missing or wrong admin token (Authorization: Bearer <DAS_ADMIN_TOKEN>)"
# route -> its file fields
FILE_FIELDS = {
    "/vqa": ("image",),
    "/nlvr2": ("image_left", "image_right"),
    "/retrieval/texts": ("image",),
    "/retrieval/images": ("images",),
    ADMIN_LOAD: ("archive",),
}
LIST_FIELDS = {"/retrieval/texts": ("texts",)}
JSON_BODY_ROUTES = ("/v1/chat/completions",)  # JSON inference bodies, bounded like the uploads


async def _send_error(send: Send, status: int, message: str, *extra: tuple[bytes, bytes]) -> None:
    body = json.dumps({"error": message, "status": status}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


# an answer sent before the body was read closes the connection: the server then neither reads nor
# keeps the rest of a large upload
CLOSE = (b"connection", b"close")


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return ""


class InputGuardMiddleware:
    """``admin_token`` (DAS_ADMIN_TOKEN; empty: the admin API is disabled), ``max_body_bytes``
    (DAS_MAX_BODY_BYTES) and ``max_archive_bytes`` (DAS_MAX_PLAN_ARCHIVE_BYTES) come from the
    service's settings; the limits default to MAX_BODY_BYTES and MAX_ARCHIVE_BYTES."""

    def __init__(self, app: ASGIApp, admin_token: str = "", max_body_bytes: int | None = None,
                 max_archive_bytes: int | None = None) -> None:
        self.app = app
        self.admin_token = admin_token
        self.max_body_bytes = MAX_BODY_BYTES if max_body_bytes is None else max_body_bytes
        archive = MAX_ARCHIVE_BYTES if max_archive_bytes is None else max_archive_bytes
        # a plan archive plus the multipart framing around it; never more than any request body
        self.max_admin_archive_bytes = min(self.max_body_bytes, archive + MULTIPART_FRAMING_BYTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.startswith(ADMIN_PREFIX):
            denied = self._admin_denied(scope)
            if denied is not None:
                await _send_error(send, *denied, CLOSE, *(
                    [(b"www-authenticate", b"Bearer")] if denied[0] == 401 else []))
                return
        if scope.get("method") != "POST" or (path not in FILE_FIELDS and path not in JSON_BODY_ROUTES
                                             and not path.startswith(ADMIN_PREFIX)):
            await self.app(scope, receive, send)
            return
        scope[ARRIVED_KEY] = time.perf_counter()
        content_type = _header(scope, b"content-type")
        limit = self._body_limit(path, content_type)
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            await _send_error(send, 413, f"request body of {declared} bytes is over the limit of {limit} bytes", CLOSE)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send, 413, f"request body over the limit of {limit} bytes", CLOSE)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if path in FILE_FIELDS:
            if content_type.startswith("multipart/form-data"):
                problem = await self._inspect_form(scope, body)
                if problem:
                    await _send_error(send, 400, problem)
                    return
            elif not content_type.startswith("application/json"):
                fields = ", ".join(FILE_FIELDS[path])
                status = 400 if content_type.startswith("application/x-www-form-urlencoded") else 415
                await _send_error(send, status, f"send multipart/form-data with the file field(s) {fields}; "
                                                f"got {content_type or 'no content type'}")
                return

        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _admin_denied(self, scope: Scope) -> tuple[int, str] | None:
        """The admin token is checked here, before any of the body is read (the endpoint checks again)."""
        if not self.admin_token:
            return 403, ADMIN_DISABLED
        header = _header(scope, b"authorization")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            return 401, ADMIN_UNAUTHORIZED
        return None

    def _body_limit(self, path: str, content_type: str) -> int:
        if not path.startswith(ADMIN_PREFIX):
            return self.max_body_bytes
        if path == ADMIN_LOAD and content_type.startswith("multipart/form-data"):
            return self.max_admin_archive_bytes
        return MAX_ADMIN_JSON_BYTES

    @staticmethod
    async def _inspect_form(scope: Scope, body: bytes) -> str | None:
        async def once():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(scope, once).form(max_files=1000, max_fields=1000)
        except Exception as exc:  # malformed multipart bodies
            return f"malformed multipart body: {exc}"
        try:
            for field in FILE_FIELDS[scope["path"]]:
                for value in form.getlist(field):
                    if not isinstance(value, UploadFile):
                        return f"{field!r} must be an uploaded file (curl -F {field}=@photo.jpg), not a text value"
            scope[FORM_LISTS_KEY] = {
                field: [v for v in form.getlist(field) if isinstance(v, str)]
                for field in LIST_FIELDS.get(scope["path"], ())
            }
        finally:
            await form.close()
        return None


class JsonOnlyMiddleware:
    """POSTs to ``routes`` (APIs without file fields) must not be multipart: BentoML would answer a
    malformed multipart body there with a 500. 415 instead, before the body is read."""

    def __init__(self, app, routes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.routes = frozenset(routes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") in self.routes:
            content_type = dict(scope.get("headers", [])).get(b"content-type", b"").decode("latin-1")
            if content_type.lower().startswith("multipart/"):
                await _send_error(send, 415, f"send application/json to {scope['path']}; got {content_type}")
                return
        await self.app(scope, receive, send)


class EdgeMiddleware:
    """Outermost: wraps the Starlette app BentoML builds (``service.to_asgi()``), so it runs before
    BentoML's metrics middleware, which labels every request by its raw path (5,000 requests to
    distinct unknown paths were 100k series). Unknown paths get a 404 here, in the service's error
    shape; BentoML's 429 (over the in-flight cap) and 504 (traffic timeout) are rewritten into it,
    the 429 with Retry-After. Costs a set lookup per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._known: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._known is None:
            self._known = known_paths(self.app)
        path = scope.get("path", "")
        if path not in self._known:
            shown = path if len(path) <= 80 else path[:80] + "..."
            await _send_error(send, 404, f"no route {shown!r}; the API is described at /docs.json")
            return
        await self.app(scope, receive, self._rewriting(send))

    @staticmethod
    def _rewriting(send: Send) -> Send:
        replaced = False

        async def rewriting_send(message: MutableMapping[str, Any]) -> None:
            nonlocal replaced
            if replaced:  # the original body of a replaced answer
                return
            if message["type"] == "http.response.start" and message["status"] in (429, 504):
                replaced = True
                if message["status"] == 429:
                    await _send_error(send, 429, "too many requests in flight; retry shortly",
                                      (b"retry-after", RETRY_AFTER_S.encode()))
                else:
                    await _send_error(send, 504, "the request took longer than the service's timeout")
                return
            await send(message)

        return rewriting_send


def serve_behind_edge(service: Any) -> None:
    """Make ``service.to_asgi()`` (what BentoML's worker hands to uvicorn) return its app wrapped in
    EdgeMiddleware. BentoML places ``add_asgi_middleware`` middlewares inside its own (metrics,
    tracing, timeout, in-flight cap) and offers no outer hook; the service object is a slotted
    attrs instance, so its class is swapped for a subclass that adds only this."""
    base = type(service)
    if getattr(base, "_das_edge", False):
        return

    class EdgeService(base):  # type: ignore[misc, valid-type]
        __slots__ = ()
        _das_edge = True

        def to_asgi(self, is_main: bool = True) -> Any:
            return EdgeMiddleware(super().to_asgi(is_main))

    service.__class__ = EdgeService


def known_paths(app: Any) -> frozenset[str]:
    """Every path the app serves, with and without a trailing slash (Starlette redirects between
    the two): its routes, the routes of mounted apps, the files of mounted static directories."""
    paths: set[str] = set()

    def walk(routes: Any, prefix: str) -> None:
        for route in routes:
            path = prefix + getattr(route, "path", "")
            inner = getattr(route, "app", None)
            sub = getattr(route, "routes", None)
            if sub:  # a mounted app or router
                paths.add(path)
                walk(sub, path)
            elif getattr(inner, "directory", None):  # StaticFiles
                root = Path(inner.directory)
                paths.update(f"{path}/{p.relative_to(root).as_posix()}" for p in root.rglob("*") if p.is_file())
            else:
                paths.add(path or "/")
    walk(getattr(app, "routes", []), "")
    return frozenset(paths | {p.rstrip("/") for p in paths if p != "/"} | {p.rstrip("/") + "/" for p in paths})


def install_header_timeout(seconds: float) -> None:
    """Close connections that take longer than ``seconds`` to send a request's headers.

    uvicorn 0.54 (h11 or httptools) has no such timeout: its keep-alive timer runs only between
    requests and every byte received cancels it, so a client sending headers a byte at a time holds
    a connection forever (slowloris). BentoML 1.4 starts uvicorn with http="auto" and no hook, so
    this swaps uvicorn's "auto" protocol for a subclass that arms a timer when a connection opens
    and after each response. Must run before the worker starts uvicorn: service.py, at import."""
    import uvicorn.config
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    global HeaderTimeoutProtocol
    HeaderTimeoutProtocol = _with_header_timeout(AutoHTTPProtocol, seconds)
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:HeaderTimeoutProtocol"


HeaderTimeoutProtocol: type | None = None


def _with_header_timeout(base: type, seconds: float) -> type:
    class HeaderTimeout(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()  # the next request's headers get the same time

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._header_timeout)

        def _header_timeout(self) -> None:
            self._header_timer = None
            waiting = self.cycle is None or self.cycle.response_complete  # no request past its headers
            if waiting and self.transport.get_protocol() is self and not self.transport.is_closing():
                self.transport.close()

    HeaderTimeout.__name__ = HeaderTimeout.__qualname__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeout
