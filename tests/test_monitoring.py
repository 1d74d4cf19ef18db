"""Monitoring: a real Prometheus (deploy/prometheus.yml, 1 s interval) scrapes a real `bentoml serve`;
the Grafana dashboard's queries name only metrics the service exports and are valid PromQL there."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from helpers import AUTH, free_port, png, random_image, serve, two_plan_vqa_store

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "das-serve.json"
JOB = "das-serve"
# PromQL words that look like metric names but are not.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan"}


# -- the dashboard's queries ----------------------------------------------------------------------
def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            query = variable["query"]
            queries.append((f"variable ${variable['name']}", query["query"] if isinstance(query, dict) else query))
    return queries


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression (or a Grafana label_values() call) reads."""
    found = set(re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,", expr))
    expr = re.sub(r"label_values\([^)]*\)", "", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, range windows
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", expr):
        if match.group() not in PROMQL_WORDS and not re.match(r"\s*\(", expr[match.end():]):  # not a function
            found.add(match.group())
    return found


def grafana_to_promql(expr: str, window: str = "1m") -> str:
    """Replace Grafana's variables as Grafana would before sending the query to Prometheus."""
    expr = re.sub(r"\$__(?:rate_interval|interval|range)\b", window, expr)
    expr = expr.replace("$job", JOB)
    return re.sub(r"label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)", r"group by (\2) (\1)", expr)


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le, task) (rate(das_request_latency_seconds_bucket{job="$job", '
            'plan=~"skip.*"}[$__rate_interval]))) / on (task) group_left sum(das_batch_size_count offset 1e3s) > bool 1e-3')
    assert metric_names(expr) == {"das_request_latency_seconds_bucket", "das_batch_size_count"}
    assert metric_names("label_values(das_active_plan, job)") == {"das_active_plan"}


# -- a served service and a Prometheus scraping it -------------------------------------------------
PROMETHEUS = shutil.which("prometheus")
NO_PROMETHEUS = "the prometheus binary is absent and `make test` could not install it (Debian package prometheus)"


@contextlib.contextmanager
def prometheus(root: Path, target: str):
    """A real Prometheus from deploy/prometheus.yml, scraping ``target`` every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    job = next(job for job in config["scrape_configs"] if job["job_name"] == JOB)
    for static in job["static_configs"]:
        static["targets"] = [target]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(root / "prometheus.log", "w") as log:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
            deadline = time.time() + 30
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/-/ready").status_code == 200:
                        break
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError("prometheus did not start:\n" + (root / "prometheus.log").read_text()[-3000:])
                time.sleep(0.2)
            yield client
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def query(prom: httpx.Client, expr: str) -> list[dict]:
    response = prom.get("/api/v1/query", params={"query": expr})
    assert response.status_code == 200, (expr, response.text)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def scraped_samples(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples}


def wait_until(condition, timeout: float, message):
    """Poll ``condition`` until it is truthy; ``message()`` explains a timeout."""
    deadline = time.time() + timeout
    while not (result := condition()):
        if time.time() > deadline:
            raise AssertionError(message())
        time.sleep(0.25)
    return result


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring")
    backbone_dir, store, _ = two_plan_vqa_store(root)
    # Load-adaptive mode with an SLO no request meets: default requests step down from the active
    # plan (skip1) to skip2 at once, so das_plan_shifts_total and das_served_plan are exported.
    adaptive = {"vqa": {"slo_p95_ms": 0.001, "min_samples": 1, "window_s": 60}}
    (store / "store.json").write_text(json.dumps({"loaded": {"vqa": ["skip1", "skip2"]}, "adaptive": adaptive}))
    with serve(root, DAS_BACKBONE=str(backbone_dir), DAS_PLANS=str(store), DAS_WORKERS="1") as client, \
            (prometheus(root, client.base_url.netloc.decode()) if PROMETHEUS else contextlib.nullcontext()) as prom:
        image = png(random_image(64, 64))

        def vqa(**fields):
            response = client.post("/vqa", files={"image": ("i.png", image, "image/png")},
                                   data={"question": "what color", **fields})
            assert response.status_code == 200, response.text
            return response.json()

        def scraped_after(moment: float) -> bool:
            if prom is None:  # nothing to wait for; the tests that need Prometheus skip
                return True
            up = query(prom, f'timestamp(up{{job="{JOB}"}})')
            return bool(up) and float(up[0]["value"][1]) > moment

        def scrape_state() -> str:
            return f"targets: {prom.get('/api/v1/targets').json()['data']['activeTargets']}"

        # Warm-up: every series the checks read exists before a scrape, so rate() and increase()
        # over the later scrapes see the measured requests as a rise.
        vqa(plan="skip1"), vqa(plan="full")
        assert client.post("/vqa", data={"question": "no image"}).status_code == 400
        assert client.post("/admin/plans/activate", json={"task": "vqa", "name": "skip1"}, headers=AUTH).status_code == 200
        time.sleep(1)  # the worker re-reads the store (and so its adaptive ladder) every 0.5 s
        shifted = [vqa()["plan"]["name"] for _ in range(3)]
        assert shifted[-1] == "skip2", shifted
        warmed_up = time.time()
        # Prometheus applies new targets on a 5 s tick, then scrapes every second.
        wait_until(lambda: scraped_after(warmed_up), 30, lambda: "no scrape after the warm-up; " + scrape_state())

        bodies = [vqa(plan="skip1") for _ in range(3)] + [vqa(plan="full")]
        assert client.post("/vqa", data={"question": "no image"}).status_code == 400
        expected = scraped_samples(client)
        measured = time.time()
        wait_until(lambda: scraped_after(measured), 30, lambda: "no scrape after the requests; " + scrape_state())
        yield {"client": client, "prom": prom, "bodies": bodies, "expected": expected}


def test_dashboard_queries_name_only_exported_metrics(monitored):
    exported = {name for name, _ in scraped_samples(monitored["client"])}
    missing = {}
    for where, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric name found in {expr!r}"
        if names - exported:
            missing[where] = sorted(names - exported)
    assert not missing, f"dashboard queries name metrics that /metrics does not export: {missing}"


def test_prometheus_holds_the_flops_counters(monitored):
    if monitored["prom"] is None:
        pytest.skip(NO_PROMETHEUS)
    prom, expected = monitored["prom"], monitored["expected"]
    for name in ("das_flops_full_total", "das_flops_executed_total"):
        series = {(s["metric"]["task"], s["metric"]["plan"]): s for s in query(prom, f'{name}{{job="{JOB}"}}')}
        assert set(series) == {("vqa", "skip1"), ("vqa", "skip2"), ("vqa", "full")}
        for (task, plan), sample in series.items():
            assert sample["metric"]["job"] == JOB and sample["metric"]["service"] == "das-serve"
            value = float(sample["value"][1])
            assert value > 0 and value == expected[(name, (("plan", plan), ("task", task)))]
    saved = query(prom, 'das_flops_full_total - das_flops_executed_total')
    by_plan = {s["metric"]["plan"]: float(s["value"][1]) for s in saved}
    assert by_plan["skip1"] > 0 and by_plan["skip2"] > 0 and by_plan["full"] == 0


def test_dashboard_queries_run_in_prometheus(monitored):
    if monitored["prom"] is None:
        pytest.skip(NO_PROMETHEUS)
    prom, bodies = monitored["prom"], monitored["bodies"]
    results = {}
    for where, expr in dashboard_queries():
        results[where] = query(prom, grafana_to_promql(expr))  # asserts Prometheus accepts it

    def panel(title: str, ref: str = "A") -> dict[tuple, float]:
        """A panel target's result: {sorted label pairs: value}."""
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in results[f"panel {title!r} target {ref}"]}

    skip1 = (("plan", "skip1"), ("task", "vqa"))
    full = sum(b["flops"]["full"] for b in bodies[:3])
    executed = sum(b["flops"]["executed"] for b in bodies[:3])
    assert panel("FLOPs saved per second by task and plan")[skip1] > 0
    assert panel("FLOPs saved ratio by task and plan")[skip1] == pytest.approx(1 - executed / full, abs=1e-9)
    assert panel("FLOPs saved in the time range")[skip1] > 0
    assert panel("FLOPs saved ratio by task and plan")[(("plan", "full"), ("task", "vqa"))] == 0
    assert panel("Inference rate by task and plan")[skip1] > 0
    assert panel("Request rate by endpoint")[(("endpoint", "/vqa"),)] > 0
    p50 = panel("Request latency p50 / p95 / p99 (HTTP)")[()]
    assert 0 < p50 < 60 and not math.isnan(p50)
    assert panel("Mean batch size by task")[(("task", "vqa"),)] >= 1
    assert panel("Errors by status", "B")[(("endpoint", "/vqa"), ("http_response_code", "400"))] > 0
    active = {k: v for k, v in scraped_samples(monitored["client"]).items() if k[0] == "das_active_plan"}
    assert panel("Active plan per task") == {(("plan", "skip1"), ("task", "vqa"), ("version", "1")): 1}, active
    assert {r["metric"]["job"] for r in results["variable $job"]} == {JOB}
    served = panel("Served plan (load-adaptive)")
    assert served.get(skip1, 0) == 0 and served[(("plan", "skip2"), ("task", "vqa"))] == 1, served
    shifts = query(prom, f'das_plan_shifts_total{{job="{JOB}"}}')
    assert [(s["metric"]["direction"], s["metric"]["from_plan"], s["metric"]["to_plan"], s["value"][1]) for s in shifts] \
        == [("down", "skip1", "skip2", "1")]
