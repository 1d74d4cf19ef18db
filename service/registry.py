"""Plan store (on disk, the source of truth) and plan registry (what one worker has loaded).

Store layout::

    <store>/<task>/<name>/plan.json + weights.safetensors     plan directories
    <store>/store.json                                        which plans are loaded / active

store.json::

    {"loaded": {"vqa": ["skip2", "skip4"]},      # plans (besides the built-in "full") to load
     "active": {"vqa": "skip4"},                 # the plan a request gets when it names none
     "history": {"vqa": ["full", "skip2"]},      # previous active plans, for rollback
     "adaptive": {"vqa": {"slo_p95_ms": 200}}}   # optional, edited by hand: see service.adaptive

Admin operations change store.json (atomically, under a file lock) and every worker, and every
replica sharing the store, converges to it with :meth:`PlanRegistry.sync`. The registry never
parses plan files itself: ``models.das.plan`` validates and loads them.

Plan choice by FLOPs budget lives here too (:func:`choose_within_budget`, :func:`cheaper_ladder`):
each loaded plan has a :class:`PlanCost`, its FLOPs ratio at the reference input and its primary
task score, computed once when it is loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import tarfile
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.das.plan import (
    FULL_PLAN_NAME, NAME_PATTERN, PLAN_FILE, WEIGHTS_FILE, Plan, PlanError, builtin_full_plan, load_plan,
    read_plan_spec, validate_plan,
)
from models.tasks import TASKS, primary_score
from service.adaptive import AdaptiveConfigError, AdaptiveSettings, parse_adaptive_config

STATE_FILE = "store.json"
MAX_ARCHIVE_BYTES = int(os.environ.get("DAS_MAX_PLAN_ARCHIVE_BYTES", 256 * 1024 * 1024))  # unpacked size
ARCHIVE_MEMBERS = (PLAN_FILE, WEIGHTS_FILE)
LOCK_FILE = ".store.lock"
REFERENCE_TEXT_LEN = 16  # text tokens of the reference input when a plan's metrics name none
ADAPTIVE_ERROR_KEY = "store.json/adaptive"  # where a bad "adaptive" section is reported in errors
log = logging.getLogger(__name__)


class RegistryError(Exception):
    """A registry request that cannot be honoured. ``status`` is the HTTP status that fits."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class StoreState:
    loaded: dict[str, list[str]] = field(default_factory=dict)
    active: dict[str, str] = field(default_factory=dict)
    history: dict[str, list[str]] = field(default_factory=dict)
    adaptive: Any = None  # kept as written (admin writes must not drop it); parsed by the registry

    def to_json(self) -> dict[str, Any]:
        data = {"loaded": self.loaded, "active": self.active, "history": self.history}
        if self.adaptive is not None:
            data["adaptive"] = self.adaptive
        return data


