"""The plan store on disk, the source of truth for every worker and replica sharing it.

Layout::

    <store>/<task>/<name>/plan.json + weights.safetensors     plan directories
    <store>/store.json                                        which plans are loaded / active

store.json::

    {"loaded": {"vqa": ["skip2", "skip4"]},      # plans (besides the built-in "full") to load
     "active": {"vqa": "skip4"},                 # the plan a request gets when it names none
     "history": {"vqa": ["full", "skip2"]},      # previous active plans, for rollback (newest 32 kept)
     "adaptive": {"vqa": {"slo_p95_ms": 200}}}   # optional, edited by hand: see service.adaptive

Admin operations change store.json (atomically and durably, under a file lock:
:meth:`PlanStore.locked_state`) and every worker converges to it (``service.registry.PlanRegistry``),
noticing changes by :meth:`PlanStore.change_token`. Plan files themselves are parsed by
``models.das.plan``, never here.

store.json is parsed strictly, in one place (:func:`parse_state`): a file that cannot be read, is
not JSON, has a section of the wrong type, an unknown task, an invalid plan name, or an active plan
that is not loaded raises :class:`StoreStateError`. A worker then keeps serving its last good state
and reports the problem (``PlanRegistry.store_error``); admin writes are refused (409, 503 for an OS
error) so the file is never overwritten, and every state written is validated the same way first.
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

from models.das.plan import FULL_PLAN_NAME, NAME_PATTERN, PLAN_FILE, WEIGHTS_FILE
from models.tasks import TASKS
from service.config import DEFAULTS
from service.errors import RegistryError

STATE_FILE = "store.json"
MAX_ARCHIVE_BYTES = DEFAULTS.max_plan_archive_bytes  # unpacked size, unless PlanStore is given another
ARCHIVE_MEMBERS = (PLAN_FILE, WEIGHTS_FILE)
LOCK_FILE = ".store.lock"
HISTORY_LIMIT = 32  # rollback entries kept per task (oldest dropped)
STATE_SECTIONS = ("loaded", "active", "history", "adaptive")


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
    """The plan directories and store.json under one root. ``max_archive_bytes``: the unpacked size
    of an uploaded plan archive (DAS_MAX_PLAN_ARCHIVE_BYTES); None: MAX_ARCHIVE_BYTES."""

    def __init__(self, root: str | os.PathLike, max_archive_bytes: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.max_archive_bytes = max_archive_bytes

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
        capped at ``max_archive_bytes``. The caller moves the folder into place or deletes it.
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

    def _check_members(self, sizes: dict[str, int]) -> None:
        missing = [name for name in ARCHIVE_MEMBERS if name not in sizes]
        if missing:
            raise RegistryError(f"the plan archive lacks {', '.join(missing)}", 400)
        limit = MAX_ARCHIVE_BYTES if self.max_archive_bytes is None else self.max_archive_bytes
        if sum(sizes.values()) > limit:
            raise RegistryError(f"the plan archive unpacks to {sum(sizes.values())} bytes; the limit is {limit}", 413)

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


def default_store_for(backbone_dir: str | os.PathLike, fallback: str | os.PathLike) -> Path:
    """The plan store to serve when none is named: the backbone directory's parent when it is a plan store
    (holds store.json: the shipped layout, ``plans/backbone`` and ``plans/meter/backbone``), else ``fallback``."""
    parent = Path(backbone_dir).resolve().parent
    return parent if (parent / STATE_FILE).is_file() else Path(fallback)

