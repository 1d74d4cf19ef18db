"""ASGI middleware in front of the inference routes: bounds the request body, refuses non-file
values in file fields (BentoML would otherwise treat such a string as a URL and fetch it), and keeps
every value of repeated list fields (`-F texts=a -F texts=b`; BentoML keeps only the last) in
``scope[FORM_LISTS_KEY]`` for the endpoint.

BentoML parses the multipart body again (it cannot take a parsed form). The guard's parse is cheap
next to the rest of a request: 0.1 ms for a 27 KiB VQA upload, 0.2 ms at 433 KiB, 0.4 ms with 20
retrieval texts (2026-11-23, in process); a header-only scan would save about 0.1 ms of that. Only
uploads over 1 MiB cost more (1 ms or more: both parses spool them to disk).
"""

from __future__ import annotations

import json
import os
import time

from starlette.datastructures import UploadFile
from starlette.requests import Request

FORM_LISTS_KEY = "das.form_lists"
ARRIVED_KEY = "das.arrived"  # time.perf_counter() when the request reached the app: latency counts queueing
MAX_BODY_BYTES = int(os.environ.get("DAS_MAX_BODY_BYTES", 64 * 1024 * 1024))
# route -> its file fields
FILE_FIELDS = {
    "/vqa": ("image",),
    "/nlvr2": ("image_left", "image_right"),
    "/retrieval/texts": ("image",),
    "/retrieval/images": ("images",),
    "/admin/plans/load": ("archive",),
}
LIST_FIELDS = {"/retrieval/texts": ("texts",)}


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "status": status}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class InputGuardMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in FILE_FIELDS:
            await self.app(scope, receive, send)
            return
        scope[ARRIVED_KEY] = time.perf_counter()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                await _send_error(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = dict(scope.get("headers", [])).get(b"content-type", b"").decode()
        if content_type.startswith("multipart/form-data"):
            problem = await self._inspect_form(scope, body)
            if problem:
                await _send_error(send, 400, problem)
                return
        elif not content_type.startswith("application/json"):
            fields = ", ".join(FILE_FIELDS[scope["path"]])
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

    @staticmethod
    async def _inspect_form(scope, body: bytes) -> str | None:
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