class PlanStore:
    """The plan directories and store.json under one root."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()

    def plan_dir(self, task: str, name: str) -> Path:
        if task not in TASKS:
            raise RegistryError(f"unknown task {task!r} (known: {', '.join(TASKS)})", 404)
        if not NAME_PATTERN.match(name or ""):
            raise RegistryError(f"invalid plan name {name!r}", 400)
        return self.root / task / name

    def resolve_inside(self, path: str) -> Path:
        """A path given by a client, which must name a directory inside the store."""
        candidate = Path(path)
        candidate = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise RegistryError(f"path {path!r} is outside the plan store", 400)
        if not (candidate / PLAN_FILE).is_file():
            raise RegistryError(f"path {path!r} is not a plan directory (no {PLAN_FILE})", 400)
        return candidate

    def unpack_archive(self, archive: Path) -> Path:
        """Unpack an uploaded plan archive (.tar, .tar.gz or .zip holding plan.json and
        weights.safetensors, at the top or in one folder) into a staging folder inside the store.

        Only those two regular files are taken, by name, so nothing can land outside the staging
        folder (no paths, links or devices from the archive are honoured); the unpacked size is
        capped at MAX_ARCHIVE_BYTES. The caller moves the folder into place or deletes it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
        try:
            if tarfile.is_tarfile(archive):
                with tarfile.open(archive) as tar:
                    members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile() and Path(m.name).name in ARCHIVE_MEMBERS}
                    self._check_members({k: m.size for k, m in members.items()})
                    for name, member in members.items():
                        with tar.extractfile(member) as source, open(staging / name, "wb") as target:
                            shutil.copyfileobj(source, target)
            elif zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zipped:
                    members = {Path(i.filename).name: i for i in zipped.infolist() if not i.is_dir() and Path(i.filename).name in ARCHIVE_MEMBERS}
                    self._check_members({k: i.file_size for k, i in members.items()})
                    for name, info in members.items():
                        with zipped.open(info) as source, open(staging / name, "wb") as target:
                            shutil.copyfileobj(source, target)
            else:
                raise RegistryError("the upload is not a .tar, .tar.gz or .zip archive", 400)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise RegistryError(f"the plan archive could not be read: {exc}", 400) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    @staticmethod
    def _check_members(sizes: dict[str, int]) -> None:
        missing = [name for name in ARCHIVE_MEMBERS if name not in sizes]
        if missing:
            raise RegistryError(f"the plan archive lacks {', '.join(missing)}", 400)
        if sum(sizes.values()) > MAX_ARCHIVE_BYTES:
            raise RegistryError(f"the plan archive unpacks to {sum(sizes.values())} bytes; the limit is {MAX_ARCHIVE_BYTES}", 413)

    def read_state(self) -> StoreState:
        path = self.root / STATE_FILE
        if not path.is_file():
            return StoreState()
        try:
            data = json.loads(path.read_text())
            return StoreState(data.get("loaded", {}), data.get("active", {}), data.get("history", {}),
                              data.get("adaptive"))
        except (json.JSONDecodeError, AttributeError):
            return StoreState()

    @contextlib.contextmanager
    def locked_state(self):
        """Read-modify-write of store.json under an exclusive lock (workers are processes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self.read_state()
                yield state
                tmp = self.root / f".{STATE_FILE}.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
                os.replace(tmp, self.root / STATE_FILE)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def change_token(self) -> tuple:
        """Cheap summary of what is on disk; changes whenever store.json or a plan.json does.

        Both are replaced by rename, so the inode changes even when two writes fall in the same
        (possibly coarse) mtime tick."""
        entries = []
        state = self.root / STATE_FILE
        entries.append(_stamp(state) if state.exists() else 0)
        for task in TASKS:
            for plan_json in sorted((self.root / task).glob(f"*/{PLAN_FILE}")):
                with contextlib.suppress(FileNotFoundError):
                    entries.append((str(plan_json), _stamp(plan_json)))
        return tuple(entries)


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return (stat.st_mtime_ns, stat.st_ino, stat.st_size)


# -- plan choice by cost ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanCost:
    """What choosing a plan costs and buys."""

    name: str
    flops_ratio: float  # executed / full-backbone FLOPs at the plan's reference input (rounded to 1e-6)
    score: float | None  # the task's primary score (models.tasks.primary_score) from plan.json; None: unknown


def default_store_for(backbone_dir: str | os.PathLike, fallback: str | os.PathLike) -> Path:
    """The plan store to serve when none is named: the backbone directory's parent when it is a plan store
    (holds store.json: the shipped layout, ``plans/backbone`` and ``plans/meter/backbone``), else ``fallback``."""
    parent = Path(backbone_dir).resolve().parent
    return parent if (parent / STATE_FILE).is_file() else Path(fallback)


def reference_input(backbone, plan: Plan) -> dict[str, Any]:
    """The input size a plan's FLOPs are quoted at: its metrics' reference_input, else 16 text tokens
    and a square image at the backbone's resolution."""
    ref: dict[str, Any] = {"text_len": REFERENCE_TEXT_LEN, "image_size": backbone.config.image_size}
    given = plan.spec.metrics.get("reference_input")
    given = given if isinstance(given, dict) else {}
    if isinstance(given.get("text_len"), int) and given["text_len"] > 0:
        ref["text_len"] = given["text_len"]
    size = given.get("image_size")
    if isinstance(size, int) and size > 0:
        ref["image_size"] = size
    elif isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        ref["image_size"] = size
    return ref


