"""The deployment files in deploy/ parse and agree with the service and with each other (no server)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.metrics import ServiceMetrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
GRAFANA = DEPLOY / "grafana"
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> dict[str, dict]:
    """Every Kubernetes object under deploy/k8s, by kind (the example has one of each)."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_all(path):
            if "kind" in doc:
                assert doc["kind"] not in objects, f"two {doc['kind']} objects"
                objects[doc["kind"]] = doc
    return objects


def env_names_the_service_reads() -> set[str]:
    """DAS_* variable names that appear as string literals in the service package's source."""
    names = set()
    for source in (REPO / "service").glob("*.py"):
        names |= set(re.findall(r"""["'](DAS_[A-Z0-9_]+)["']""", source.read_text()))
    return names


def test_every_yaml_file_parses():
    assert len(YAML_FILES) >= 8, YAML_FILES
    for path in YAML_FILES:
        assert load_all(path), f"{path} is empty"


def test_prometheus_config():
    config = load_all(DEPLOY / "prometheus.yml")[0]
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "das-serve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["das-serve:3000"]  # the compose service
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed here (make test installs Debian's prometheus package when it can)")
    result = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_compose_and_dashboard():
    compose = load_all(DEPLOY / "docker-compose.yml")[0]["services"]
    mounts = {}
    for service in compose.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"compose mounts missing {source}"
                mounts[(DEPLOY / source).resolve()] = target
    assert mounts[(DEPLOY / "prometheus.yml").resolve()] == "/etc/prometheus/prometheus.yml"
    provisioning = mounts[(GRAFANA / "provisioning").resolve()]
    assert provisioning == "/etc/grafana/provisioning"
    provider = load_all(GRAFANA / "provisioning" / "dashboards" / "das-serve.yml")[0]["providers"][0]
    assert provider["options"]["path"] == mounts[(GRAFANA / "dashboards").resolve()]

    datasource = load_all(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[0]["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads((GRAFANA / "dashboards" / "das-serve.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == datasource["uid"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"], panel["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("request rate", "latency", "flops saved", "batch", "active plan", "plan swaps", "plan shifts", "errors"):
        assert topic in titles, topic


def test_k8s_manifests_agree_with_the_service():
    objects = k8s_objects()
    assert set(objects) == {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler"}
    deployment, pvc = objects["Deployment"], objects["PersistentVolumeClaim"]
    pod = deployment["spec"]["template"]
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "das-serve")
    env = {e["name"]: e.get("value") for e in container["env"]}
    unknown = set(env) - env_names_the_service_reads()
    assert not unknown, f"the Deployment sets variables the service never reads: {unknown}"

    # the plan store: a ReadWriteMany claim, mounted where DAS_PLANS points, in the server and the seeding init container
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    volume = next(v for v in pod["spec"]["volumes"] if v.get("persistentVolumeClaim"))
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    for c in [container, *pod["spec"].get("initContainers", [])]:
        mount = next(m for m in c["volumeMounts"] if m["name"] == volume["name"])
        assert mount["mountPath"] == env["DAS_PLANS"], c["name"]

    # probes: BentoML's health routes, on the container's named port (test_scale_out calls them on a live replica)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    assert ports["http"] == 3000 and container["resources"]["requests"]["memory"]

    service = objects["Service"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_hpa_scales_on_a_metric_the_adapter_derives_from_a_service_counter():
    hpa = k8s_objects()["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "das-serve"}
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods"
    rule = load_all(K8S / "prometheus-adapter-values.yaml")[0]["rules"]["custom"][0]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    series = re.match(r"[\w:]+", rule["seriesQuery"]).group()
    registry = CollectorRegistry()
    ServiceMetrics(registry=registry)
    counters = {f"{family.name}_total" for family in registry.collect() if family.type == "counter"}
    assert series in counters, (series, counters)
    # the scrape job gives the pod and namespace labels the adapter maps onto pods
    scrape = load_all(K8S / "prometheus-scrape.yml")[0]["scrape_configs"][0]
    assert scrape["job_name"] == "das-serve"
    assert {r.get("target_label") for r in scrape["relabel_configs"]} >= set(rule["resources"]["overrides"])
