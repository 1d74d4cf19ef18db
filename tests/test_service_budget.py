"""Plans chosen by budget and by load, against a real `bentoml serve` (1 worker): max_flops_ratio on
the task endpoints, and store.json's adaptive section shifting default requests to cheaper plans."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import (
    assert_client_error, png, post_vqa, random_image, save_random_plan, serve, two_plan_vqa_store,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    backbone_dir, store, backbone = two_plan_vqa_store(root, {"vqa_score": 0.6}, {"vqa_score": 0.4})
    save_random_plan(backbone, store, "retrieval", "own", skipped=(3,), own_head=True)
    save_random_plan(backbone, store, "nlvr2", "own", own_head=True, labels=("False", "True"),
               own_parts=("token_type_embeddings",))
    (store / "store.json").write_text(json.dumps({"loaded": {"vqa": ["skip1", "skip2"], "retrieval": ["own"],
                                                             "nlvr2": ["own"]}}))
    with serve(root, DAS_BACKBONE=str(backbone_dir), DAS_PLANS=str(store), DAS_WORKERS="1") as client:
        yield {"client": client, "store": store}


def _write_state(store: Path, state: dict) -> None:
    """Replace store.json atomically, as the admin API does (a worker must never read half a file)."""
    tmp = store / ".store.json.test.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, store / "store.json")


def _ratios(client) -> dict[str, float]:
    return {p["name"]: p["flops_ratio"] for p in client.get("/plans/").json()["tasks"]["vqa"]["plans"]}


def test_max_flops_ratio_picks_the_most_accurate_plan_that_fits(server):
    client = server["client"]
    ratios = _ratios(client)
    assert ratios["full"] == 1.0 and ratios["skip2"] < ratios["skip1"] < 1.0
    image = random_image(64, 64)
    cases = [(1.0, "skip1"),  # skip1 scores best; full has no metrics and ranks last
             (ratios["skip1"], "skip1"), (ratios["skip1"] - 1e-6, "skip2"), (ratios["skip2"], "skip2")]
    for budget, expected in cases:
        response = post_vqa(client, image, "what color", max_flops_ratio=str(budget))
        assert response.status_code == 200, response.text
        plan = response.json()["plan"]
        assert (plan["name"], plan["chosen_by"], plan["flops_ratio"]) == (expected, "budget", ratios[expected])
        assert plan["flops_ratio"] <= budget
    # the other endpoints take it too
    picture = ("i.png", png(image), "image/png")
    responses = [
        client.post("/retrieval/texts", files={"image": picture}, data={"texts": '["a", "b"]', "max_flops_ratio": "1"}),
        client.post("/retrieval/images", files=[("images", picture)], data={"text": "a", "max_flops_ratio": "1"}),
        client.post("/nlvr2", files={"image_left": picture, "image_right": picture},
                    data={"statement": "both are red", "max_flops_ratio": "1"}),
    ]
    for response in responses:
        assert response.status_code == 200, response.text
        assert response.json()["plan"]["name"] == "own" and response.json()["plan"]["chosen_by"] == "budget"


def test_bad_budgets_are_4xx_json(server):
    client = server["client"]
    image = random_image(64, 64)
    too_small = post_vqa(client, image, "what color", max_flops_ratio="0.01")
    assert_client_error(too_small, 422, f"the cheapest is skip2 at {_ratios(client)['skip2']:.6g}")
    assert_client_error(post_vqa(client, image, "x", plan="skip1", max_flops_ratio="0.9"), 400, "not both")
    for value in ("0", "-1", "1.5", "nan", "inf"):
        assert_client_error(post_vqa(client, image, "x", max_flops_ratio=value), 400, "0 < max_flops_ratio <= 1")
    assert_client_error(post_vqa(client, image, "x", max_flops_ratio="lots"), 400, "max_flops_ratio")
    picture = ("i.png", png(image), "image/png")
    response = client.post("/retrieval/texts", files={"image": picture}, data={"texts": '["a"]', "max_flops_ratio": "0.01"})
    assert_client_error(response, 422, "the cheapest is own")
    assert post_vqa(client, image, "what color").status_code == 200  # and it keeps serving


def _shift_counts(client) -> dict[tuple[str, str, str], float]:
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    family = families.get("das_plan_shifts")
    return {} if family is None else {
        (s.labels["direction"], s.labels["from_plan"], s.labels["to_plan"]): s.value
        for s in family.samples if s.name == "das_plan_shifts_total" and s.labels["task"] == "vqa"}


def test_adaptive_config_in_the_store_shifts_default_requests(server):
    client, store = server["client"], server["store"]
    image = random_image(64, 64)
    state = json.loads((store / "store.json").read_text())
    # an SLO no request can meet: every judged request pushes the default one rung down
    state["adaptive"] = {"vqa": {"slo_p95_ms": 0.001, "min_samples": 1, "cooldown_s": 3600}}
    _write_state(store, state)
    deadline = time.time() + 10
    while "adaptive" not in client.get("/plans/").json()["tasks"]["vqa"]:
        assert time.time() < deadline, "the worker did not pick up the adaptive settings"
        time.sleep(0.2)
    assert client.get("/plans/").json()["tasks"]["vqa"]["adaptive"]["ladder"] == ["full", "skip1", "skip2"]
    plans = [post_vqa(client, image, "what color").json()["plan"] for _ in range(4)]
    assert [(p["name"], p["chosen_by"]) for p in plans] == [
        ("full", "active"), ("skip1", "load"), ("skip2", "load"), ("skip2", "load")]
    assert plans[2]["flops_ratio"] < plans[1]["flops_ratio"] < plans[0]["flops_ratio"]
    # a request that names its plan or budget is never shifted
    assert post_vqa(client, image, "x", plan="full").json()["plan"]["name"] == "full"
    assert post_vqa(client, image, "x", max_flops_ratio="1").json()["plan"]["name"] == "skip1"
    shifts = _shift_counts(client)
    assert shifts[("down", "full", "skip1")] == 1 and shifts[("down", "skip1", "skip2")] == 1
    served = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}["das_served_plan"]
    assert {s.labels["plan"]: s.value for s in served.samples if s.labels["task"] == "vqa"}["skip2"] == 1

    # a bad section is refused with a clear message and the last good settings stay
    state["adaptive"] = {"vqa": {"slo_p95": 100}}
    _write_state(store, state)
    deadline = time.time() + 10
    while "store.json/adaptive" not in (errors := client.get("/plans/").json()["load_errors"]):
        assert time.time() < deadline
        time.sleep(0.2)
    assert "unknown setting(s) slo_p95" in errors["store.json/adaptive"]
    assert post_vqa(client, image, "what color").json()["plan"]["name"] == "skip2"

    # removing the section turns it off: the active plan serves again
    del state["adaptive"]
    _write_state(store, state)
    deadline = time.time() + 10
    while "adaptive" in client.get("/plans/").json()["tasks"]["vqa"]:
        assert time.time() < deadline
        time.sleep(0.2)
    assert post_vqa(client, image, "what color").json()["plan"] == {**plans[0], "chosen_by": "active"}
