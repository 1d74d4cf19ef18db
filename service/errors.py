"""One error shape for every answer: ``{"error": str, "status": int}`` plus an optional ``detail`` list.

The service's own errors already have it. BentoML's do not: its input-validation 400s are
``{"error": "1 validation error for Input", "detail": [...]}``, its other exceptions a one-element
list, Starlette's 404/405 plain text. ``ErrorShapeMiddleware`` rewrites those bodies on the way
out (BentoML's 429 and 504, which arise outside every service middleware, are reshaped by
``service.guard.EdgeMiddleware``). ``quiet_client_errors`` turns BentoML's ERROR log with a
traceback for each bad request into one WARNING line.

:class:`RegistryError` is the error of the plan store, the registry and the plan-choice policy: a
request about plans that cannot be honoured, with the HTTP status that fits.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

MAX_ERROR_BODY = 1 << 20  # bigger error bodies pass through untouched
BENTOML_ERROR_LOGGER = "bentoml._internal.server.http_app"  # where BentoML logs a failed request


class RegistryError(Exception):
    """A registry request that cannot be honoured. ``status`` is the HTTP status that fits."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error_body(status: int, message: str, detail: list | None = None) -> bytes:
    body: dict[str, Any] = {"error": message, "status": status}
    if detail:
        body["detail"] = detail
    return json.dumps(body).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def validation_summary(detail: list) -> str:
    parts = []
    for item in detail[:5]:
        if isinstance(item, dict):
            loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
    more = f" (and {len(detail) - 5} more)" if len(detail) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def reshape(status: int, content_type: str, body: bytes) -> bytes | None:
    """The error body in the service's shape, or None when it already has it."""
    parsed: Any = None
    if "json" in content_type:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
    if isinstance(parsed, list) and len(parsed) == 1:  # BentoML's BentoMLException branch
        parsed = parsed[0]
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        if parsed.get("status") == status and set(parsed) <= {"error", "status", "detail"}:
            return None
        detail = parsed.get("detail") if isinstance(parsed.get("detail"), list) else None
        message = parsed["error"]
        if detail and message.endswith(("validation error for Input", "validation errors for Input")):
            message = validation_summary(detail)
        return error_body(status, message, detail)
    text = body.decode("utf-8", "replace").strip() if parsed is None else ""
    return error_body(status, text[:500] or _phrase(status))


class ErrorShapeMiddleware:
    """Rewrites error bodies into the service's shape on the way out."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict | None = None  # an error response's start, while its body is collected
        chunks: list[bytes] = []
        size = 0

        async def shaping_send(message) -> None:
            nonlocal held, size
            if held is None:
                if (message["type"] == "http.response.start" and message["status"] >= 400
                        and scope.get("method") != "HEAD"):
                    held = message
                else:
                    await send(message)
                return
            if message["type"] != "http.response.body" or held is _PASSED:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if more and size <= MAX_ERROR_BODY:
                return
            start, held = held, _PASSED
            body = b"".join(chunks)
            chunks.clear()
            headers = start.get("headers", [])
            content_type = dict(headers).get(b"content-type", b"").decode("latin-1").lower()
            shaped = None if more else reshape(start["status"], content_type, body)
            if shaped is None:  # already in shape, or too big to be a plain error body: as it was
                await send(start)
                await send({"type": "http.response.body", "body": body, "more_body": more})
            else:
                kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-type")]
                await self._send(send, start["status"], kept, shaped)

        await self.app(scope, receive, shaping_send)

    @staticmethod
    async def _send(send, status: int, headers: list, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


_PASSED: dict = {"passed": True}  # sentinel: the held response went out unchanged


class ClientErrorLogFilter(logging.Filter):
    """BentoML logs each request it refuses (a validation error, a 4xx BentoMLException) at ERROR
    with a traceback: make that one WARNING line. Server errors keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _is_client_error(exc):
            return True
        where = f"{record.args[1]} {record.args[0]}" if isinstance(record.args, tuple) and len(record.args) == 2 \
            else record.getMessage()  # BentoML's "Exception on %s [%s]" (path, method)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "refused %s: %s", (where, _one_line(exc))
        record.exc_info, record.exc_text = None, None
        return True


def _is_client_error(exc: BaseException) -> bool:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    return isinstance(exc, BentoMLException) and exc.error_code.value < 500


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return validation_summary(exc.errors(include_context=False, include_input=False))
    return " ".join(str(exc).split())[:300]


def quiet_client_errors() -> None:
    """Install ClientErrorLogFilter on BentoML's request-error logger (once per process)."""
    logger = logging.getLogger(BENTOML_ERROR_LOGGER)
    if not any(isinstance(f, ClientErrorLogFilter) for f in logger.filters):
        logger.addFilter(ClientErrorLogFilter())


__all__ = ["ErrorShapeMiddleware", "error_body", "quiet_client_errors", "reshape"]
