"""Plan store (on disk, the source of truth) and plan registry (what one worker has loaded).

Store layout::

    <store>/<task>/<name>/plan.json + weights.safetensors     plan directories
    <store>/store.json                                        which plans are loaded / active

store.json::

    {"loaded": {"vqa": ["skip2", "skip4"]},      # plans (besides the built-in "full") to load
     "active": {"vqa": "skip4"},                 # the plan a request gets when it names none
     "history": {"vqa": ["full", "skip2"]},      # previous active plans, for rollback (newest 32 kept)
     "adaptive": {"vqa": {"slo_p95_ms": 200}}}   # optional, edited by hand: see service.adaptive

Admin operations change store.json (atomically, under a file lock) and every worker, and every
replica sharing the store, converges to it with :meth:`PlanRegistry.sync`. The registry never
parses plan files itself: ``models.das.plan`` validates and loads them.

store.json is parsed strictly, in one place (:func:`parse_state`): a file that cannot be read, is
not JSON, has a section of the wrong type, an unknown task, an invalid plan name, or an active plan
that is not loaded raises :class:`StoreStateError`. A worker then keeps serving its last good state
and reports the problem (``PlanRegistry.store_error``); admin writes are refused (409, 503 for an OS
error) so the file is never overwritten, and every state written is validated the same way first.

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
from collections import Counter
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
from service.metrics import STORE_ERROR_KINDS  # das_store_errors_total's "kind" label values

STATE_FILE = "store.json"
MAX_ARCHIVE_BYTES = int(os.environ.get("DAS_MAX_PLAN_ARCHIVE_BYTES", 256 * 1024 * 1024))  # unpacked size
ARCHIVE_MEMBERS = (PLAN_FILE, WEIGHTS_FILE)
LOCK_FILE = ".store.lock"
REFERENCE_TEXT_LEN = 16  # text tokens of the reference input when a plan's metrics name none
ADAPTIVE_ERROR_KEY = "store.json/adaptive"  # where a bad "adaptive" section is reported in errors
HISTORY_LIMIT = 32  # rollback entries kept per task (oldest dropped)
STATE_SECTIONS = ("loaded", "active", "history", "adaptive")
log = logging.getLogger(__name__)


class RegistryError(Exception):
    """A registry request that cannot be honoured. ``status`` is the HTTP status that fits."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class StoreStateError(RegistryError):
    """store.json cannot be used: unreadable, not JSON, wrong types, inconsistent, or not writable.

    ``file`` is the path to fix, ``reason`` why; ``kind`` is "read" (the file on disk is the problem)
    or "write" (a new state could not be, or must not be, written). Status 409 for the file's
    content, 503 for an OS error."""

    def __init__(self, file: str | os.PathLike, reason: str, status: int = 409, kind: str = "read") -> None:
        self.file, self.reason, self.kind = str(file), reason, kind
        super().__init__(f"{self.file}: {reason}", status)

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason}

    def refusing_writes(self) -> StoreStateError:
        """This read error as the answer to an admin change (the file is kept as it is)."""
        return StoreStateError(self.file, f"{self.reason}; fix this file: admin changes are refused until it reads "
                                          f"correctly, so that it is not overwritten", self.status, self.kind)


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


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (dict, "an object"), (list, "an array"), (str, "a string"),
                       ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _task_section(data: dict, section: str, file: str, of_names: bool) -> dict:
    """data[section] as {task: [names]} (of_names) or {task: name}, every task known and name valid."""
    value = data.get(section, {})
    if not isinstance(value, dict):
        raise StoreStateError(file, f"'{section}' must be an object of task -> "
                                    f"{'plan names' if of_names else 'plan name'}, got {_json_type(value)}")
    for task, entry in value.items():
        where = f"'{section}.{task}'"
        if task not in TASKS:
            raise StoreStateError(file, f"{where}: unknown task (known: {', '.join(TASKS)})")
        names = entry if of_names else [entry]
        if of_names and not isinstance(entry, list):
            raise StoreStateError(file, f"{where} must be an array of plan names, got {_json_type(entry)}")
        for name in names:
            if not isinstance(name, str) or not NAME_PATTERN.match(name):
                raise StoreStateError(file, f"{where}: {name!r} is not a valid plan name "
                                            f"({NAME_PATTERN.pattern})")
    return value


