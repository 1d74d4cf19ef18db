"""The plan registry: what a worker serves, admin operations on the store, and convergence of
several workers / replicas that share one plan store."""

from __future__ import annotations

import gc
import json
import os
import threading
import weakref
from pathlib import Path

import pytest
import torch

import service.registry as registry_module
from models.das.plan import (
    FULL_PLAN_NAME,
    WEIGHTS_FILE,
    BackboneRef,
    PlanSpec,
    save_plan,
)
from service.errors import RegistryError
from service.registry import PlanRegistry
from service.store import STATE_FILE, PlanStore, default_store_for
from helpers import make_spec, random_image, served, store_json, write_plan


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def store_root(tmp_path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    return root


@pytest.fixture
def registry(backbone, store_root) -> PlanRegistry:
    reg = PlanRegistry(backbone, PlanStore(store_root))
    reg.sync()
    return reg


def corrupt_weights(directory: Path) -> None:
    data = bytearray((directory / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF  # a tensor byte: the file still parses, only the checksum can tell
    (directory / WEIGHTS_FILE).write_bytes(bytes(data))


def identity(reg: PlanRegistry) -> dict:
    """task -> (active, {name: id(plan)}): equal only if nothing was re-created."""
    return {task: (entry["active"], {name: id(plan) for name, plan in entry["plans"].items()})
            for task, entry in reg.snapshot().items()}


def encode(backbone, plan) -> torch.Tensor:
    batch = backbone.preprocess([random_image(64, 64, seed=5)], ["what color is the circle"])
    with torch.no_grad():
        return backbone.encode(batch, plan.modules)


# ---------------------------------------------------------------------------------------------
# what a worker serves
# ---------------------------------------------------------------------------------------------
def test_vqa_only_backbone_and_empty_store(registry):
    assert registry.tasks == ["vqa"]
    full = registry.get("vqa")
    assert full.name == FULL_PLAN_NAME and full.version == 0 and full.spec.is_builtin
    assert full.skipped_layers == ()
    assert registry.active_name("vqa") == FULL_PLAN_NAME
    assert registry.get("vqa", FULL_PLAN_NAME) is full
    assert registry.errors == {}

    with pytest.raises(RegistryError) as info:
        registry.get("nlvr2")
    assert info.value.status == 404
    message = str(info.value)
    assert "nlvr2" in message and "not served" in message and "no nlvr2 head" in message

    with pytest.raises(RegistryError) as info:
        registry.get("retrieval", FULL_PLAN_NAME)
    assert info.value.status == 404

    with pytest.raises(RegistryError) as info:
        registry.get("captioning")
    assert info.value.status == 404 and "unknown task" in str(info.value)

    with pytest.raises(RegistryError) as info:
        registry.get("vqa", "nope")
    assert info.value.status == 404 and "nope" in str(info.value) and FULL_PLAN_NAME in str(info.value)


def test_store_directory_that_does_not_exist_yet(backbone, tmp_path):
    reg = PlanRegistry(backbone, PlanStore(tmp_path / "not-yet"))
    assert reg.sync() is True
    assert reg.tasks == ["vqa"] and reg.active_name("vqa") == FULL_PLAN_NAME
    assert reg.sync() is False  # nothing changed on disk: no re-read


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def test_load_relative_and_absolute_paths(registry, backbone, store_root):
    written = write_plan(store_root, backbone, "skip1")
    write_plan(store_root, backbone, "skip3", skipped=(3,))

    plan = registry.load("vqa/skip1")
    assert (plan.task, plan.name, plan.version) == ("vqa", "skip1", 1)
    assert plan.spec.weights_sha256 == written.weights_sha256
    assert plan.skipped_layers == (1,)
    assert registry.get("vqa", "skip1") is plan
    assert registry.active_name("vqa") == FULL_PLAN_NAME  # loading does not activate

    other = registry.load(str(store_root / "vqa" / "skip3"))
    assert registry.get("vqa", "skip3") is other
    assert store_json(store_root)["loaded"] == {"vqa": ["skip1", "skip3"]}
    assert served(registry) == {"vqa": ("full", {"full": 0, "skip1": 1, "skip3": 1})}

    # loading again is idempotent (listed once, same object since unchanged on disk)
    assert registry.load("./vqa/skip1") is plan
    assert store_json(store_root)["loaded"] == {"vqa": ["skip1", "skip3"]}


@pytest.mark.parametrize("path", ["../outside", "/etc", "vqa/../../outside", "OUTSIDE_ABSOLUTE", "LINK"])
def test_load_refuses_paths_outside_the_store(registry, backbone, store_root, path):
    outside = store_root.parent / "outside"
    write_plan(store_root, backbone, "outside", at=outside)  # a valid plan, just not in the store
    (store_root / "vqa").mkdir()
    os.symlink(outside, store_root / "vqa" / "link")
    path = {"OUTSIDE_ABSOLUTE": str(outside), "LINK": "vqa/link"}.get(path, path)
    before = identity(registry)

    with pytest.raises(RegistryError) as info:
        registry.load(path)
    assert info.value.status == 400
    assert "outside the plan store" in str(info.value)
    assert identity(registry) == before
    assert store_json(store_root) is None


def test_load_refuses_a_directory_without_plan_json(registry, store_root):
    (store_root / "vqa" / "empty").mkdir(parents=True)
    for path in ("vqa/empty", "vqa/missing", "", "."):
        with pytest.raises(RegistryError) as info:
            registry.load(path)
        assert info.value.status == 400 and "not a plan directory" in str(info.value)


@pytest.mark.parametrize("where", ["vqa/other-name", "nlvr2/skip1", "skip1", "vqa/nested/skip1"])
def test_load_refuses_a_plan_at_the_wrong_place(registry, backbone, store_root, where):
    write_plan(store_root, backbone, "skip1", at=store_root / where)
    before = identity(registry)
    with pytest.raises(RegistryError) as info:
        registry.load(where)
    assert info.value.status == 400
    assert "must live at <store>/vqa/skip1" in str(info.value)
    assert identity(registry) == before
    assert store_json(store_root) is None


def test_load_refuses_corrupted_weights_and_changes_nothing(registry, backbone, store_root):
    write_plan(store_root, backbone, "good")
    registry.load("vqa/good")
    registry.activate("vqa", "good")
    state_before = (store_root / STATE_FILE).read_bytes()
    before = identity(registry)

    write_plan(store_root, backbone, "bad", seed=1)
    corrupt_weights(store_root / "vqa" / "bad")
    with pytest.raises(RegistryError) as info:
        registry.load("vqa/bad")
    assert info.value.status == 422
    assert "checksum mismatch" in str(info.value) and "bad" in str(info.value)

    registry.sync()
    assert identity(registry) == before
    assert registry.active_name("vqa") == "good"
    assert (store_root / STATE_FILE).read_bytes() == state_before
    assert "bad" not in store_json(store_root)["loaded"]["vqa"]
    assert registry.errors == {}


def test_load_refuses_a_plan_for_another_backbone(registry, backbone, store_root):
    spec = make_spec(backbone, "alien")
    spec = PlanSpec(**{**spec.__dict__, "backbone": BackboneRef("vilt", "sha256:" + "0" * 64)})
    save_plan(store_root / "vqa" / "alien", spec, backbone.build_plan_modules(spec))
    with pytest.raises(RegistryError) as info:
        registry.load("vqa/alien")
    assert info.value.status == 422 and "fingerprint" in str(info.value)
    assert store_json(store_root) is None


# ---------------------------------------------------------------------------------------------
# activate / rollback / unload
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def loaded(registry, backbone, store_root) -> PlanRegistry:
    for name, layer in (("a", 1), ("b", 2)):
        write_plan(store_root, backbone, name, skipped=(layer,))
        registry.load(f"vqa/{name}")
    return registry


def test_activate_and_rollback(loaded):
    reg = loaded
    a = reg.activate("vqa", "a")
    assert a.name == "a" and reg.active_name("vqa") == "a" and reg.get("vqa") is a
    b = reg.activate("vqa", "b")
    assert reg.get("vqa") is b

    back = reg.rollback("vqa")
    assert back is a and reg.active_name("vqa") == "a"
    assert reg.rollback("vqa").name == FULL_PLAN_NAME
    with pytest.raises(RegistryError) as info:
        reg.rollback("vqa")
    assert info.value.status == 409 and "nothing to roll back" in str(info.value)
    assert reg.active_name("vqa") == FULL_PLAN_NAME


def test_rollback_with_no_history(registry):
    with pytest.raises(RegistryError) as info:
        registry.rollback("vqa")
    assert info.value.status == 409
    assert registry.active_name("vqa") == FULL_PLAN_NAME


def test_activating_the_active_plan_adds_no_history(loaded):
    loaded.activate("vqa", "a")
    loaded.activate("vqa", "a")
    assert loaded.rollback("vqa").name == FULL_PLAN_NAME
    with pytest.raises(RegistryError):
        loaded.rollback("vqa")


def test_rollback_skips_plans_unloaded_since(loaded):
    loaded.activate("vqa", "a")
    loaded.activate("vqa", "b")
    loaded.activate("vqa", FULL_PLAN_NAME)  # history: full, a, b
    loaded.unload("vqa", "b")
    assert loaded.rollback("vqa").name == "a"


def test_activate_refusals(loaded):
    for task, name in (("vqa", "missing"), ("nlvr2", FULL_PLAN_NAME), ("nope", "a")):
        with pytest.raises(RegistryError) as info:
            loaded.activate(task, name)
        assert info.value.status == 404
    assert loaded.active_name("vqa") == FULL_PLAN_NAME


def test_unload_refusals(loaded):
    loaded.activate("vqa", "a")
    with pytest.raises(RegistryError) as info:
        loaded.unload("vqa", "a")
    assert info.value.status == 409 and "active" in str(info.value)
    with pytest.raises(RegistryError) as info:
        loaded.unload("vqa", FULL_PLAN_NAME)
    assert info.value.status == 409 and "cannot be unloaded" in str(info.value)
    with pytest.raises(RegistryError) as info:
        loaded.unload("vqa", "missing")
    assert info.value.status == 404
    assert served(loaded) == {"vqa": ("a", {"full": 0, "a": 1, "b": 1})}


def test_unload_frees_the_plan(loaded, store_root):
    plan = loaded.get("vqa", "b")
    plan_ref, modules_ref = weakref.ref(plan), weakref.ref(plan.modules)
    del plan

    returned = loaded.unload("vqa", "b")
    assert returned.name == "b"
    del returned
    gc.collect()

    assert plan_ref() is None and modules_ref() is None
    assert "b" not in loaded.snapshot()["vqa"]["plans"]
    assert store_json(store_root)["loaded"]["vqa"] == ["a"]
    with pytest.raises(RegistryError) as info:
        loaded.get("vqa", "b")
    assert info.value.status == 404


# ---------------------------------------------------------------------------------------------
# convergence of workers / replicas sharing the store
# ---------------------------------------------------------------------------------------------
def test_two_registries_converge(backbone, store_root):
    one = PlanRegistry(backbone, PlanStore(store_root))
    two = PlanRegistry(backbone, PlanStore(store_root))
    one.sync(), two.sync()
    for name, layer in (("a", 1), ("b", 2), ("c", 3)):
        write_plan(store_root, backbone, name, skipped=(layer,))
        one.load(f"vqa/{name}")
    one.activate("vqa", "b")
    assert two.sync() is True
    assert served(two) == served(one) == {"vqa": ("b", {"full": 0, "a": 1, "b": 1, "c": 1})}
    plan_c = two.get("vqa", "c")

    one.activate("vqa", "a")
    one.unload("vqa", "b")
    two.sync()
    assert served(two) == served(one) == {"vqa": ("a", {"full": 0, "a": 1, "c": 1})}
    assert two.get("vqa", "c") is plan_c  # unchanged plans are not re-loaded

    one.rollback("vqa")  # b is gone: back to full
    two.sync()
    assert served(two) == served(one) == {"vqa": ("full", {"full": 0, "a": 1, "c": 1})}

    # admin operations work from either side
    two.activate("vqa", "c")
    one.sync()
    assert served(one) == served(two) == {"vqa": ("c", {"full": 0, "a": 1, "c": 1})}
    assert two.sync() is False


def test_replaced_plan_directory_is_reloaded(backbone, store_root):
    one = PlanRegistry(backbone, PlanStore(store_root))
    two = PlanRegistry(backbone, PlanStore(store_root))
    write_plan(store_root, backbone, "a", version=1, seed=1)
    one.load("vqa/a")
    one.activate("vqa", "a")
    two.sync()
    old = two.get("vqa")
    assert old.version == 1

    write_plan(store_root, backbone, "a", version=2, skipped=(0, 2), seed=2)  # a newer version in place
    assert two.sync() is True
    new = two.get("vqa")
    assert new is not old and new.version == 2 and new.skipped_layers == (0, 2)
    assert two.active_name("vqa") == "a"
    one.sync()
    assert one.get("vqa").version == 2
    assert served(one) == served(two)


def test_swap_is_seen_even_when_store_json_keeps_its_mtime(backbone, store_root):
    """Two admin operations within one file-system timestamp tick (coarse mtimes on many
    kernels) must still be seen by a replica that synced between them."""
    one = PlanRegistry(backbone, PlanStore(store_root))
    two = PlanRegistry(backbone, PlanStore(store_root))
    write_plan(store_root, backbone, "a")
    write_plan(store_root, backbone, "b", skipped=(2,))
    one.load("vqa/a")
    one.load("vqa/b")
    one.activate("vqa", "a")
    two.sync()
    assert two.active_name("vqa") == "a"
    stamp = (store_root / STATE_FILE).stat().st_mtime_ns

    one.activate("vqa", "b")
    os.utime(store_root / STATE_FILE, ns=(stamp, stamp))
    two.sync()
    assert two.active_name("vqa") == "b"


def test_invalid_plans_in_store_json_are_reported_not_fatal(backbone, store_root):
    write_plan(store_root, backbone, "good")
    write_plan(store_root, backbone, "corrupt", seed=3)
    corrupt_weights(store_root / "vqa" / "corrupt")
    write_plan(store_root, backbone, "misnamed", at=store_root / "vqa" / "elsewhere")
    (store_root / STATE_FILE).write_text(json.dumps({
        # (an invalid name such as "../x" makes the whole file invalid: see test_store_faults.py)
        "loaded": {"vqa": ["corrupt", "good", "missing", "elsewhere"], "nlvr2": ["ghost"]},
        "active": {"vqa": "corrupt"},
        "history": {},
    }))
    reg = PlanRegistry(backbone, PlanStore(store_root))
    reg.sync()

    assert served(reg) == {"vqa": ("full", {"full": 0, "good": 1})}
    assert set(reg.errors) == {"vqa/corrupt", "vqa/missing", "vqa/elsewhere", "nlvr2/ghost"}
    assert reg.store_error is None
    assert "checksum mismatch" in reg.errors["vqa/corrupt"]
    assert all(isinstance(message, str) and message for message in reg.errors.values())
    assert reg.tasks == ["vqa"]

    # fixing the plan on disk heals it on the next sync
    write_plan(store_root, backbone, "corrupt", seed=3)
    reg.sync()
    assert reg.active_name("vqa") == "corrupt"
    assert "vqa/corrupt" not in reg.errors and "vqa/good" not in reg.errors


def test_unreadable_store_json_serves_the_builtin_plans(backbone, store_root):
    (store_root / STATE_FILE).write_text("{ not json")
    reg = PlanRegistry(backbone, PlanStore(store_root))
    reg.sync()
    assert served(reg) == {"vqa": ("full", {"full": 0})}
    assert reg.store_error["file"] == str(store_root.resolve() / STATE_FILE)


def test_admin_operations_on_a_stale_replica_respect_the_store(backbone, store_root):
    """An admin request can land on a worker that has not synced yet: it must act on what the store
    says, not on its own stale view (else it could unload the active plan)."""
    one = PlanRegistry(backbone, PlanStore(store_root))
    two = PlanRegistry(backbone, PlanStore(store_root))
    write_plan(store_root, backbone, "a")
    one.load("vqa/a")
    two.sync()
    one.activate("vqa", "a")  # `two` has not synced since

    with pytest.raises(RegistryError) as info:
        two.unload("vqa", "a")
    assert info.value.status == 409
    assert store_json(store_root)["loaded"]["vqa"] == ["a"]
    one.sync()
    assert one.active_name("vqa") == "a"

    write_plan(store_root, backbone, "b", skipped=(2,))
    one.load("vqa/b")  # `two` has not synced since: it must still be able to activate b
    assert two.activate("vqa", "b").name == "b"
    one.sync()
    assert one.active_name("vqa") == "b"


def test_concurrent_syncs_do_not_go_back_in_time(backbone, store_root, monkeypatch):
    """A background sync that read the store before an admin operation must not overwrite, when it
    finishes later, the state the admin operation's own sync installed."""
    write_plan(store_root, backbone, "a")
    write_plan(store_root, backbone, "b", skipped=(2,))
    reg = PlanRegistry(backbone, PlanStore(store_root))
    reg.load("vqa/a")
    PlanRegistry(backbone, PlanStore(store_root)).load("vqa/b")  # another replica loads b

    entered, release = threading.Event(), threading.Event()
    real_load_plan = registry_module.load_plan

    def slow_load_plan(directory, bb):
        if threading.current_thread().name == "background-sync":
            entered.set()
            release.wait(10)
        return real_load_plan(directory, bb)

    monkeypatch.setattr(registry_module, "load_plan", slow_load_plan)
    # the periodic sync reads store.json (active: full) and is slow loading b
    background = threading.Thread(target=reg.sync, name="background-sync")
    background.start()
    assert entered.wait(10)

    results = {}
    admin = threading.Thread(target=lambda: results.update(plan=reg.activate("vqa", "a")))
    admin.start()
    admin.join(0.5)
    release.set()
    background.join(10)
    admin.join(10)
    assert results["plan"].name == "a"
    assert store_json(store_root)["active"]["vqa"] == "a"
    assert reg.active_name("vqa") == "a"
    assert served(reg) == {"vqa": ("a", {"full": 0, "a": 1, "b": 1})}


# ---------------------------------------------------------------------------------------------
# atomic swaps
# ---------------------------------------------------------------------------------------------
def test_a_plan_in_use_keeps_working_across_swaps(loaded, backbone, store_root):
    reg = loaded
    in_use = reg.activate("vqa", "a")
    weights = {k: v.clone() for k, v in in_use.modules.state_dict().items()}
    modules = in_use.modules
    before = encode(backbone, in_use)

    reg.activate("vqa", "b")
    write_plan(store_root, backbone, "a", version=2, skipped=(3,), seed=7)  # replaced on disk, too
    reg.sync()
    assert reg.get("vqa").name == "b"
    assert reg.get("vqa", "a").version == 2

    assert in_use.modules is modules and in_use.version == 1 and in_use.skipped_layers == (1,)
    after = in_use.modules.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())
    assert torch.equal(encode(backbone, in_use), before)
    assert not torch.equal(encode(backbone, reg.get("vqa", "a")), before)


# ---------------------------------------------------------------------------------------------
# hostile names
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "../../etc", "a/b", "/etc", "..", ".hidden", "", "x" * 65])
def test_plan_names_with_path_traversal_are_registry_errors(loaded, store_root, name):
    with pytest.raises(RegistryError) as info:
        loaded.store.plan_dir("vqa", name)
    assert info.value.status == 400
    for operation in (lambda: loaded.activate("vqa", name), lambda: loaded.unload("vqa", name)):
        with pytest.raises(RegistryError) as info:
            operation()
        assert info.value.status in (400, 404, 409)
    if name:  # get("vqa", "") means "the active plan"
        with pytest.raises(RegistryError):
            loaded.get("vqa", name)
    with pytest.raises(RegistryError) as info:
        loaded.load(f"vqa/{name}")
    assert info.value.status == 400
    assert served(loaded) == {"vqa": ("full", {"full": 0, "a": 1, "b": 1})}


def test_unknown_task_in_store_paths_is_a_registry_error(loaded):
    with pytest.raises(RegistryError) as info:
        loaded.store.plan_dir("../vqa", "a")
    assert info.value.status == 404
    for operation in (lambda: loaded.unload("../vqa", "a"), lambda: loaded.activate("../vqa", "a"),
                      lambda: loaded.rollback("../vqa"), lambda: loaded.rollback("nlvr2")):
        with pytest.raises(RegistryError) as info:
            operation()
        assert info.value.status == 404


def test_the_default_store_is_the_one_the_backbone_ships_in(tmp_path):
    shipped = tmp_path / "plans" / "meter"
    (shipped / "backbone").mkdir(parents=True)
    fallback = tmp_path / "plans"
    assert default_store_for(shipped / "backbone", fallback) == fallback  # no store.json beside it
    (shipped / STATE_FILE).write_text("{}")
    assert default_store_for(shipped / "backbone", fallback) == shipped.resolve()
    assert default_store_for(tmp_path / "elsewhere" / "ckpt", fallback) == fallback
