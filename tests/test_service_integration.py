"""A real `bentoml serve` process (2 workers) over a tiny checkpoint and plan store made here."""

from __future__ import annotations

import concurrent.futures
import io
import json
import shutil
import subprocess
import threading
import time

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from transformers import ViltProcessor

from helpers import (
    AUTH, assert_client_error, make_checkpoint, png, post_vqa, random_image, save_random_plan, serve,
)
from models.backbones.vilt.modeling import ViltBackbone

PIXEL_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    backbone_dir, store = root / "backbone", root / "plans"
    backbone_dir.mkdir()
    model = make_checkpoint(backbone_dir, "vqa")
    backbone = ViltBackbone.from_pretrained(backbone_dir)
    save_random_plan(backbone, store, "vqa", "skip1", skipped=(1,))
    save_random_plan(backbone, store, "vqa", "skip2", skipped=(1, 2), seed=1)
    save_random_plan(backbone, store, "nlvr2", "own", own_head=True, labels=("False", "True"),
               own_parts=("token_type_embeddings",))
    save_random_plan(backbone, store, "retrieval", "own", skipped=(3,), own_head=True)
    (store / "store.json").write_text(json.dumps({"loaded": {"vqa": ["skip1", "skip2"], "nlvr2": ["own"]}}))
    # 2 workers on a 2-core CI host: one torch thread each (cores / workers, as the README advises)
    with serve(root, DAS_BACKBONE=str(backbone_dir), DAS_PLANS=str(store), DAS_WORKERS="2", DAS_TORCH_THREADS="1",
               DAS_MAX_IMAGE_PIXELS=str(PIXEL_LIMIT), DAS_MAX_CANDIDATES="8") as client:
        yield {"client": client, "store": store, "backbone_dir": backbone_dir, "model": model, "backbone": backbone}


