"""The plan store never loses state: a store.json that cannot be read, is malformed or inconsistent
leaves every worker serving its last good state (and says so), is never overwritten by an admin
write; a store that cannot be written answers 503; rollback and unload racing each other across
workers always leave a consistent store.json; the rollback history is bounded."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import tarfile
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    AUTH,
    random_image,
    serve,
    served,
    store_json,
    two_plan_vqa_store,
    write_plan,
)
from helpers import png as _png
from prometheus_client.parser import text_string_to_metric_families

from models.das.plan import FULL_PLAN_NAME
from service.errors import RegistryError
from service.registry import PlanRegistry
from service.store import HISTORY_LIMIT, LOCK_FILE, STATE_FILE, PlanStore, StoreStateError


@pytest.fixture
def store_root(tmp_path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    return root


@pytest.fixture
def reg(backbone, store_root) -> PlanRegistry:  # noqa: F811
    """vqa plans a, b, c loaded; a active after b (history: full, b)."""
    registry = PlanRegistry(backbone, PlanStore(store_root))
    for name, layer in (("a", 1), ("b", 2), ("c", 3)):
        write_plan(store_root, backbone, name, skipped=(layer,))
        registry.load(f"vqa/{name}")
    registry.activate("vqa", "b")
    registry.activate("vqa", "a")
    registry.drain_store_errors()
    return registry


GOOD = {"vqa": ("a", {"full": 0, "a": 1, "b": 1, "c": 1})}

BAD_STATES = [  # (store.json bytes, a fragment of the reason)
    (b'{"loaded": {"vqa": ["a", "b"]}, "active": {"vqa": "a"', "not valid JSON"),  # a hand-edit typo
    (b"", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[]", "top level must be a JSON object, got an array"),
    (b'{"active": []}', "'active' must be an object"),
    (b'{"loaded": {"vqa": "a"}}', "'loaded.vqa' must be an array of plan names, got a string"),
    (b'{"loaded": {"vqa": ["a", 3]}}', "3 is not a valid plan name"),
    (b'{"loaded": {"vqa": ["../x"]}}', "'../x' is not a valid plan name"),
    (b'{"loaded": {"vga": ["a"]}}', "'loaded.vga': unknown task"),
    (b'{"loaded": {"vqa": ["full"]}}', "the built-in plan"),
    (b'{"loaded": {"vqa": ["a"]}, "active": {"vqa": "ghost"}}', "'active.vqa' is 'ghost', which is not in 'loaded.vqa'"),
    (b'{"loaded": {"vqa": ["a"]}, "active": {"vqa": 1}}', "1 is not a valid plan name"),
    (b'{"loaded": {}, "history": {"vqa": [null]}}', "None is not a valid plan name"),
    (b'{"loded": {"vqa": ["a"]}}', "unknown section(s) 'loded'"),
]


def write_store(root: Path, data: bytes) -> None:
    (root / STATE_FILE).write_bytes(data)


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def archive_of(plan_dir: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in ("plan.json", "weights.safetensors"):
            data = (plan_dir / name).read_bytes()
            info = tarfile.TarInfo(f"{plan_dir.name}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------------------------------
# reading: the last good state serves, and the problem is reported once
# ---------------------------------------------------------------------------------------------
def test_a_typo_in_store_json_keeps_every_plan_and_is_reported_once(reg, store_root, caplog):
    good = (store_root / STATE_FILE).read_bytes()
    plan_a = reg.get("vqa")
    write_store(store_root, good.replace(b'"active"', b'"active', 1))
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        assert reg.sync() is False
        for _ in range(5):  # the periodic sync: nothing new to read, nothing new to say
            reg.sync()
        reg.sync(force=True)

    assert served(reg) == GOOD and reg.get("vqa") is plan_a
    assert reg.store_error == {"file": str(store_root.resolve() / STATE_FILE), "reason": reg.store_error["reason"]}
    assert "not valid JSON" in reg.store_error["reason"]
    assert reg.errors == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "store.json" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert reg.drain_store_errors()["read"] >= 1 and reg.drain_store_errors() == {}

    (store_root / STATE_FILE).write_bytes(good)  # fixed by hand
    os.utime(store_root / STATE_FILE)
    assert reg.sync(force=True) is True
    assert reg.store_error is None and served(reg) == GOOD


@pytest.mark.parametrize("content, reason", BAD_STATES, ids=[r for _, r in BAD_STATES])
def test_a_malformed_store_json_is_a_store_state_error_and_the_last_good_state_serves(reg, store_root, content, reason):
    write_store(store_root, content)
    with pytest.raises(StoreStateError) as info:
        reg.store.read_state()
    assert info.value.file == str(store_root.resolve() / STATE_FILE) and reason in info.value.reason
    assert info.value.status == 409

    reg.sync()
    assert served(reg) == GOOD
    assert reg.store_error == {"file": info.value.file, "reason": info.value.reason}


def test_an_unreadable_store_json_is_an_os_error_503(reg, store_root):
    (store_root / STATE_FILE).unlink()
    (store_root / STATE_FILE).mkdir()  # a directory: read_bytes raises IsADirectoryError
    with pytest.raises(StoreStateError) as info:
        reg.store.read_state()
    assert info.value.status == 503 and "Is a directory" in info.value.reason
    reg.sync()
    assert served(reg) == GOOD and "Is a directory" in reg.store_error["reason"]
    with pytest.raises(RegistryError) as info:
        reg.activate("vqa", "b")
    assert info.value.status == 503 and (store_root / STATE_FILE).is_dir()


def test_a_fresh_worker_on_a_malformed_store_serves_the_builtin_plans_and_says_why(backbone, store_root):  # noqa: F811
    write_store(store_root, b'{"active": []}')
    fresh = PlanRegistry(backbone, PlanStore(store_root))
    fresh.sync()
    assert served(fresh) == {"vqa": ("full", {"full": 0})}
    assert "'active' must be an object" in fresh.store_error["reason"]


# ---------------------------------------------------------------------------------------------
# writing: refused rather than overwriting a bad file or writing a bad state
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [BAD_STATES[0][0], b'{"active": []}', b'{"loaded": {"vqa": ["a"]}, "active": {"vqa": "b"}}'],
                         ids=["typo", "wrong-type", "active-not-loaded"])
def test_admin_writes_are_refused_while_store_json_is_malformed_and_the_file_is_kept(reg, backbone, store_root, tmp_path,  # noqa: F811
                                                                                   content):
    write_plan(store_root, backbone, "d", skipped=(0,))
    upload = tmp_path / "src" / "e"
    write_plan(store_root, backbone, "e", skipped=(0, 1), at=upload)
    write_store(store_root, content)
    operations = {
        "load": lambda: reg.load("vqa/d"),
        "load_archive": lambda: reg.load_archive(archive_of(upload, tmp_path / "e.tar.gz")),
        "activate": lambda: reg.activate("vqa", "b"),
        "rollback": lambda: reg.rollback("vqa"),
        "unload": lambda: reg.unload("vqa", "c"),
    }
    for operation, call in operations.items():
        with pytest.raises(RegistryError) as info:
            call()
        message = str(info.value)
        assert info.value.status == 409, (operation, message)
        assert str(store_root.resolve() / STATE_FILE) in message and "fix this file" in message, (operation, message)
        assert (store_root / STATE_FILE).read_bytes() == content, operation
    assert not (store_root / "vqa" / "e").exists()  # the upload did not land in the store either
    assert served(reg) == GOOD and no_temp_files(store_root)
    assert reg.drain_store_errors()["read"] >= len(operations)


def test_a_state_that_breaks_the_rules_is_never_written(reg, store_root):
    before = (store_root / STATE_FILE).read_bytes()
    for change in (lambda s: s.active.__setitem__("vqa", "ghost"), lambda s: s.loaded["vqa"].append("../x"),
                   lambda s: s.loaded.__setitem__("vga", ["a"]), lambda s: setattr(s, "history", [])):
        with pytest.raises(StoreStateError) as info:
            with reg.store.locked_state() as state:
                change(state)
        assert info.value.status == 409 and "refusing to write" in str(info.value)
        assert (store_root / STATE_FILE).read_bytes() == before
    assert no_temp_files(store_root)


def test_an_unwritable_store_answers_503_with_the_os_reason(reg, store_root, monkeypatch):
    before = (store_root / STATE_FILE).read_bytes()
    real_replace = os.replace

    def read_only_replace(src, dst, *args, **kwargs):
        if Path(dst).name == STATE_FILE:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", read_only_replace)
    for call in (lambda: reg.activate("vqa", "b"), lambda: reg.rollback("vqa"), lambda: reg.unload("vqa", "c")):
        with pytest.raises(RegistryError) as info:
            call()
        assert info.value.status == 503 and os.strerror(errno.EROFS) in str(info.value), str(info.value)
    assert (store_root / STATE_FILE).read_bytes() == before and no_temp_files(store_root)
    assert served(reg) == GOOD
    assert reg.drain_store_errors() == {"write": 3}
    monkeypatch.undo()

    # a real OS error: the lock file's path is a directory
    (store_root / LOCK_FILE).unlink()
    (store_root / LOCK_FILE).mkdir()
    with pytest.raises(RegistryError) as info:
        reg.activate("vqa", "b")
    assert info.value.status == 503 and "Is a directory" in str(info.value) and LOCK_FILE in str(info.value)
    assert (store_root / STATE_FILE).read_bytes() == before and served(reg) == GOOD


def test_the_temp_file_is_fsynced_before_the_rename(reg, store_root, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", Path(dst).name)),
                                                         real_replace(src, dst))[1])
    reg.activate("vqa", "b")
    assert events == [("fsync", False), ("replace", STATE_FILE), ("fsync", True)]  # file, rename, directory


# ---------------------------------------------------------------------------------------------
# history
# ---------------------------------------------------------------------------------------------
def test_the_rollback_history_is_capped(reg, store_root):
    assert HISTORY_LIMIT == 32
    for i in range(2 * HISTORY_LIMIT + 5):  # b, c, b, ..., b
        reg.activate("vqa", ("b", "c")[i % 2])
    history = store_json(store_root)["history"]["vqa"]
    assert len(history) == HISTORY_LIMIT
    assert history[-2:] == ["b", "c"] and reg.active_name("vqa") == "b"  # the newest are kept
    assert reg.rollback("vqa").name == "c"

    # a long history written by hand is cut on the next write
    state = store_json(store_root)
    state["history"]["vqa"] = ["a", "b"] * 50
    write_store(store_root, json.dumps(state).encode())
    reg.activate("vqa", "a")
    assert len(store_json(store_root)["history"]["vqa"]) == HISTORY_LIMIT


# ---------------------------------------------------------------------------------------------
# rollback vs unload across workers sharing a store
# ---------------------------------------------------------------------------------------------
def consistent(state: dict) -> bool:
    """Every active plan is loaded, or is the built-in one."""
    return all(name == FULL_PLAN_NAME or name in state.get("loaded", {}).get(task, [])
               for task, name in state.get("active", {}).items())


def test_a_rollback_racing_an_unload_of_its_target_never_activates_an_unloaded_plan(reg, backbone, store_root):  # noqa: F811
    other = PlanRegistry(backbone, PlanStore(store_root))
    other.sync()
    real_locked_state = reg.store.locked_state
    raced = []

    def unload_first():  # the other worker's unload lands after this one synced, before it takes the lock
        if not raced:
            raced.append(other.unload("vqa", "b"))
        return real_locked_state()

    reg.store.locked_state = unload_first
    plan = reg.rollback("vqa")  # history: full, b; b is gone by the time the lock is held
    assert raced and plan.name == FULL_PLAN_NAME
    state = store_json(store_root)
    assert consistent(state) and state["active"]["vqa"] == FULL_PLAN_NAME and "b" not in state["loaded"]["vqa"]
    other.sync()
    assert served(other) == served(reg) == {"vqa": ("full", {"full": 0, "a": 1, "c": 1})}


@pytest.mark.parametrize("run", range(3))
def test_rollback_unload_activate_hammered_from_two_workers_keep_store_json_consistent(reg, backbone, store_root,  # noqa: F811
                                                                                     monkeypatch, run):
    workers = [reg, PlanRegistry(backbone, PlanStore(store_root))]
    written, violations = [], []
    real_replace = os.replace

    def checking_replace(src, dst, *args, **kwargs):  # called under the store lock: what was just written
        result = real_replace(src, dst, *args, **kwargs)
        if Path(dst).name == STATE_FILE:
            state = json.loads(Path(dst).read_text())
            written.append(state)
            if not consistent(state):
                violations.append(state)
        return result

    monkeypatch.setattr(os, "replace", checking_replace)
    for worker in workers:  # widen the window between a worker's sync and its taking the lock
        real = worker.store.locked_state

        def jittered(real=real, rng=random.Random(f"{run}-{id(worker)}")):
            time.sleep(rng.random() * 0.01)
            return real()

        worker.store.locked_state = jittered

    failures = []

    def hammer(seed: int) -> None:
        rng = random.Random(f"{run}-{seed}")
        for _ in range(40):
            worker, name = rng.choice(workers), rng.choice("ab")
            operation = rng.choice(["activate", "activate", "rollback", "rollback", "unload", "load", "load"])
            try:
                if operation == "activate":
                    worker.activate("vqa", rng.choice([FULL_PLAN_NAME, name]))
                elif operation == "rollback":
                    worker.rollback("vqa")
                elif operation == "unload":
                    worker.unload("vqa", name)
                else:
                    worker.load(f"vqa/{name}")
            except RegistryError as exc:
                # refused because of what another thread did: fine; refused to write what it decided: a bug
                if isinstance(exc, StoreStateError) or exc.status not in (404, 409):
                    failures.append(f"{operation}: {exc.status} {exc}")
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(f"{operation}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert len(written) > 20
    assert not violations, violations[:3]
    for worker in workers:
        worker.sync(force=True)
        assert worker.store_error is None
    assert served(workers[0]) == served(workers[1])
    assert workers[0].active_name("vqa") == store_json(store_root).get("active", {}).get("vqa", FULL_PLAN_NAME)


# ---------------------------------------------------------------------------------------------
# the service's sync loop: a failing sync is counted and logged once, not swallowed
# ---------------------------------------------------------------------------------------------
def test_the_sync_loop_counts_its_failures_and_logs_each_distinct_one_once(caplog):
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from service.metrics import ServiceMetrics
    from service.service import DASService

    failures = iter([RuntimeError("disk on fire")] * 4 + [ValueError("another problem")] * 2)

    class Ticks:  # six ticks, then stop
        left = 6

        def wait(self, _seconds):
            self.left -= 1
            return self.left < 0

    def failing_sync():
        raise next(failures)

    prom = CollectorRegistry()
    worker = SimpleNamespace(_stop=Ticks(), _sync=failing_sync, metrics=ServiceMetrics(registry=prom))
    with caplog.at_level(logging.WARNING, logger="service.service"):
        DASService.inner._sync_loop(worker)
    assert prom.get_sample_value("das_store_errors_total", {"kind": "sync"}) == 6
    assert prom.get_sample_value("das_store_errors_total", {"kind": "read"}) == 0  # exported from the start
    logged = [r.getMessage() for r in caplog.records if r.name == "service.service"]
    assert len(logged) == 2 and "disk on fire" in logged[0] and "another problem" in logged[1], logged


# ---------------------------------------------------------------------------------------------
# a real server: a typo in store.json changes nothing served, is reported, and blocks admin writes
# ---------------------------------------------------------------------------------------------
def test_a_served_store_with_a_typo_keeps_serving_and_reports_it(tmp_path):

    backbone_dir, store, _ = two_plan_vqa_store(tmp_path)
    state_file = store / STATE_FILE
    state_file.write_text(json.dumps({"loaded": {"vqa": ["skip1", "skip2"]}, "active": {"vqa": "skip1"}}))
    image = _png(random_image(64, 64))

    def wait_for(check, what: str, timeout: float = 20):
        deadline = time.time() + timeout
        while not (result := check()):
            assert time.time() < deadline, what
            time.sleep(0.2)
        return result

    def store_errors(client) -> float:
        return sum(sample.value for family in text_string_to_metric_families(client.get("/metrics").text)
                   if family.name == "das_store_errors" for sample in family.samples
                   if sample.name == "das_store_errors_total" and sample.labels.get("kind") == "read")

    with serve(tmp_path, DAS_BACKBONE=str(backbone_dir), DAS_PLANS=str(store), DAS_WORKERS="1") as client:
        def vqa_plan() -> str:
            response = client.post("/vqa", files={"image": ("i.png", image, "image/png")}, data={"question": "what"})
            assert response.status_code == 200, response.text
            return response.json()["plan"]["name"]

        assert vqa_plan() == "skip1" and client.get("/plans/").json()["store_error"] is None
        good = state_file.read_bytes()
        typo = good.replace(b'"active"', b'"active', 1)
        state_file.write_bytes(typo)  # a hand edit gone wrong
        time.sleep(1.5)  # three sync ticks

        assert vqa_plan() == "skip1"
        overview = client.get("/plans/").json()
        assert overview["tasks"]["vqa"]["active"] == "skip1"
        assert {p["name"] for p in overview["tasks"]["vqa"]["plans"]} == {"full", "skip1", "skip2"}
        assert overview["store_error"]["file"] == str(state_file.resolve())
        assert "not valid JSON" in overview["store_error"]["reason"]
        assert overview["load_errors"] == {}
        wait_for(lambda: store_errors(client) > 0, "das_store_errors_total{kind=read} stays 0")

        response = client.post("/admin/plans/activate", json={"task": "vqa", "name": "skip2"}, headers=AUTH)
        assert response.status_code == 409, response.text
        assert str(state_file.resolve()) in response.json()["error"] and "fix this file" in response.json()["error"]
        assert state_file.read_bytes() == typo
        assert vqa_plan() == "skip1"

        fixed = store / ".store.json.fixed"
        fixed.write_bytes(good)
        os.replace(fixed, state_file)
        wait_for(lambda: client.get("/plans/").json()["store_error"] is None, "store_error does not clear")
        response = client.post("/admin/plans/activate", json={"task": "vqa", "name": "skip2"}, headers=AUTH)
        assert response.status_code == 200, response.text
        wait_for(lambda: vqa_plan() == "skip2", "the activation after the fix is not served")
        log = (tmp_path / f"serve-{client.base_url.port}.log").read_text()
    assert log.count("is not used (") == 1, log[-3000:]  # one warning for the problem, not one per tick