def plan_cost(backbone, plan: Plan) -> PlanCost:
    """The FLOPs ratio (from the backbone's FLOPs accounting) and score of a loaded plan."""
    ref = reference_input(backbone, plan)
    size = ref["image_size"] if isinstance(ref["image_size"], int) else tuple(ref["image_size"])
    report = backbone.flops_at(plan.task, plan.spec, ref["text_len"], size)
    try:
        score = float(primary_score(plan.task, plan.spec.metrics))
    except (KeyError, TypeError, ValueError):
        score = None
    return PlanCost(plan.name, round(report.executed / report.full, 6),
                    score if score is not None and math.isfinite(score) else None)


def check_flops_budget(value: float | None) -> float | None:
    """A client's max_flops_ratio: None, or a number with 0 < x <= 1 (RegistryError 400 otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise RegistryError(f"max_flops_ratio must be a number with 0 < max_flops_ratio <= 1 "
                            f"(a fraction of the full backbone's FLOPs), got {value!r}", 400)
    return float(value)


def choose_within_budget(task: str, costs: list[PlanCost], max_flops_ratio: float) -> PlanCost:
    """The most accurate plan whose FLOPs ratio is at most ``max_flops_ratio``: highest score first,
    plans without a score last, ties to the cheaper plan (then by name, so the choice is stable).
    RegistryError 422 naming the cheapest ratio available when none fits."""
    fitting = [c for c in costs if c.flops_ratio <= max_flops_ratio]
    if not fitting:
        cheapest = min(costs, key=lambda c: (c.flops_ratio, c.name), default=None)
        available = f"the cheapest is {cheapest.name} at {cheapest.flops_ratio:.6g}" if cheapest else "no plan is loaded"
        raise RegistryError(f"no loaded {task} plan fits max_flops_ratio={max_flops_ratio:g}: {available}", 422)
    return min(fitting, key=lambda c: (c.score is None, -(c.score or 0.0), c.flops_ratio, c.name))


def cheaper_ladder(costs: list[PlanCost], active: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    """The active plan, then every loaded plan strictly cheaper than it (only those in ``allowed``
    when given), most expensive first: the rungs load-adaptive mode steps down."""
    by_name = {c.name: c for c in costs}
    if active not in by_name:
        return [active]
    top = by_name[active].flops_ratio
    cheaper = [c for c in costs if c.flops_ratio < top and (allowed is None or c.name in allowed)]
    return [active] + [c.name for c in sorted(cheaper, key=lambda c: (-c.flops_ratio, c.name))]


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

    # -- converging to the store -------------------------------------------------------------
    def sync(self, force: bool = False) -> bool:
        """Make this worker match the store. Returns True if anything was re-read."""
        with self._sync_lock:
            return self._sync(force)

    def _sync(self, force: bool) -> bool:
        token = self.store.change_token()
        if token == self._token and not force:
            return False
        state = self.store.read_state()
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
        with self.store.locked_state() as state:
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
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.load(str(target))

    def activate(self, task: str, name: str) -> Plan:
        self.store.plan_dir(task, name)  # a valid task and name (404/400 otherwise)
        self.sync()  # act on the store as it is now, not on this worker's last view of it
        self.get(task, name)  # must be loaded here (raises 404 otherwise)
        with self.store.locked_state() as state:
            if name != FULL_PLAN_NAME and name not in state.loaded.get(task, []):
                raise RegistryError(f"no plan {name!r} loaded for {task}", 404)
            previous = state.active.get(task) or self.active_name(task)
            if previous and previous != name:
                state.history.setdefault(task, []).append(previous)
            state.active[task] = name
        self.sync(force=True)
        return self.get(task, name)

    def rollback(self, task: str) -> Plan:
        self.sync()
        self.get(task)  # a served task (404 otherwise)
        with self.store.locked_state() as state:
            history = state.history.get(task, [])
            while history and history[-1] not in self._plans.get(task, {}):
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
        with self.store.locked_state() as state:
            if name in (self.active_name(task), state.active.get(task)):
                raise RegistryError(f"{task}/{name} is the active plan; activate another one first", 409)
            if name in state.loaded.get(task, []):
                state.loaded[task].remove(name)
        self.sync(force=True)
        return plan
