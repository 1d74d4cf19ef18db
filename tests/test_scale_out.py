"""Scale-out, locally: two separate `bentoml serve` processes (two "replicas") share one plan store
directory, as pods share the ReadWriteMany volume of deploy/k8s. A swap sent to one reaches both."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time

import pytest
import yaml

from helpers import AUTH, REPO, png, random_image, serve, two_plan_vqa_store

CONVERGE_S = 10  # generous bound on a shared CI machine; each worker re-reads the store every 0.5 s


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-out")
    backbone_dir, store, _ = two_plan_vqa_store(root)
    (store / "store.json").write_text(json.dumps({"loaded": {"vqa": ["skip1", "skip2"]}}))
    settings = dict(DAS_BACKBONE=str(backbone_dir), DAS_PLANS=str(store), DAS_WORKERS="1")
    managers = [serve(root, **settings) for _ in range(2)]
    with contextlib.ExitStack() as stack:
        with concurrent.futures.ThreadPoolExecutor(len(managers)) as pool:  # both start at once
            started = [pool.submit(manager.__enter__) for manager in managers]
        clients, failures = [], []
        for manager, future in zip(managers, started):
            try:
                clients.append(future.result())
                stack.push(manager.__exit__)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other one is stopped
                failures.append(exc)
        if failures:
            raise failures[0]
        yield clients


def active_versions(client) -> tuple[str, int]:
    vqa = client.get("/plans/").json()["tasks"]["vqa"]
    active = next(p for p in vqa["plans"] if p["name"] == vqa["active"])
    return active["name"], active["version"]


def wait_for_active(clients, expected: tuple[str, int]) -> float:
    """Seconds until every replica reports ``expected`` as vqa's active (name, version)."""
    started = time.time()
    while True:
        seen = [active_versions(c) for c in clients]
        if all(s == expected for s in seen):
            return time.time() - started
        assert time.time() - started < CONVERGE_S, f"replicas did not converge to {expected}: {seen}"
        time.sleep(0.1)


def ask(client) -> dict:
    response = client.post("/vqa", files={"image": ("i.png", png(random_image(64, 64)), "image/png")},
                           data={"question": "what color"})
    assert response.status_code == 200, response.text
    return response.json()["plan"]


def test_a_swap_on_one_replica_reaches_the_other(replicas):
    first, second = replicas
    assert first.base_url != second.base_url
    assert active_versions(first) == active_versions(second) == ("full", 0)

    response = first.post("/admin/plans/activate", json={"task": "vqa", "name": "skip2"}, headers=AUTH)
    assert response.status_code == 200, response.text
    wait_for_active(replicas, ("skip2", 1))
    plan = ask(second)  # a replica that never saw the admin call serves the new plan
    assert (plan["name"], plan["version"], plan["skipped_layers"]) == ("skip2", 1, [1, 2])

    response = second.post("/admin/plans/rollback", json={"task": "vqa"}, headers=AUTH)  # and the other way
    assert response.status_code == 200 and response.json()["active"] == "full", response.text
    wait_for_active(replicas, ("full", 0))
    assert ask(first)["name"] == "full"


def test_k8s_probe_paths_answer_on_a_replica(replicas):
    """The probe paths of deploy/k8s/deployment.yaml are routes a real replica serves."""
    deployment = next(doc for doc in yaml.safe_load_all((REPO / "deploy" / "k8s" / "deployment.yaml").read_text())
                      if doc and doc.get("kind") == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    paths = {container[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert paths == {"/readyz", "/livez"}
    for path in paths:
        assert replicas[0].get(path).status_code == 200, path
    assert replicas[0].get("/no-such-probe").status_code == 404  # so a 200 above means the route exists
