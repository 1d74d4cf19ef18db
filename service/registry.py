"""The plan registry: the plans one worker holds, per task, and which one is active.

Every worker converges to the plan store (``service.store``: store.json and the plan directories)
with :meth:`PlanRegistry.sync`, and admin operations write the store first, then converge. The
registry never parses plan files itself: ``models.das.plan`` validates and loads them. Each loaded
plan's cost (``service.policy.PlanCost``) is computed once, when it is loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from models.das.plan import (
    FULL_PLAN_NAME,
    PLAN_FILE,
    Plan,
    PlanError,
    builtin_full_plan,
    load_plan,
    read_plan_spec,
    validate_plan,
)
from models.tasks import TASKS
from service.adaptive import (
    AdaptiveConfigError,
    AdaptiveSettings,
    parse_adaptive_config,
)
from service.errors import RegistryError
from service.metrics import (
    STORE_ERROR_KINDS,  # das_store_errors_total's "kind" label values
)
from service.policy import PlanCost, cheaper_ladder, choose_within_budget, plan_cost
from service.store import HISTORY_LIMIT, PlanStore, StoreStateError

ADAPTIVE_ERROR_KEY = "store.json/adaptive"  # where a bad "adaptive" section is reported in errors
log = logging.getLogger(__name__)


class PlanRegistry:
    """The plans one worker holds, per task, and which one is active. Thread-safe."""

    def __init__(self, backbone, store: PlanStore) -> None:
        self.backbone = backbone
        self.store = store
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()  # one sync at a time, so an older one never lands last
        self._plans: dict[str, dict[str, Plan]] = {task: {} for task in TASKS}
        self._costs: dict[str, dict[str, PlanCost]] = {task: {} for task in TASKS}
        self._active: dict[str, str] = {}
        self._adaptive: dict[str, AdaptiveSettings] = {}
        self._token: tuple | None = None
        self.errors: dict[str, str] = {}  # "task/name" (or ADAPTIVE_ERROR_KEY) -> why it is not in effect
        # why store.json is not in effect ({"file", "reason"}), None when it is: the last good state serves
        self.store_error: dict[str, str] | None = None
        self._store_error_counts: Counter = Counter()  # kind -> problems since drain_store_errors()
        for task in backbone.task_heads():
            self._plans[task][FULL_PLAN_NAME] = plan = builtin_full_plan(backbone, task)
            self._costs[task][FULL_PLAN_NAME] = plan_cost(backbone, plan)
            self._active[task] = FULL_PLAN_NAME

    # -- reading ---------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        with self._lock:
            return [task for task in TASKS if self._plans[task]]

    def get(self, task: str, name: str | None = None) -> Plan:
        with self._lock:
            if task not in TASKS:
                raise RegistryError(f"unknown task {task!r}", 404)
            plans = self._plans[task]
            if not plans:
                raise RegistryError(
                    f"task {task!r} is not served: the backbone has no {task} head and the plan store has no {task} plan",
                    404,
                )
            name = name or self._active.get(task)
            if name not in plans:
                raise RegistryError(f"no plan {name!r} loaded for {task} (loaded: {', '.join(sorted(plans))})", 404)
            return plans[name]

    def active_name(self, task: str) -> str | None:
        with self._lock:
            return self._active.get(task)

    def cost(self, plan: Plan) -> PlanCost:
        """``plan``'s cost: cached while it is loaded, computed for one unloaded since it was picked."""
        with self._lock:
            cached = self._costs.get(plan.task, {}).get(plan.name)
            if cached is not None and self._plans[plan.task].get(plan.name) is plan:
                return cached
        return plan_cost(self.backbone, plan)

    def costs(self, task: str) -> list[PlanCost]:
        with self._lock:
            return list(self._costs.get(task, {}).values())

    def within_budget(self, task: str, max_flops_ratio: float) -> Plan:
        """The most accurate loaded plan of ``task`` within the FLOPs budget (see choose_within_budget)."""
        with self._lock:
            self.get(task)  # a served task (404 otherwise)
            choice = choose_within_budget(task, list(self._costs[task].values()), max_flops_ratio)
            return self._plans[task][choice.name]

    @property
    def adaptive(self) -> dict[str, AdaptiveSettings]:
        """Load-adaptive settings per task, as last read from store.json without error."""
        with self._lock:
            return dict(self._adaptive)

    def ladder(self, task: str) -> list[str]:
        """The plans load-adaptive mode may serve for ``task``: the active one, then cheaper ones."""
        with self._lock:
            active = self._active.get(task)
            if active is None:
                return []
            settings = self._adaptive.get(task)
            return cheaper_ladder(list(self._costs[task].values()), active, settings.fallbacks if settings else None)

    def ladder_with_ratios(self, task: str) -> tuple[list[str], list[float] | None]:
        """:meth:`ladder` and each rung's flops ratio, read together (None if a rung has no cost)."""
        with self._lock:
            names, costs = self.ladder(task), self._costs.get(task, {})
            return names, [costs[n].flops_ratio for n in names] if all(n in costs for n in names) else None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                task: {"active": self._active.get(task), "plans": dict(self._plans[task])}
                for task in TASKS
                if self._plans[task]
            }

    # -- store problems ------------------------------------------------------------------------
    def note_store_error(self, kind: str) -> None:
        """Count a plan store problem (kind: one of STORE_ERROR_KINDS) for drain_store_errors()."""
        with self._lock:
            self._store_error_counts[kind if kind in STORE_ERROR_KINDS else "sync"] += 1

    def drain_store_errors(self) -> dict[str, int]:
        """kind -> store problems counted since the last call (for the das_store_errors counter)."""
        with self._lock:
            counts, self._store_error_counts = dict(self._store_error_counts), Counter()
            return counts

    def _set_store_error(self, error: StoreStateError | None) -> None:
        """Record (and log once per distinct problem) why store.json is or is no longer ignored."""
        current = error.to_json() if error is not None else None
        if current == self.store_error:
            return
        if current is not None:
            log.warning("plan store state %s is not used (%s); the last good state serves until it is fixed",
                        current["file"], current["reason"])
        else:
            log.info("plan store state %s reads correctly again; serving it", self.store_error["file"])
        self.store_error = current

    # -- converging to the store -------------------------------------------------------------
    def sync(self, force: bool = False) -> bool:
        """Make this worker match the store. Returns True if anything was re-read and applied. A
        store.json that cannot be read or is invalid changes nothing served: see ``store_error``."""
        with self._sync_lock:
            return self._sync(force)

    def _sync(self, force: bool) -> bool:
        token = self.store.change_token()
        if token == self._token and not force:
            return False
        try:
            state = self.store.read_state()
        except StoreStateError as exc:
            self._set_store_error(exc)
            self.note_store_error("read")
            self._token = token  # re-read once something on disk changes, not on every tick
            return False
        self._set_store_error(None)
        wanted: dict[str, dict[str, Plan]] = {}
        errors: dict[str, str] = {}
        for task in TASKS:
            current = self._plans[task]
            keep = {FULL_PLAN_NAME: current[FULL_PLAN_NAME]} if FULL_PLAN_NAME in current else {}
            for name in state.loaded.get(task, []):
                try:
                    directory = self.store.plan_dir(task, name)
                    old = current.get(name)
                    plan = old if old is not None and self._unchanged(old, directory) else load_plan(directory, self.backbone)
                    if (plan.task, plan.name) != (task, name):
                        raise RegistryError(f"{directory} holds plan {plan.task}/{plan.name}, not {task}/{name}")
                    keep[name] = plan
                except (PlanError, RegistryError, OSError) as exc:
                    errors[f"{task}/{name}"] = str(exc)
            wanted[task] = keep
        costs = {task: {name: self._costs[task].get(name) if self._plans[task].get(name) is plan
                        else plan_cost(self.backbone, plan) for name, plan in plans.items()}
                 for task, plans in wanted.items()}
        try:
            adaptive = parse_adaptive_config(state.adaptive)
        except AdaptiveConfigError as exc:  # keep the last good settings; GET /plans/ shows why
            adaptive = self._adaptive
            errors[ADAPTIVE_ERROR_KEY] = str(exc)
            log.warning("ignoring the change to %s: %s", ADAPTIVE_ERROR_KEY, exc)
        with self._lock:
            self._plans = wanted
            self._costs = costs
            self._adaptive = adaptive
            for task, plans in wanted.items():
                active = state.active.get(task)
                if active not in plans:
                    active = FULL_PLAN_NAME if FULL_PLAN_NAME in plans else (sorted(plans)[0] if plans else None)
                if active is None:
                    self._active.pop(task, None)
                else:
                    self._active[task] = active
            self.errors = errors
            self._token = token
        return True

    @staticmethod
    def _unchanged(plan: Plan, directory: Path) -> bool:
        try:
            data = json.loads((directory / PLAN_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return data.get("version") == plan.version and data.get("weights_sha256") == plan.spec.weights_sha256

    # -- admin operations (write the store, then converge) -------------------------------------
    @contextlib.contextmanager
    def _write_store(self):
        """store.locked_state(), counting and logging the store's refusals (StoreStateError)."""
        try:
            with self.store.locked_state() as state:
                yield state
        except StoreStateError as exc:
            self.note_store_error(exc.kind)
            if exc.kind == "write":
                log.warning("admin change not written: %s", exc)
            raise

    def load(self, path: str) -> Plan:
        directory = self.store.resolve_inside(path)
        try:
            spec = validate_plan(directory, self.backbone)
        except PlanError as exc:
            raise RegistryError(str(exc), 422) from None
        if directory != self.store.plan_dir(spec.task, spec.name):
            raise RegistryError(
                f"plan {spec.task}/{spec.name} must live at <store>/{spec.task}/{spec.name}, not {path!r}", 400
            )
        with self._write_store() as state:
            names = state.loaded.setdefault(spec.task, [])
            if spec.name not in names:
                names.append(spec.name)
        self.sync(force=True)
        if f"{spec.task}/{spec.name}" in self.errors:
            raise RegistryError(self.errors[f"{spec.task}/{spec.name}"], 422)
        return self.get(spec.task, spec.name)

    def load_archive(self, archive: Path) -> Plan:
        """Unpack an uploaded plan archive into <store>/<task>/<name> and load it. A plan already in
        the store under that name is replaced only by a higher version."""
        try:
            self.store.read_state()  # refused before anything lands in the store (load() would refuse it)
        except StoreStateError as exc:
            self.note_store_error("read")
            raise exc.refusing_writes() from None
        staging = self.store.unpack_archive(archive)
        try:
            try:
                spec = validate_plan(staging, self.backbone)
            except PlanError as exc:
                raise RegistryError(str(exc), 422) from None
            target = self.store.plan_dir(spec.task, spec.name)
            if (target / PLAN_FILE).is_file():
                try:
                    existing = read_plan_spec(target).version
                except PlanError:
                    existing = -1
                if existing >= spec.version:
                    raise RegistryError(
                        f"{spec.task}/{spec.name} v{existing} is already in the store; upload a higher version", 409)
                shutil.rmtree(target)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging, target)
            except OSError as exc:
                self.note_store_error("write")
                raise RegistryError(f"the plan store cannot be written ({target}): {exc}", 503) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.load(str(target))

    def activate(self, task: str, name: str) -> Plan:
        self.store.plan_dir(task, name)  # a valid task and name (404/400 otherwise)
        self.sync()  # act on the store as it is now, not on this worker's last view of it
        self.get(task, name)  # must be loaded here (raises 404 otherwise)
        with self._write_store() as state:
            if name != FULL_PLAN_NAME and name not in state.loaded.get(task, []):
                raise RegistryError(f"no plan {name!r} loaded for {task}", 404)
            previous = state.active.get(task) or self.active_name(task)
            if previous and previous != name:
                history = state.history.setdefault(task, [])
                history.append(previous)
                del history[:-HISTORY_LIMIT]  # the oldest go
            state.active[task] = name
        self.sync(force=True)
        return self.get(task, name)

    def rollback(self, task: str) -> Plan:
        self.sync()
        self.get(task)  # a served task (404 otherwise)
        with self._write_store() as state:
            # decided from the state read under the lock (another worker may have unloaded a plan
            # since this one synced): a plan no longer listed as loaded there is skipped, and so is
            # one that failed to load here
            in_store = set(state.loaded.get(task, [])) | {FULL_PLAN_NAME}
            with self._lock:
                here = set(self._plans.get(task, {}))
            history = state.history.get(task, [])
            while history and not (history[-1] in in_store and history[-1] in here):
                history.pop()  # skip plans unloaded since
            if not history:
                raise RegistryError(f"nothing to roll back to for {task}", 409)
            state.active[task] = history.pop()
        self.sync(force=True)
        return self.get(task)

    def unload(self, task: str, name: str) -> Plan:
        self.store.plan_dir(task, name)  # a valid task and name (404/400 otherwise)
        self.sync()
        plan = self.get(task, name)
        if name == FULL_PLAN_NAME:
            raise RegistryError("the built-in 'full' plan cannot be unloaded", 409)
        with self._write_store() as state:
            # decided from the state read under the lock, not from this worker's view of it (when the
            # store names no active plan, the one this worker falls back to is the active one)
            active = state.active.get(task) or self.active_name(task)
            if name == active:
                raise RegistryError(f"{task}/{name} is the active plan; activate another one first", 409)
            if name not in state.loaded.get(task, []):
                raise RegistryError(f"no plan {name!r} loaded for {task} (it was unloaded meanwhile)", 404)
            state.loaded[task].remove(name)
        self.sync(force=True)
        return plan
