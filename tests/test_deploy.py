"""The packaging and deployment files (bentofile.yaml, deploy/, docs/deploy.md) parse and agree with
the service and with each other; one test runs a real `bentoml build` (offline, no lock step)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from bentoml._internal.bento.build_config import BentoPathSpec
from prometheus_client import CollectorRegistry

from service.metrics import ServiceMetrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_MONITORING = DEPLOY / "k8s-monitoring"
GRAFANA = DEPLOY / "grafana"
DOCS = REPO / "docs" / "deploy.md"
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
IMAGE_SRC = "/home/bentoml/bento/src"  # where `bentoml containerize` puts the Bento's files
PYTORCH_INDEX = "https://download.pytorch.org/whl/"


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> dict[str, dict]:
    """Every Kubernetes object under deploy/k8s, by kind (the example has one of each)."""
    objects = {}
    for path in sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")]):
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
    rule = load_all(K8S_MONITORING / "prometheus-adapter-values.yaml")[0]["rules"]["custom"][0]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    series = re.match(r"[\w:]+", rule["seriesQuery"]).group()
    registry = CollectorRegistry()
    ServiceMetrics(registry=registry)
    counters = {f"{family.name}_total" for family in registry.collect() if family.type == "counter"}
    assert series in counters, (series, counters)
    # the scrape job gives the pod and namespace labels the adapter maps onto pods
    scrape = load_all(K8S_MONITORING / "prometheus-scrape.yml")[0]["scrape_configs"][0]
    assert scrape["job_name"] == "das-serve"
    assert {r.get("target_label") for r in scrape["relabel_configs"]} >= set(rule["resources"]["overrides"])


# ---------------------------------------------------------------------------------------------
# Kubernetes: deploy/k8s is what `kubectl apply -f deploy/k8s/` takes as a whole
# ---------------------------------------------------------------------------------------------
def test_k8s_dir_holds_only_kubernetes_objects(tmp_path):
    files = sorted(p for p in K8S.iterdir())
    assert files and all(p.suffix in {".yaml", ".yml", ".json"} for p in files), files
    for path in files:
        for doc in load_all(path):
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"]["name"], path
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: checked by parsing only")
    # No cluster here: kubectl decodes every file, then fails on discovery (a closed loopback port).
    # A file that is not a Kubernetes object fails earlier, with "unable to decode".
    done = subprocess.run(
        [kubectl, "apply", "--dry-run=client", "--validate=false", "-f", str(K8S),
         "--server=http://127.0.0.1:9", f"--cache-dir={tmp_path}", "--request-timeout=5s"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "KUBECONFIG": str(tmp_path / "none")},
    )
    assert "unable to decode" not in done.stderr and "is missing" not in done.stderr, done.stderr
    for path in files:
        assert path.name in done.stdout + done.stderr, (path, done.stderr)


def cpu_cores(quantity: str | int) -> float:
    quantity = str(quantity)
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_deployment_torch_threads_times_workers_fill_the_cpu_request():
    container = next(c for c in k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
                     if c["name"] == "das-serve")
    env = {e["name"]: e.get("value") for e in container["env"]}
    workers, threads = int(env["DAS_WORKERS"]), int(env["DAS_TORCH_THREADS"])
    assert workers >= 1 and threads >= 1
    assert workers * threads == cpu_cores(container["resources"]["requests"]["cpu"]), (workers, threads)


# ---------------------------------------------------------------------------------------------
# docker compose: healthchecks, and a plan store on a named volume that a restart keeps
# ---------------------------------------------------------------------------------------------
def compose() -> dict:
    return load_all(DEPLOY / "docker-compose.yml")[0]


def test_compose_healthchecks_and_plan_store_volume():
    config = compose()
    services = config["services"]
    probes = {"das-serve": "http://127.0.0.1:3000/readyz", "prometheus": "http://127.0.0.1:9090/-/ready",
              "grafana": "http://127.0.0.1:3000/api/health"}
    for name, url in probes.items():
        check = services[name]["healthcheck"]
        assert check["test"][0] in {"CMD", "CMD-SHELL"} and url in " ".join(check["test"]), name
        assert check["interval"] and check["retries"] >= 1, name
    # the backbone loads before /readyz answers
    assert services["das-serve"]["healthcheck"]["start_period"]
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"

    serve = services["das-serve"]
    env = serve["environment"]
    assert set(env) <= env_names_the_service_reads()
    assert env["DAS_BACKBONE"] == f"{IMAGE_SRC}/plans/backbone"
    named = {v.split(":")[0]: v.split(":")[1] for v in serve["volumes"] if not v.startswith(".")}
    store_volume = next(name for name, target in named.items() if target == env["DAS_PLANS"])
    assert store_volume in config["volumes"]
    seed = services["seed-plan-store"]
    assert f"{store_volume}:{env['DAS_PLANS']}" in seed["volumes"] and seed["image"] == serve["image"]
    assert serve["depends_on"]["seed-plan-store"]["condition"] == "service_completed_successfully"

    # `config -q` validates the file against the compose schema without a Docker engine
    if shutil.which("docker-compose"):
        compose_cli = ["docker-compose"]
    elif shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        compose_cli = ["docker", "compose"]
    else:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed: checked by parsing only")
    done = subprocess.run([*compose_cli, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60, cwd=DEPLOY)
    assert done.returncode == 0, done.stderr


def seed_scripts() -> dict[str, str]:
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    k8s = next(c for c in pod["initContainers"] if c["name"] == "seed-plan-store")
    seed = compose()["services"]["seed-plan-store"]
    assert k8s["command"][:2] == seed["entrypoint"][:2] == ["sh", "-c"]
    return {"k8s": k8s["command"][2], "compose": seed["entrypoint"][2].replace("$$", "$")}


@pytest.mark.parametrize("where", ["k8s", "compose"])
def test_seed_script_copies_the_embedded_plans_once(where, tmp_path):
    """Run the seed script against this checkout's plans/ (the image's src/plans): a store on the first
    start, untouched on the next (a swap survives a restart)."""
    store = tmp_path / "store"
    store.mkdir()
    script = seed_scripts()[where].replace(f"{IMAGE_SRC}/plans", "@SRC@")
    script = re.sub(r"(?<![\w.])/plans\b", str(store), script).replace("@SRC@", str(REPO / "plans"))
    if os.geteuid() != 0:
        script = script.replace("chown -R", "true")

    def run():
        done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    run()
    seeded = json.loads((store / "store.json").read_text())
    assert seeded == json.loads((REPO / "plans" / "store.json").read_text())
    for task, names in seeded["loaded"].items():
        for name in names:
            assert (store / task / name / "plan.json").is_file(), (task, name)
    assert not (store / "backbone").exists() and not list(store.glob(".store.json*"))
    (store / "store.json").write_text('{"swapped": true}')
    run()
    assert json.loads((store / "store.json").read_text()) == {"swapped": True}


# ---------------------------------------------------------------------------------------------
# bentofile.yaml: what the Bento packs, and the torch build it installs
# ---------------------------------------------------------------------------------------------
def bentofile(path: Path = REPO / "bentofile.yaml") -> dict:
    return yaml.safe_load(path.read_text())


def bento_files(ctx: Path, config: dict | None = None) -> set[str]:
    """The files `bentoml build` copies into the Bento's src/: BentoML's own matcher, walked as it walks."""
    config = config or bentofile()
    spec = BentoPathSpec(config["include"], config["exclude"], str(ctx))
    packed = set()
    for root, dirs, files in os.walk(ctx):
        dirs[:] = [d for d in dirs if d not in {".git", ".venv", "venv", "__pycache__"}]  # BentoML skips them too
        for name in files:
            path = os.path.join(os.path.relpath(root, ctx), name).replace(os.sep, "/")
            if spec.includes(path):
                packed.add(path.removeprefix("./"))
    return packed


def test_bentofile_packs_the_serving_code_and_the_embedded_default():
    packed = bento_files(REPO)
    for needed in ("service/service.py", "service/registry.py", "models/__init__.py", "models/das/plan.py",
                   "models/backbones/base.py", "plans/store.json", "plans/backbone/config.json", "plans/backbone/model.safetensors",
                   "plans/meter/store.json", "plans/meter/backbone/config.json"):
        assert needed in packed, needed
    for store in ("plans", "plans/meter"):
        for task, names in json.loads((REPO / store / "store.json").read_text())["loaded"].items():
            for name in names:
                assert f"{store}/{task}/{name}/plan.json" in packed, (store, task, name)
    unwanted = [p for p in packed if not re.match(r"(service|models)/.*\.py$|plans/", p)
                or re.search(r"\.(md|png)$|pipeline-report\.json$|__pycache__", p)
                or re.match(r"models/(producer|bench|cli)/", p)]
    assert not unwanted, unwanted
    # the Bento's README is a short paragraph, not the repository's README
    description = bentofile()["description"]
    assert not description.startswith("file:") and len(description) < 600


def test_bentofile_leaves_out_the_producer_bench_and_cli_of_the_restructured_models(tmp_path):
    layout = ["models/__init__.py", "models/das/plan.py", "models/backbones/base.py", "models/runtime.py",
              "models/producer/__init__.py", "models/producer/train.py", "models/producer/search/grid.py",
              "models/bench/__init__.py", "models/bench/runtime.py", "models/cli/__init__.py",
              "models/cli/main.py", "models/README.md", "service/__init__.py", "service/service.py",
              "service/sub/helpers.py", "service/__pycache__/service.cpython-311.pyc", "tests/test_x.py",
              "plans/store.json", "plans/backbone/config.json", "plans/vqa/skip4/plan.json", "plans/pareto.png"]
    for path in layout:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    assert bento_files(tmp_path) == {
        "models/__init__.py", "models/das/plan.py", "models/backbones/base.py", "models/runtime.py",
        "service/__init__.py", "service/service.py", "service/sub/helpers.py",
        "plans/store.json", "plans/backbone/config.json", "plans/vqa/skip4/plan.json"}


def test_bentofile_pins_the_cpu_torch_build_and_no_producer_packages():
    python = bentofile()["python"]
    torch_lines = [p for p in python["packages"] if re.match(r"torch\b", p)]
    assert torch_lines == [f"torch=={makefile_torch_version()}+cpu"], torch_lines
    assert python["extra_index_url"] == [PYTORCH_INDEX + "cpu"]
    names = {re.match(r"[\w.-]+", p).group().lower() for p in python["packages"]}
    assert not names & {"tqdm", "matplotlib", "bentoml"}, names


def makefile_torch_version() -> str:
    return re.search(r"^TORCH_SPEC \?= torch==([\w.]+)", (REPO / "Makefile").read_text(), re.M).group(1)


def load_bentofile_tool():
    spec = importlib.util.spec_from_file_location("bentofile_tool", DEPLOY / "bento" / "bentofile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_bento_pins_the_torch_build_it_is_given():
    tool = load_bentofile_tool()
    assert tool.torch_pin("2.13.0+cpu") == ("torch==2.13.0+cpu", PYTORCH_INDEX + "cpu")
    assert tool.torch_pin("2.13.0+cu130") == ("torch==2.13.0+cu130", PYTORCH_INDEX + "cu130")
    assert tool.torch_pin("2.13.0") == ("torch==2.13.0", None)  # PyPI's (CUDA) build
    assert tool.torch_pin("2.13.0+cu130", "https://mirror.example/simple")[1] == "https://mirror.example/simple"
    with pytest.raises(ValueError):
        tool.torch_pin("")
    cuda = tool.pinned_bentofile("2.13.0+cu130", lock=False)["python"]
    assert cuda["packages"][0] == "torch==2.13.0+cu130" and sum(p.startswith("torch") for p in cuda["packages"]) == 1
    assert cuda["extra_index_url"] == [PYTORCH_INDEX + "cu130"] and cuda["lock_packages"] is False
    assert cuda["packages"][1:] == [p for p in bentofile()["python"]["packages"] if not p.startswith("torch")]
    pypi = tool.pinned_bentofile("2.13.0")["python"]
    assert "extra_index_url" not in pypi and "lock_packages" not in pypi
    if shutil.which("make"):
        out = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "bento",
                              "TORCH_BUILD=2.13.0+cu130", "BENTO_LOCK=0"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert '--torch "2.13.0+cu130"' in out.stdout and "--no-lock" in out.stdout
        assert "bentoml build -f build/bentofile.yaml ." in out.stdout


def test_bentoml_build_packs_the_serving_files_and_pins_the_venv_torch_build(tmp_path):
    """A real `bentoml build` (lock step off: it needs the indexes online) into a temporary BENTOML_HOME."""
    import torch

    bentoml_cli = Path(sys.executable).with_name("bentoml")
    generated = tmp_path / "bentofile.yaml"
    subprocess.run([sys.executable, str(DEPLOY / "bento" / "bentofile.py"), "--torch", torch.__version__,
                    "--no-lock", "--out", str(generated)], check=True, capture_output=True, timeout=60)
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(bentoml_cli), "build", "-f", str(generated), "-o", "tag", str(REPO)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (bento,) = [p for p in (tmp_path / "home" / "bentos" / "das-serve").iterdir() if p.name != "latest"]

    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert [r for r in requirements if re.match(r"torch\b", r)] == [f"torch=={torch.__version__}"]
    local = torch.__version__.partition("+")[2]
    if local:
        assert f"--extra-index-url {PYTORCH_INDEX}{local}" in requirements
    assert not [r for r in requirements if re.match(r"(tqdm|matplotlib)\b", r)]

    src = bento / "src"
    packed = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert packed == bento_files(REPO) | {"bentofile.yaml"}  # bento_files() = what BentoML does
    assert (bento / "README.md").read_text().strip() == bentofile()["description"].strip()

    # the packed code imports on its own, without matplotlib (models/, service/ resolve inside src/)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); sys.modules['matplotlib'] = None; "
             "import service.service, models.backbones.base, models.backbones.vilt.modeling, models.runtime, service.metrics; "
             "ours = [m.__file__ for n, m in list(sys.modules.items()) if n.split('.')[0] in ('models', 'service') "
             "and getattr(m, '__file__', None)]; "
             "outside = [f for f in ours if not f.startswith(sys.argv[1])]; assert not outside, outside")
    done = subprocess.run([sys.executable, "-I", "-c", probe, str(src)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# docs/deploy.md
# ---------------------------------------------------------------------------------------------
def test_deploy_doc_links_resolve_inside_the_repo():
    text = DOCS.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"https?://", link):
            continue
        target = link.split("#")[0]
        assert target and not target.startswith("/"), link
        resolved = (DOCS.parent / target).resolve()
        assert resolved.is_relative_to(REPO) and resolved.exists(), link
    for topic in ("make bento", "bentoml containerize", "kubectl apply -f deploy/k8s/", "BENTOML_HOME",
                  "docker compose", "prometheus-adapter-values.yaml", "DAS_TORCH_THREADS"):
        assert topic in text, topic
