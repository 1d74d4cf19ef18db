"""The API's contract against a real `bentoml serve` (1 worker): one error shape for every error
(BentoML's own included, each logged as one WARNING line), typed response bodies and error statuses
in /docs.json, GET /plans without a redirect, bentoml.SyncHTTPClient listing plans, and schemathesis
finding nothing on the non-admin routes. The error shaper and its log filter are unit-tested first."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from models.tasks import METRIC_KEYS
from service.errors import BENTOML_ERROR_LOGGER, ClientErrorLogFilter, reshape
from service.schemas import PlanEntry, PlanMetrics, PlansOverview
from helpers import save_random_plan as _save_plan
from helpers import serve, two_plan_vqa_store

SKIP1_METRICS = {"vqa_score": 0.6, "eval_split": "val", "reference_input": {"text_len": 8, "image_size": 64},
                 "per_question_type": {f"type-{i}": i / 1000 for i in range(500)}}  # big: never listed


# -- the shaper and the log filter, in process -----------------------------------------------------
def test_reshape_gives_every_error_body_the_service_shape():
    detail = [{"type": "missing", "loc": ["image"], "msg": "Field required"}]
    bentoml_400 = json.dumps({"error": "1 validation error for Input", "detail": detail}).encode()
    assert json.loads(reshape(400, "application/json", bentoml_400)) == {
        "error": "invalid request: image: Field required", "status": 400, "detail": detail}
    as_list = json.dumps([{"error": "pickle is not allowed"}]).encode()  # BentoMLException's body
    assert json.loads(reshape(415, "application/json", as_list)) == {"error": "pickle is not allowed", "status": 415}
    assert json.loads(reshape(404, "text/plain; charset=utf-8", b"Not Found")) == {"error": "Not Found", "status": 404}
    assert json.loads(reshape(504, "application/json", b"[1, 2]")) == {"error": "Gateway Timeout", "status": 504}
    assert reshape(400, "application/json", json.dumps({"error": "x", "status": 400}).encode()) is None


def test_client_errors_from_bentoml_are_logged_as_one_warning_line():
    class Input(BaseModel):
        question: str

    try:
        Input.model_validate({})
    except ValidationError:
        record = logging.getLogger(BENTOML_ERROR_LOGGER).makeRecord(
            BENTOML_ERROR_LOGGER, logging.ERROR, __file__, 1, "Exception on %s [%s]", ("/vqa", "POST"), sys.exc_info())
    assert ClientErrorLogFilter().filter(record)
    assert (record.levelname, record.exc_info) == ("WARNING", None)
    assert record.getMessage() == "refused POST /vqa: invalid request: question: Field required"
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        bug = logging.getLogger(BENTOML_ERROR_LOGGER).makeRecord(
            BENTOML_ERROR_LOGGER, logging.ERROR, __file__, 1, "Exception on %s [%s]", ("/vqa", "POST"), sys.exc_info())
    assert ClientErrorLogFilter().filter(bug) and bug.levelname == "ERROR" and bug.exc_info is not None


def test_plan_metrics_keep_only_known_keys_of_the_right_type():
    metrics = PlanMetrics.from_plan_json({**SKIP1_METRICS, "accuracy": "high", "ir_r1": float("nan"),
                                          "eval_split": "x" * 1000, "trainable_params": 12})
    assert metrics.model_dump() == {"vqa_score": 0.6, "trainable_params": 12}


def test_plan_metrics_list_every_metric_the_producer_writes():
    # one list of metric keys (models.tasks); a metric the producer adds is listed by GET /plans too
    values = {key: 0.25 + i / 100 for i, key in enumerate(METRIC_KEYS)}
    assert PlanMetrics.from_plan_json(values).model_dump() == values


# -- against a server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    backbone_dir, store, backbone = two_plan_vqa_store(root, SKIP1_METRICS)
    _save_plan(backbone, store, "retrieval", "own", skipped=(3,), own_head=True)
    _save_plan(backbone, store, "nlvr2", "own", own_head=True, labels=("False", "True"),
               own_parts=("token_type_embeddings",))
    (store / "store.json").write_text(json.dumps({"loaded": {"vqa": ["skip1", "skip2"], "retrieval": ["own"],
                                                             "nlvr2": ["own"]}}))
    with serve(root, DAS_BACKBONE=str(backbone_dir), DAS_PLANS=str(store), DAS_WORKERS="1",
               DAS_TORCH_THREADS="1") as client:
        yield {"client": client, "log": root / f"serve-{client.base_url.port}.log"}


def _assert_error(response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) <= {"error", "status", "detail"} and body["status"] == status, body
    assert isinstance(body["error"], str) and fragment in body["error"], body
    return body


def test_every_error_has_one_shape_and_bentoml_refusals_log_one_warning(server):
    client = server["client"]
    body = _assert_error(client.post("/vqa", json={}), 400, "image: Field required")  # BentoML's validation
    assert [d["loc"] for d in body["detail"]] == [["image"], ["question"]]
    _assert_error(client.post("/list_plans", content=b"{bad", headers={"content-type": "application/json"}), 400,
                  "Invalid JSON")
    _assert_error(client.post("/list_plans", content=b"x", headers={"content-type": "multipart/form-data"}), 415,
                  "application/json")  # was a 500 from BentoML's multipart parser
    _assert_error(client.post("/vqa", content=b"x", headers={"content-type": "application/vnd.bentoml+pickle"}), 415)
    _assert_error(client.get("/no-such-route"), 404, "no route")  # answered at the edge, before the metrics
    assert _assert_error(client.get("/vqa"), 405).keys() == {"error", "status"}
    _assert_error(client.post("/vqa", files={"image": ("i.png", b"not png", "image/png")}, data={"question": "x"}),
                  400, "image")  # the service's own errors are unchanged
    log = server["log"].read_text()
    assert "refused POST /vqa: invalid request: image: Field required" in log
    assert "[WARNING]" in log and "[ERROR]" not in log and "Traceback" not in log, log[-3000:]


def test_get_plans_answers_directly_with_only_documented_fields(server):
    client = server["client"]
    direct = client.get("/plans")  # httpx does not follow redirects: a 307 would show
    assert direct.status_code == 200, direct.text
    body = direct.json()
    assert body == client.get("/plans/").json() and body["store_error"] is None
    PlansOverview.model_validate(body)
    skip1 = next(p for p in body["tasks"]["vqa"]["plans"] if p["name"] == "skip1")
    assert skip1["metrics"] == {"vqa_score": 0.6, "eval_split": "val"}  # not the whole plan.json metrics
    assert skip1["reference_input"] == {"text_len": 8, "image_size": 64} and skip1["score"] == 0.6
    for task in body["tasks"].values():
        assert "adaptive" not in task  # left out, not null, while adaptive mode is off
        for plan in task["plans"]:
            assert set(plan) == set(PlanEntry.model_fields)


def test_sync_http_client_lists_plans(server):
    import bentoml

    url = str(server["client"].base_url)
    with bentoml.SyncHTTPClient(url) as client:
        assert client.list_plans() == server["client"].get("/plans").json()


def test_openapi_documents_what_each_endpoint_returns(server):
    docs = server["client"].get("/docs.json").json()
    assert docs["info"]["title"] == "DAS Serve"
    assert "DAS plan" in docs["info"]["description"] and "BentoML" not in docs["info"]["description"]
    schemas, paths = docs["components"]["schemas"], docs["paths"]
    referenced = set(re.findall(r"#/components/schemas/(\w+)", json.dumps(docs)))
    assert referenced <= set(schemas), referenced - set(schemas)
    inference = {"400", "404", "413", "415", "422", "429", "500", "503"}
    expected = {"/vqa": ("VQAResponse", inference), "/nlvr2": ("NLVR2Response", inference),
                "/retrieval/texts": ("TextRankingResponse", inference),
                "/retrieval/images": ("ImageRankingResponse", inference),
                "/list_plans": ("PlansOverview", {"400", "415", "429", "500"})}
    for route in ("load", "activate", "rollback", "unload"):
        expected[f"/admin/plans/{route}"] = ("AdminResponse", {"400", "401", "403", "404", "409", "415", "422", "429", "500"})
    operations = {route: paths[route]["post"] for route in expected}
    operations.update({route: paths[route]["get"] for route in ("/plans", "/plans/")})
    expected.update({route: ("PlansOverview", {"429", "500"}) for route in ("/plans", "/plans/")})
    for route, (model, errors) in expected.items():
        responses = operations[route]["responses"]
        assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert set(responses) - {"200"} >= errors, (route, set(responses))
        if route == "/admin/plans/load":
            assert "413" in responses
        for status, response in responses.items():
            if status != "200":
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert schemas["ErrorBody"]["required"] == ["error", "status"]
    assert schemas["PlansOverview"]["properties"]["store_error"]["nullable"] is True
    assert "additionalProp1" not in json.dumps(docs)


def test_schemathesis_finds_nothing_on_the_non_admin_routes(server, tmp_path):
    pytest.importorskip("schemathesis")
    cli = Path(sys.executable).parent / "schemathesis"
    url = f"{server['client'].base_url}/docs.json"
    result = subprocess.run(
        [str(cli), "run", url, "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance",
         "--exclude-path-regex", "^/admin", "--max-examples", "25", "--seed", "1", "--workers", "1",
         "--request-timeout", "60"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    tested = re.search(r"Tested:\s+(\d+)", output)
    assert tested and int(tested.group(1)) >= 7, output[-3000:]  # the 4 tasks, list_plans, GET /plans and /plans/