def parse_state(data: Any, file: str | os.PathLike) -> StoreState:
    """store.json's content (parsed JSON) -> a validated StoreState; StoreStateError naming the problem.

    Checked: the top level and each section are objects of the right shape, tasks are known, plan
    names match NAME_PATTERN, "full" (built in) is not listed as loaded, and every active plan is
    "full" or loaded. History entries need not be loaded (rollback skips those unloaded since). The
    "adaptive" section is kept as written: the registry parses it (a bad one is reported, not fatal).
    """
    file = str(file)
    if not isinstance(data, dict):
        raise StoreStateError(file, f"the top level must be a JSON object, got {_json_type(data)}")
    unknown = sorted(set(data) - set(STATE_SECTIONS))
    if unknown:
        raise StoreStateError(file, f"unknown section(s) {', '.join(map(repr, unknown))} "
                                    f"(known: {', '.join(STATE_SECTIONS)})")
    loaded = _task_section(data, "loaded", file, of_names=True)
    active = _task_section(data, "active", file, of_names=False)
    history = _task_section(data, "history", file, of_names=True)
    for task, names in loaded.items():
        if FULL_PLAN_NAME in names:
            raise StoreStateError(file, f"'loaded.{task}' lists {FULL_PLAN_NAME!r}, the built-in plan (always loaded)")
    for task, name in active.items():
        if name != FULL_PLAN_NAME and name not in loaded.get(task, []):
            raise StoreStateError(file, f"'active.{task}' is {name!r}, which is not in 'loaded.{task}'")
    return StoreState({t: list(v) for t, v in loaded.items()}, dict(active),
                      {t: list(v) for t, v in history.items()}, data.get("adaptive"))


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
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
        except OSError as exc:
            raise RegistryError(f"the plan store cannot be written ({self.root}): {exc}", 503) from None
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

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    def read_state(self) -> StoreState:
        """store.json as a validated StoreState (an empty one when there is no file yet).
        StoreStateError when it cannot be read or is invalid: never an empty state in its place."""
        path = self.state_file
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return StoreState()
        except OSError as exc:
            raise StoreStateError(path, f"unreadable: {exc}", 503) from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise StoreStateError(path, f"not UTF-8 text: {exc}") from None
        except json.JSONDecodeError as exc:
            raise StoreStateError(path, f"not valid JSON: {exc}") from None
        return parse_state(data, path)

    @contextlib.contextmanager
    def locked_state(self):
        """Read-modify-write of store.json under an exclusive lock (workers are processes).

        The state read is validated (a store.json that cannot be read or is invalid is never
        overwritten: StoreStateError 409/503), and so is the state the caller leaves, before it is
        written (StoreStateError 409, nothing written). An OS error writing is StoreStateError 503."""
        path = self.state_file
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = open(self.root / LOCK_FILE, "a+")
        except OSError as exc:
            raise StoreStateError(path, f"the plan store cannot be written (lock file {self.root / LOCK_FILE}): {exc}",
                                  503, "write") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    state = self.read_state()
                except StoreStateError as exc:
                    raise exc.refusing_writes() from None
                yield state
                try:  # what is written must read back as it is meant
                    checked = parse_state(json.loads(json.dumps(state.to_json())), path)
                except (StoreStateError, TypeError, ValueError) as exc:
                    reason = exc.reason if isinstance(exc, StoreStateError) else str(exc)
                    raise StoreStateError(path, f"refusing to write an invalid state: {reason}", 409, "write") from None
                for history in checked.history.values():
                    del history[:-HISTORY_LIMIT]  # the oldest go
                self._write_state(checked)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_state(self, state: StoreState) -> None:
        """Replace store.json atomically and durably: temp file, fsync, rename, fsync the directory."""
        path = self.state_file
        tmp = self.root / f".{STATE_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
        data = (json.dumps(state.to_json(), indent=2) + "\n").encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                if tmp.is_file():
                    tmp.unlink()
            raise StoreStateError(path, f"the plan store cannot be written: {exc}", 503, "write") from None
        with contextlib.suppress(OSError):  # best effort: the rename itself survives a crash
            directory = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

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
