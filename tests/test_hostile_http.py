"""Hostile HTTP clients against a real `bentoml serve`: unknown paths do not grow /metrics, overload
answers carry Retry-After in the service's error shape, trickled headers do not hold a connection,
and admin bodies are refused before they are read. Plus the same middleware in process, for what a
second server would cost too much to show (admin disabled)."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

import service.guard as guard
from helpers import AUTH, TOKEN, make_checkpoint, serve
from helpers import png as _png

CAP = 2  # in-flight requests
HEADER_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "backbone").mkdir()
    (root / "plans").mkdir()
    make_checkpoint(root / "backbone", "vqa")
    with serve(root, DAS_BACKBONE=str(root / "backbone"), DAS_PLANS=str(root / "plans"), DAS_WORKERS="1",
               DAS_TORCH_THREADS="1", DAS_MAX_CONCURRENCY=str(CAP),
               DAS_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S)) as client:
        yield client


def _error_shape(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "status"} and body["status"] == status and isinstance(body["error"], str), body
    return body


def _series(client) -> list[str]:
    return [line for line in client.get("/metrics").text.splitlines() if line and not line.startswith("#")]


def _connect(client) -> socket.socket:
    return socket.create_connection(("127.0.0.1", client.base_url.port), timeout=30)


def _response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response (status, headers, body) from a raw socket; the server closes or sends a length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += connection.recv(65536)
    return int(lines[0].split()[1]), headers, body


def _closed_within(connection: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes the connection within ``seconds``, while we send ``trickle`` a byte
    every 0.2 s (a slowloris client)."""
    connection.settimeout(0.2)
    deadline = time.time() + seconds
    for i in itertools.count():
        if time.time() > deadline:
            return False
        try:
            if connection.recv(1024) == b"":
                return True
        except socket.timeout:
            pass
        except ConnectionError:
            return True
        try:
            if trickle:
                connection.sendall(trickle[i % len(trickle):][:1])
        except (BrokenPipeError, ConnectionError):
            return True
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# metrics labels
# ---------------------------------------------------------------------------------------------
def test_unknown_paths_are_404_and_add_no_metric_series(client):
    client.get("/plans/")
    before = _series(client)
    for i in range(200):
        for response in (client.get(f"/no-such-route-{i}"), client.post(f"/vqa/x{i}", data={"q": "x"}),
                         client.get(f"/plans/no-such-plan-{i}")):
            _error_shape(response, 404)
    after = _series(client)
    assert not [line for line in after if "no-such" in line or "/vqa/x" in line]
    assert len(after) <= len(before) + 10, set(after) - set(before)  # not 600 paths x ~20 series
    # the service's routes, the OpenAPI page and its assets are still served
    assert client.get("/plans/").status_code == 200
    assert client.get("/docs.json").status_code == 200
    assert client.get("/").status_code == 200
    assert client.get("/static_content/swagger-ui.css").status_code == 200
    assert client.get("/readyz").status_code == 200


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(40_000, 1), (1, 40_000)])
def test_a_tiny_png_of_a_long_image_is_answered(client, size):
    """The issue's case: a 199-byte PNG of 40000 x 1 pixels got the worker OOM-killed (padded to
    40000 x 2100 before resizing); tests/test_image_prep.py checks the sizes."""
    png = _png(Image.new("RGB", size, (0, 0, 255)))
    assert len(png) < 1000
    response = client.post("/vqa", files={"image": ("long.png", png, "image/png")}, data={"question": "what color"})
    assert response.status_code == 200, response.text
    assert client.get("/readyz").status_code == 200


# ---------------------------------------------------------------------------------------------
# overload
# ---------------------------------------------------------------------------------------------
def _held_upload(client) -> socket.socket:
    """A request whose body never finishes arriving: it stays in flight until the socket closes."""
    held = _connect(client)
    held.sendall(b"POST /vqa HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n--b\r\n")
    return held


