"""A checkpoint with only a VQA head and an empty plan store; overload answers 503 + Retry-After (a
full batch queue) or 429 (over the in-flight cap); bad worker settings stop the service with a clear
message."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO, make_checkpoint, png, random_image, serve


CAP = 4  # in-flight requests


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("minimal")
    (root / "backbone").mkdir()
    (root / "plans").mkdir()
    make_checkpoint(root / "backbone", "vqa")
    # a queue of 1 and a slow batch window make overload easy to reach
    with serve(root, DAS_BACKBONE=str(root / "backbone"), DAS_PLANS=str(root / "plans"), DAS_WORKERS="1",
               DAS_MAX_QUEUE="1", DAS_MAX_LATENCY_MS="300", DAS_TORCH_THREADS="1",
               DAS_MAX_CONCURRENCY=str(CAP)) as client:
        yield client


def test_only_the_checkpoint_task_is_served(client):
    image = ("i.png", png(random_image(64, 64)), "image/png")
    response = client.post("/vqa", files={"image": image}, data={"question": "what color"})
    assert response.status_code == 200 and response.json()["plan"]["name"] == "full"
    for route, files, data in [
        ("/nlvr2", {"image_left": image, "image_right": image}, {"statement": "both are red"}),
        ("/retrieval/texts", {"image": image}, {"texts": '["a", "b"]'}),
        ("/retrieval/images", [("images", image)], {"text": "a red circle"}),
    ]:
        response = client.post(route, files=files, data=data)
        assert response.status_code == 404, response.text
        assert "not served" in response.json()["error"]
    assert set(client.get("/plans/").json()["tasks"]) == {"vqa"}


def test_overload_answers_503_with_retry_after(client):
    image = ("i.png", png(random_image(64, 64)), "image/png")

    def call(_):
        return client.post("/vqa", files={"image": image}, data={"question": "what color"})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 503 in statuses, statuses
    assert set(statuses) <= {200, 503, 429}  # 429: over the in-flight cap, before the queue
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and "overloaded" in r.json()["error"]
    assert call(0).status_code == 200  # and it recovers


def _held_upload(port: int) -> socket.socket:
    """A request whose body never finishes arriving: it stays in flight until the socket closes."""
    held = socket.create_connection(("127.0.0.1", port))
    held.sendall(b"POST /vqa HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n--b\r\n")
    return held


def _status_within(client, path: str, wanted: int, seconds: float = 60) -> int:
    deadline = time.time() + seconds
    while (status := client.get(path).status_code) != wanted and time.time() < deadline:
        time.sleep(0.2)
    return status


def test_requests_over_the_in_flight_cap_get_429(client):
    held = [_held_upload(client.base_url.port) for _ in range(CAP)]
    try:
        assert _status_within(client, "/plans/", 429) == 429  # once the server has taken all CAP uploads
        refused = client.get("/plans/")
        assert refused.status_code == 429 and refused.json()["status"] == 429 and refused.headers["retry-after"] == "1"
        assert client.get("/metrics").status_code == 200  # probes and metrics are never refused
        assert client.get("/readyz").status_code == 200
    finally:
        for connection in held:
            connection.close()
    assert _status_within(client, "/plans/", 200) == 200  # closed uploads give their slots back


@pytest.mark.parametrize("value", ["0", "two"])
def test_a_bad_torch_threads_setting_stops_with_a_clear_message(value):
    result = subprocess.run([sys.executable, "-c", "import service.service"], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, DAS_TORCH_THREADS=value))
    assert result.returncode != 0
    assert "DAS_TORCH_THREADS must be an integer" in result.stderr and repr(value) in result.stderr, result.stderr