# ------------------------------------------------------------------------------------------------
def test_vqa_full_plan_matches_transformers(server):
    image, question = random_image(70, 90, seed=3), "what color is the circle"
    response = post_vqa(server["client"], image, question, plan="full", top_k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    processor = ViltProcessor.from_pretrained(server["backbone_dir"])
    inputs = processor(images=[image], text=[question], return_tensors="pt")
    with torch.no_grad():
        scores = torch.sigmoid(server["model"](**inputs).logits)[0]
    top = scores.topk(3)
    labels = server["model"].config.id2label
    assert [a["answer"] for a in body["answers"]] == [labels[int(i)] for i in top.indices]
    for answer, expected in zip(body["answers"], top.values.tolist()):
        assert abs(answer["score"] - expected) < 1e-4
    assert body["plan"] == {"task": "vqa", "name": "full", "version": 0, "skipped_layers": [], "flops_ratio": 1.0,
                            "chosen_by": "request"}
    assert body["flops"]["full"] == body["flops"]["executed"] > 0 and body["latency_ms"] > 0


def test_vqa_skip_plan_reports_savings(server):
    body = post_vqa(server["client"], random_image(64, 64), "how many shapes", plan="skip2").json()
    assert body["plan"]["skipped_layers"] == [1, 2]
    flops = body["flops"]
    assert flops["executed"] < flops["full"]
    assert abs(flops["saved_ratio"] - (1 - flops["executed"] / flops["full"])) < 1e-6


def test_nlvr2_and_plans_listing(server):
    client = server["client"]
    response = client.post("/nlvr2", files={
        "image_left": ("l.png", png(random_image(64, 80, 1)), "image/png"),
        "image_right": ("r.png", png(random_image(80, 64, 2)), "image/png"),
    }, data={"statement": "both images are red"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["label"], bool) and 0 <= body["probability"] <= 1
    assert body["label"] == (body["probability"] > 0.5)
    assert body["plan"]["name"] == "own"
    listing = client.get("/plans/").json()["tasks"]
    assert listing["vqa"]["active"] == "full"
    assert {p["name"] for p in listing["vqa"]["plans"]} == {"full", "skip1", "skip2"}
    skip2 = next(p for p in listing["vqa"]["plans"] if p["name"] == "skip2")
    assert skip2["skipped_layers"] == [1, 2] and skip2["flops_saved_ratio"] > 0 and skip2["version"] == 1


def test_unserved_task_is_404_until_a_plan_is_loaded(server):
    client = server["client"]
    files = {"image": ("i.png", png(random_image(64, 64)), "image/png")}
    response = client.post("/retrieval/texts", files=files, data={"texts": '["a red circle", "a blue square"]'})
    assert_client_error(response, 404, "not served")
    loaded = client.post("/admin/plans/load", json={"path": "retrieval/own"}, headers=AUTH)
    assert loaded.status_code == 200, loaded.text
    time.sleep(1.5)  # the other worker converges within the sync interval
    texts = ["a red circle", "a blue square", "two green shapes"]
    for _ in range(4):  # reaches both workers
        as_repeated = client.post("/retrieval/texts", files=files, data={"texts": texts})
        as_json = client.post("/retrieval/texts", files=files, data={"texts": json.dumps(texts)})
        assert as_repeated.status_code == as_json.status_code == 200, as_repeated.text
        assert as_repeated.json()["ranking"] == as_json.json()["ranking"]
    ranking = as_json.json()["ranking"]
    assert sorted(r["index"] for r in ranking) == [0, 1, 2]
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    assert as_json.json()["flops"]["executed"] < as_json.json()["flops"]["full"]
    images = [("images", (f"{i}.png", png(random_image(64, 64 + 32 * i, i)), "image/png")) for i in range(3)]
    by_text = client.post("/retrieval/images", files=images, data={"text": "a red circle"})
    assert by_text.status_code == 200, by_text.text
    assert sorted(r["index"] for r in by_text.json()["ranking"]) == [0, 1, 2]


def test_bad_inputs_get_clear_4xx_and_service_keeps_serving(server):
    client = server["client"]
    good = png(random_image(64, 64))
    cases = [
        (client.post("/vqa", files={"image": ("x.png", b"not an image", "image/png")}, data={"question": "x"}), 400, "image"),
        (client.post("/vqa", files={"image": ("x.png", good[: len(good) // 2], "image/png")}, data={"question": "x"}), 400, "decode"),
        (client.post("/vqa", files={"image": ("x.png", b"", "image/png")}, data={"question": "x"}), 400, "empty"),
        (post_vqa(client, Image.new("RGB", (1100, 1000)), "x"), 413, "limit"),
        (post_vqa(client, random_image(64, 64), "   "), 400, "empty"),
        (post_vqa(client, random_image(64, 64), "x", plan="no-such-plan"), 404, "no plan"),
        (post_vqa(client, random_image(64, 64), "x", plan="../../etc/passwd"), 404, "no plan"),
        (client.post("/vqa", data={"question": "x"}), 400, "image"),
        (client.post("/vqa", files={"image": ("x.png", good, "image/png")}), 400, "question"),
        (client.post("/vqa", data={"image": "http://127.0.0.1:1/x.png", "question": "x"},
                     files={"dummy": ("d", b"d")}), 400, "uploaded file"),
        (client.post("/retrieval/texts", files={"image": ("x.png", good, "image/png")},
                     data={"texts": json.dumps([f"text {i}" for i in range(9)])}), 413, "limit"),
        (client.post("/admin/plans/activate", json={"task": "vqa", "name": "skip1"}), 401, "token"),
        (client.post("/admin/plans/activate", json={"task": "vqa", "name": "skip1"},
                     headers={"Authorization": "Bearer wrong"}), 401, "token"),
        (client.post("/admin/plans/load", json={"path": "../../etc"}, headers=AUTH), 400, "outside"),
        (client.post("/admin/plans/activate", json={"task": "vqa", "name": "nope"}, headers=AUTH), 404, "no plan"),
        (client.post("/admin/plans/unload", json={"task": "vqa", "name": "full"}, headers=AUTH), 409, "full"),
    ]
    for response, status, fragment in cases:
        assert_client_error(response, status, fragment)
    for mode in ("L", "RGBA", "CMYK", "P"):
        image = random_image(64, 64, mode=mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        response = client.post("/vqa", files={"image": ("m", png(image, fmt), "image/*")}, data={"question": "what"})
        assert response.status_code == 200, (mode, response.text)
    long_question = " ".join(["what color is the circle"] * 20)
    body = post_vqa(client, random_image(64, 64), long_question).json()
    assert body["question_truncated"] is True
    assert post_vqa(client, random_image(64, 64), "is there a circle").status_code == 200


def test_an_upload_that_does_not_decode_fails_alone_in_its_batch(server):
    """Images are decoded in the batch: a truncated PNG (its header passes) sent among good requests
    gets its 400, and the good ones, batched with it or not, the answers they get alone."""
    client = server["client"]
    good = [random_image(64, 64, seed=s) for s in range(4)]
    alone = [post_vqa(client, image, "what color is the circle", plan="skip1").json()["answers"] for image in good]
    cut = png(random_image(64, 64, seed=9))
    cut = cut[: len(cut) // 2]

    def call(i):
        if i % 2:
            return client.post("/vqa", files={"image": ("x.png", cut, "image/png")},
                               data={"question": "what color is the circle", "plan": "skip1"})
        return post_vqa(client, good[i // 2 % 4], "what color is the circle", plan="skip1")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(16)))
    for i, response in enumerate(responses):
        if i % 2:
            assert_client_error(response, 400, "decode")
        else:
            assert response.status_code == 200, response.text
            got = response.json()["answers"]
            expected = alone[i // 2 % 4]
            assert [a["answer"] for a in got] == [a["answer"] for a in expected]
            assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(got, expected))


def test_corrupted_plan_is_refused_and_old_plan_keeps_serving(server):
    client, store = server["client"], server["store"]
    shutil.copytree(store / "vqa" / "skip1", store / "vqa" / "broken")
    spec = json.loads((store / "vqa" / "broken" / "plan.json").read_text())
    spec["name"] = "broken"
    (store / "vqa" / "broken" / "plan.json").write_text(json.dumps(spec))
    weights = store / "vqa" / "broken" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = client.get("/plans/").json()["tasks"]["vqa"]["active"]
    response = client.post("/admin/plans/load", json={"path": "vqa/broken"}, headers=AUTH)
    assert_client_error(response, 422, "checksum")
    assert client.get("/plans/").json()["tasks"]["vqa"]["active"] == before
    assert post_vqa(client, random_image(64, 64), "what color").status_code == 200


def test_hot_swap_under_concurrent_load(server):
    client = server["client"]
    versions = {"full": 0, "skip1": 1, "skip2": 1}
    results, failures = [], []
    stop = threading.Event()
    image = png(random_image(64, 64, 7))

    def load_loop():
        with httpx.Client(base_url=client.base_url, timeout=60) as c:
            while not stop.is_set():
                started = time.time()
                r = c.post("/vqa", files={"image": ("i.png", image, "image/png")}, data={"question": "what color"})
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    results.append((started, r.json()["plan"]))

    threads = [threading.Thread(target=load_loop) for _ in range(3)]
    for t in threads:
        t.start()
    swaps = []
    try:
        for name in ["skip1", "skip2", "full", "skip1", None]:
            sent = time.time()
            if name is None:
                r = client.post("/admin/plans/rollback", json={"task": "vqa"}, headers=AUTH)
                assert r.status_code == 200 and r.json()["active"] == "full", r.text
                name = "full"
            else:
                r = client.post("/admin/plans/activate", json={"task": "vqa", "name": name}, headers=AUTH)
                assert r.status_code == 200, r.text
            swaps.append((sent, time.time(), name))
            time.sleep(2.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures
    assert len(results) > 20
    for started, plan in results:
        assert versions[plan["name"]] == plan["version"]  # never a mixed/unknown version
        earlier = [(done, name) for sent, done, name in swaps if sent < started]
        if earlier and earlier[-1][0] + 2.0 < started:  # answered > 2 s before: the new plan must show
            assert plan["name"] == earlier[-1][1], (started, plan, swaps)


def test_metrics_count_exact_flops(server):
    client = server["client"]

    def counters():
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        values = {}
        for name in ("das_flops_full", "das_flops_executed", "das_requests"):
            for sample in families[name].samples:
                if sample.name.endswith("_total"):
                    values[(name, tuple(sorted(sample.labels.items())))] = sample.value
        return values, families

    post_vqa(client, random_image(64, 64), "warm up", plan="skip1")
    before, _ = counters()
    bodies = [post_vqa(client, random_image(48 + 16 * i, 64, i), "what color is it" + " here" * i, plan="skip1").json()
              for i in range(4)]
    after, families = counters()
    labels = (("plan", "skip1"), ("task", "vqa"))
    full = sum(b["flops"]["full"] for b in bodies)
    executed = sum(b["flops"]["executed"] for b in bodies)
    assert after[("das_flops_full", labels)] - before.get(("das_flops_full", labels), 0) == full
    assert after[("das_flops_executed", labels)] - before.get(("das_flops_executed", labels), 0) == executed
    ok = (("plan", "skip1"), ("status", "ok"), ("task", "vqa"))
    assert after[("das_requests", ok)] - before.get(("das_requests", ok), 0) == 4
    # (das_plan_swaps appears after the first swap; the hot-swap tests and test_monitoring cover it)
    for name in ("das_request_latency_seconds", "das_batch_size", "das_active_plan"):
        assert name in families
    active = [s for s in families["das_active_plan"].samples if s.labels["task"] == "vqa" and s.value == 1]
    assert len(active) == 1


def test_plan_archive_upload(server, tmp_path):
    import tarfile

    client, store = server["client"], server["store"]
    source = store / "vqa" / "skip1"
    spec = json.loads((source / "plan.json").read_text())
    spec["name"] = "from-archive"
    archive = tmp_path / "plan.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("plan.json", json.dumps(spec).encode()), ("weights.safetensors", (source / "weights.safetensors").read_bytes())):
            info = tarfile.TarInfo(f"from-archive/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    files = {"archive": ("plan.tar.gz", archive.read_bytes(), "application/gzip")}
    assert_client_error(client.post("/admin/plans/load", files=files), 401, "token")
    response = client.post("/admin/plans/load", files=files, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["plan"]["name"] == "from-archive"
    assert (store / "vqa" / "from-archive" / "weights.safetensors").is_file()
    time.sleep(1.5)
    for _ in range(3):
        body = post_vqa(client, random_image(64, 64), "what color", plan="from-archive").json()
        assert body["plan"]["name"] == "from-archive"
    assert_client_error(client.post("/admin/plans/load", files=files, headers=AUTH), 409, "higher version")
    assert_client_error(client.post("/admin/plans/load", json={}, headers=AUTH), 400, "exactly one")


def test_metrics_pass_promtool(server):
    """Prometheus naming and help-string conventions, checked by Prometheus' own tool."""
    import shutil as _shutil

    promtool = _shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed here (make test installs Debian's prometheus package when it can)")
    post_vqa(server["client"], random_image(64, 64), "what color")
    text = server["client"].get("/metrics").text
    assert "das_flops_executed_total" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_openai_routes_say_the_backbone_is_not_generative(server):
    client = server["client"]
    for response in (client.get("/v1/models"),
                     client.post("/v1/chat/completions", json={"model": "vqa", "messages": [
                         {"role": "user", "content": "hi"}]})):
        assert_client_error(response, 404, "not generative")
        assert set(response.json()) == {"error", "status"}