def test_over_the_in_flight_cap_is_429_with_retry_after(client):
    held = [_held_upload(client) for _ in range(CAP)]
    try:
        deadline = time.time() + 60
        while (refused := client.get("/plans/")).status_code != 429 and time.time() < deadline:
            time.sleep(0.2)  # until the server has taken all CAP uploads
        _error_shape(refused, 429)
        assert refused.headers["retry-after"] == "1"
        assert client.get("/metrics").status_code == 200  # probes and metrics are never refused
        _error_shape(client.get("/no-such-route"), 404)  # unknown routes are refused before the cap
    finally:
        for connection in held:
            connection.close()


# ---------------------------------------------------------------------------------------------
# header timeout
# ---------------------------------------------------------------------------------------------
def test_trickled_headers_are_cut_off(client):
    slow = [_connect(client) for _ in range(3)]
    for connection in slow:
        connection.sendall(b"GET /plans/ HTTP/1.1\r\nHost: test\r\n")
    assert _closed_within(slow[0], HEADER_TIMEOUT_S + 15, trickle=b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
    assert all(_closed_within(c, 15) for c in slow[1:])
    idle = _connect(client)  # a connection that never sends anything
    assert _closed_within(idle, HEADER_TIMEOUT_S + 15)
    for connection in [*slow, idle]:
        connection.close()


def test_a_slow_body_is_not_cut_by_the_header_timeout(client):
    """The timeout covers the headers only: a body may take longer (BentoML's traffic timeout bounds that)."""
    body = json.dumps({"task": "vqa", "name": "nope"}).encode()
    with _connect(client) as connection:
        connection.sendall(b"POST /admin/plans/activate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: "
                           + str(len(body)).encode() + b"\r\n\r\n")
        for part in (body[:5], body[5:10], body[10:]):
            time.sleep(HEADER_TIMEOUT_S * 0.75)
            connection.sendall(part)
        status, _, answer = _response(connection)
    assert status == 404 and "nope" in json.loads(answer)["error"]  # the handler's answer, not a cut


# ---------------------------------------------------------------------------------------------
# admin bodies
# ---------------------------------------------------------------------------------------------
HUGE = 160 * 1024 * 1024


@pytest.mark.parametrize("authorization, status", [(b"", 401), (b"Authorization: Bearer wrong\r\n", 401),
                                                   (b"Authorization: Bearer " + TOKEN.encode() + b"\r\n", 413)])
@pytest.mark.parametrize("route", ["/admin/plans/activate", "/admin/plans/load"])
def test_admin_bodies_are_refused_before_they_are_read(client, route, authorization, status):
    """A declared 160 MiB body gets its answer with none of the body sent: it was never read."""
    with _connect(client) as connection:
        connection.sendall(b"POST " + route.encode() + b" HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           + authorization + b"Content-Length: " + str(HUGE).encode() + b"\r\n\r\n")
        got, headers, body = _response(connection)
    assert got == status
    error = json.loads(body)
    assert set(error) == {"error", "status"} and error["status"] == status
    if status == 401:
        assert error["error"] == guard.ADMIN_UNAUTHORIZED
    else:
        assert str(guard.MAX_ADMIN_JSON_BYTES) in error["error"]
    assert headers.get("connection") == "close"


def test_a_streamed_admin_body_is_cut_at_the_limit(client):
    """No Content-Length (chunked): reading stops once the body passes the limit."""
    with _connect(client) as connection:
        connection.sendall(b"POST /admin/plans/unload HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"Authorization: Bearer " + TOKEN.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (4096, b" " * 4096)
        sent = 0
        connection.settimeout(0.05)
        reply = b""
        while not reply and sent < 64 * 1024 * 1024:
            try:
                connection.sendall(chunk)
                sent += 4096
                reply = connection.recv(65536)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        connection.settimeout(30)
        status, _, body = _response_from(connection, reply)
    assert status == 413 and json.loads(body)["status"] == 413
    assert sent < 8 * 1024 * 1024  # answered long before the client stopped


def _response_from(connection: socket.socket, data: bytes) -> tuple[int, dict[str, str], bytes]:
    class Buffered:
        def __init__(self):
            self.pending = data

        def recv(self, n):
            if self.pending:
                out, self.pending = self.pending, b""
                return out
            return connection.recv(n)

    return _response(Buffered())  # type: ignore[arg-type]


def test_an_authorized_admin_call_still_works(client):
    response = client.post("/admin/plans/rollback", json={"task": "vqa"}, headers=AUTH)
    assert response.status_code not in (401, 403, 413, 500), response.text  # the handler's own answer
    _error_shape(client.post("/admin/plans/rollback", json={"task": "vqa"}), 401)


# ---------------------------------------------------------------------------------------------
# in process
# ---------------------------------------------------------------------------------------------
async def _call(app, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""):
    sent, received = [], []

    async def receive():
        received.append(True)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": headers}, receive, send)
    return sent, received


def test_admin_disabled_is_403_before_the_body(monkeypatch):
    monkeypatch.delenv("DAS_ADMIN_TOKEN", raising=False)
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    middleware = guard.InputGuardMiddleware(app)
    sent, received = asyncio.run(_call(middleware, "POST", "/admin/plans/load",
                                       [(b"content-length", str(HUGE).encode()), (b"authorization", b"Bearer x")]))
    assert sent[0]["status"] == 403 and not received and not reached
    assert json.loads(sent[1]["body"]) == {"error": guard.ADMIN_DISABLED, "status": 403}
    sent, received = asyncio.run(_call(middleware, "GET", "/plans/", []))
    assert reached == ["/plans/"]  # everything else passes


def test_an_inference_body_declared_over_the_limit_is_refused_unread(monkeypatch):
    monkeypatch.setattr(guard, "MAX_BODY_BYTES", 1000)
    middleware = guard.InputGuardMiddleware(lambda *a: None)
    sent, received = asyncio.run(_call(middleware, "POST", "/vqa", [(b"content-length", b"1001"),
                                                                    (b"content-type", b"multipart/form-data")]))
    assert sent[0]["status"] == 413 and not received and (b"connection", b"close") in sent[0]["headers"]


def test_edge_knows_routes_mounts_and_static_files(tmp_path):
    (tmp_path / "css").mkdir()
    (tmp_path / "css" / "ui.css").write_text("x")
    inner = Starlette(routes=[Route("/", lambda r: PlainTextResponse("plans"))])
    app = Starlette(routes=[Route("/vqa", lambda r: PlainTextResponse("ok"), methods=["POST"]),
                            Mount("/plans", app=inner), Mount("/static", app=StaticFiles(directory=tmp_path))])
    known = guard.known_paths(app)
    assert {"/vqa", "/vqa/", "/plans", "/plans/", "/static/css/ui.css"} <= known
    assert not {"/", "/plans/x", "/static/css", "/static/other.css"} & known


@pytest.mark.parametrize("status, retry_after", [(429, b"1"), (504, None), (200, None), (404, None)])
def test_edge_gives_bentoml_answers_the_error_shape(status, retry_after):
    async def app(scope, receive, send):
        await JSONResponse({"error": "from BentoML"}, status_code=status)(scope, receive, send)

    edge = guard.EdgeMiddleware(app)
    edge._known = frozenset({"/vqa"})  # what known_paths finds in BentoML's app
    sent, _ = asyncio.run(_call(edge, "POST", "/vqa", []))
    assert sent[0]["status"] == status and len(sent) == 2
    body = json.loads(sent[1]["body"])
    assert dict(sent[0]["headers"]).get(b"retry-after") == retry_after
    if status in (429, 504):
        assert set(body) == {"error", "status"} and body["status"] == status
    else:
        assert body == {"error": "from BentoML"}  # the service's own answers pass unchanged
    sent, _ = asyncio.run(_call(edge, "GET", "/elsewhere", []))
    assert sent[0]["status"] == 404 and json.loads(sent[1]["body"])["status"] == 404
