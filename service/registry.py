"""Plan store (on disk, the source of truth) and plan registry (what one worker has loaded).

Store layout::

    <store>/<task>/<name>/plan.json + weights.safetensors     plan directories
    <store>/store.json                                        which plans are loaded / active

store.json::

    {"loaded": {"vqa": ["skip2", "skip4"]},      # plans (besides the built-in "full") to load
     "active": {"vqa": "skip4"},                 # the plan a request gets when it names none
     "history": {"vqa": ["full", "skip2"]}}      # previous active plans, for rollback

Admin operations change store.json (atomically, under a file lock) and every worker, and every
replica sharing the store, converges to it with :meth:`PlanRegistry.sync`. The registry never
parses plan files itself: ``models.plan`` validates and loads them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tarfile
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.plan import (
    FULL_PLAN_NAME, NAME_PATTERN, PLAN_FILE, TASKS, WEIGHTS_FILE, Plan, PlanError, builtin_full_plan, load_plan,
    read_plan_spec, validate_plan,
)

STATE_FILE = "store.json"
MAX_ARCHIVE_BYTES = int(os.environ.get("DAS_MAX_PLAN_ARCHIVE_BYTES", 256 * 1024 * 1024))  # unpacked size
ARCHIVE_MEMBERS = (PLAN_FILE, WEIGHTS_FILE)
LOCK_FILE = ".store.lock"


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

    def to_json(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "active": self.active, "history": self.history}


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
            return StoreState(data.get("loaded", {}), data.get("active", {}), data.get("history", {}))
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


class PlanRegistry:
    """The plans one worker holds, per task, and which one is active. Thread-safe."""

    def __init__(self, backbone, store: PlanStore) -> None:
        self.backbone = backbone
        self.store = store
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()  # one sync at a time, so an older one never lands last
        self._plans: dict[str, dict[str, Plan]] = {task: {} for task in TASKS}
        self._active: dict[str, str] = {}
        self._token: tuple | None = None
        self.errors: dict[str, str] = {}  # "task/name" -> why it is not loaded
        for task in backbone.task_heads():
            self._plans[task][FULL_PLAN_NAME] = builtin_full_plan(backbone, task)
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
        with self._lock:
            self._plans = wanted
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
