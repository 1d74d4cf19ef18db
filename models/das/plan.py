"""The DAS plan format: defined once, validated once.

A plan is a directory holding ``plan.json`` (what the plan is) and ``weights.safetensors`` (the
adapters and any per-task parts it carries). ``load_plan`` either returns a complete, ready
:class:`Plan` or raises :class:`PlanError` naming the problem; nothing is ever half-applied,
because a plan is a new object and the backbone is never modified.

plan.json, format_version 1::

    {
      "format_version": 1,
      "task": "vqa",                       # vqa | nlvr2 | retrieval
      "name": "skip4",                     # [A-Za-z0-9][A-Za-z0-9._-]*, at most 64 characters
      "version": 3,                        # integer >= 1; the built-in "full" plans are version 0
      "backbone": {"architecture": "vilt", "fingerprint": "sha256:..."},
      "skipped_layers": [2, 5],
      "adapters": {"skip_bottleneck": 192, "parallel_bottleneck": 96},   # null = none
      "head": {"own": true, "labels": ["yes", "no", ...]},               # labels: vqa/nlvr2 own heads
      "own_parts": ["pooler", "token_type_embeddings"],                  # copies the plan carries
      "weights_sha256": "...",
      "metrics": {"vqa_score": 0.71, "eval_split": "val",
                  "reference_input": {"text_len": 16, "image_size": 384},
                  "flops_full": 29.0e9, "flops_reduced": 21.1e9, "trainable_params": 1234567},
      "created_at": "2026-11-23T12:00:00Z"
    }

``skipped_layers`` index the backbone's DAS *arms* (``backbone.num_layers`` of them): for ViLT its
encoder layers 0..11; for METER its fusion layers, text side first: with n fusion layers per stream,
0..n-1 are the text-side layers and n..2n-1 the image-side ones (0-5 text, 6-11 image for METER-B).
The backbone fingerprint covers the architecture config, so a ViLT plan never loads on a METER.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.das.adapters import PlanModules
from models.tasks import TASKS

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
OWN_PARTS = ("pooler", "token_type_embeddings", "mma_adapters")  # mma_adapters: LaVIN's, in the kept decoder blocks
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "weights.safetensors"
FULL_PLAN_NAME = "full"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# plan.json comes from uploads and is served back by GET /plans/: bound what reading it costs. A
# ViLT-B VQA plan with its 3,129 labels is about 60 KB; nesting is 3 levels deep.
MAX_PLAN_JSON_BYTES = 1024 * 1024
MAX_PLAN_JSON_DEPTH = 32
MAX_METRICS_BYTES = 64 * 1024  # metrics, as compact JSON


class PlanError(ValueError):
    """A plan was refused. The message says which plan and what is wrong with it."""


class PlanBackbone(Protocol):
    """What plan validation needs to know about the backbone a plan is applied to."""

    architecture: str
    fingerprint: str
    num_layers: int
    device: torch.device
    dtype: torch.dtype

    def task_heads(self) -> dict[str, int | None]:
        """Tasks whose head the checkpoint carries -> number of labels (None for retrieval)."""

    def check_plan_spec(self, spec: PlanSpec) -> None:
        """Raise PlanError if the spec cannot run on this architecture (beyond the generic checks)."""

    def build_plan_modules(self, spec: PlanSpec) -> PlanModules:
        """Fresh, randomly initialised modules with the shapes the spec implies."""


@dataclass(frozen=True)
class BackboneRef:
    architecture: str
    fingerprint: str


@dataclass(frozen=True)
class AdapterShapes:
    skip_bottleneck: int | None = None
    parallel_bottleneck: int | None = None


@dataclass(frozen=True)
class PlanSpec:
    """The contents of plan.json, checked for internal consistency on construction."""

    task: str
    name: str
    version: int
    backbone: BackboneRef
    skipped_layers: tuple[int, ...] = ()
    adapters: AdapterShapes = AdapterShapes()
    own_head: bool = False
    labels: tuple[str, ...] | None = None
    own_parts: tuple[str, ...] = ()
    weights_sha256: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        where = f"plan {self.name!r}"
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise PlanError(
                f"{where}: unsupported format_version {self.format_version!r} "
                f"(this build reads {list(SUPPORTED_FORMAT_VERSIONS)})"
            )
        if self.task not in TASKS:
            raise PlanError(f"{where}: unknown task {self.task!r} (known: {', '.join(TASKS)})")
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise PlanError(
                f"invalid plan name {self.name!r}: use letters, digits, '.', '_' or '-', "
                "starting with a letter or digit, at most 64 characters"
            )
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 0:
            raise PlanError(f"{where}: version must be a non-negative integer, got {self.version!r}")
        layers = self.skipped_layers
        if any(not isinstance(i, int) or isinstance(i, bool) for i in layers):
            raise PlanError(f"{where}: skipped_layers must be integers, got {list(layers)}")
        if len(set(layers)) != len(layers):
            raise PlanError(f"{where}: skipped_layers has duplicates: {list(layers)}")
        if any(i < 0 for i in layers):
            raise PlanError(f"{where}: layer index out of range in skipped_layers: {list(layers)}")
        object.__setattr__(self, "skipped_layers", tuple(sorted(layers)))  # one canonical order
        for label, value in (
            ("skip_bottleneck", self.adapters.skip_bottleneck),
            ("parallel_bottleneck", self.adapters.parallel_bottleneck),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise PlanError(f"{where}: adapters.{label} must be a positive integer or null, got {value!r}")
        if layers and self.adapters.skip_bottleneck is None:
            raise PlanError(f"{where}: skips layers {list(layers)} but adapters.skip_bottleneck is null")
        unknown = set(self.own_parts) - set(OWN_PARTS)
        if unknown:
            raise PlanError(f"{where}: unknown own_parts {sorted(unknown)} (known: {', '.join(OWN_PARTS)})")
        if self.own_head and self.task in ("vqa", "nlvr2") and not self.labels:
            raise PlanError(f"{where}: carries its own {self.task} head but no label vocabulary (head.labels)")
        if self.task == "nlvr2" and self.labels is not None and len(self.labels) != 2:
            raise PlanError(f"{where}: an nlvr2 head has 2 labels, got {len(self.labels)}")
        if not self.own_head and self.labels is not None:
            raise PlanError(f"{where}: head.labels given but the plan carries no head of its own")
        try:
            metrics_bytes = len(json.dumps(self.metrics, separators=(",", ":")))
        except (TypeError, ValueError, RecursionError) as exc:  # not JSON data, circular, or far too deep
            raise PlanError(f"{where}: metrics must be JSON data ({exc})") from None
        if metrics_bytes > MAX_METRICS_BYTES:
            raise PlanError(f"{where}: metrics take {metrics_bytes} bytes as JSON; the limit is {MAX_METRICS_BYTES}")

    # -- derived ---------------------------------------------------------------------------
    @property
    def key(self) -> tuple[str, str, int]:
        return (self.task, self.name, self.version)

    @property
    def is_builtin(self) -> bool:
        return self.weights_sha256 is None

    # -- JSON ------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "task": self.task,
            "name": self.name,
            "version": self.version,
            "backbone": dataclasses.asdict(self.backbone),
            "skipped_layers": sorted(self.skipped_layers),
            "adapters": dataclasses.asdict(self.adapters),
            "head": {"own": self.own_head, "labels": list(self.labels) if self.labels is not None else None},
            "own_parts": list(self.own_parts),
            "weights_sha256": self.weights_sha256,
            "metrics": self.metrics,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json_dict(cls, data: Any, where: str = "plan.json") -> PlanSpec:
        if not isinstance(data, dict):
            raise PlanError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if "format_version" not in data:
            raise PlanError(f"{where}: missing field 'format_version'")
        if data["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
            raise PlanError(
                f"{where}: unsupported format_version {data['format_version']!r} "
                f"(this build reads {list(SUPPORTED_FORMAT_VERSIONS)})"
            )
        required = ("task", "name", "version", "backbone", "skipped_layers", "adapters", "head",
                    "weights_sha256", "metrics", "created_at")
        missing = [k for k in required if k not in data]
        if missing:
            raise PlanError(f"{where}: missing field(s) {', '.join(missing)}")
        try:
            backbone = BackboneRef(str(data["backbone"]["architecture"]), str(data["backbone"]["fingerprint"]))
            adapters = AdapterShapes(data["adapters"].get("skip_bottleneck"), data["adapters"].get("parallel_bottleneck"))
            head = data["head"]
            labels = head.get("labels")
            if not isinstance(data["skipped_layers"], list):
                raise TypeError("skipped_layers must be a list")
            if not isinstance(data["metrics"], dict):
                raise TypeError("metrics must be an object")
            return cls(
                format_version=data["format_version"],
                task=data["task"],
                name=data["name"],
                version=data["version"],
                backbone=backbone,
                skipped_layers=tuple(data["skipped_layers"]),
                adapters=adapters,
                own_head=bool(head.get("own", False)),
                labels=tuple(str(x) for x in labels) if labels is not None else None,
                own_parts=tuple(data.get("own_parts", ())),
                weights_sha256=data["weights_sha256"],
                metrics=data["metrics"],
                created_at=str(data["created_at"]),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise PlanError(f"{where}: malformed field: {exc}") from None


@dataclass(frozen=True)
class Plan:
    """A validated plan ready to run: its spec and its modules on the backbone's device/dtype."""

    spec: PlanSpec
    modules: PlanModules
    path: Path | None = None

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.spec.version

    @property
    def skipped_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.spec.skipped_layers))


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def builtin_full_plan(backbone: PlanBackbone, task: str) -> Plan:
    """The no-skip, no-adapter plan every task with a checkpoint head gets for free."""
    if task not in backbone.task_heads():
        raise PlanError(f"no built-in '{FULL_PLAN_NAME}' plan for {task!r}: the backbone checkpoint has no {task} head")
    spec = PlanSpec(
        task=task,
        name=FULL_PLAN_NAME,
        version=0,
        backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
        metrics={"trainable_params": 0},
        created_at="builtin",
    )
    return Plan(spec=spec, modules=PlanModules())


def read_plan_spec(path: str | os.PathLike) -> PlanSpec:
    """Read and check plan.json alone (no backbone needed): for `das plan inspect`."""
    directory = Path(path)
    if not directory.is_dir():
        raise PlanError(f"{directory}: not a plan directory (expected a folder with {PLAN_FILE} and {WEIGHTS_FILE})")
    plan_json = directory / PLAN_FILE
    if not plan_json.is_file():
        raise PlanError(f"{directory}: missing file {PLAN_FILE}")
    with open(plan_json, "rb") as f:
        raw = f.read(MAX_PLAN_JSON_BYTES + 1)  # no more than the limit is ever read
    if len(raw) > MAX_PLAN_JSON_BYTES:
        raise PlanError(f"{plan_json}: over {MAX_PLAN_JSON_BYTES} bytes; the limit for {PLAN_FILE} is {MAX_PLAN_JSON_BYTES}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        data = None  # nested far too deep for the parser: refused below with the limit
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and ints over Python's digit limit
        raise PlanError(f"{plan_json}: not valid JSON ({exc})") from None
    if data is None or _json_depth(data) > MAX_PLAN_JSON_DEPTH:
        raise PlanError(f"{plan_json}: JSON nested more than {MAX_PLAN_JSON_DEPTH} levels deep; "
                        f"the limit is {MAX_PLAN_JSON_DEPTH}")
    return PlanSpec.from_json_dict(data, where=str(plan_json))


def _json_depth(data: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion; stops past the limit."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > MAX_PLAN_JSON_DEPTH:
                return deepest
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def check_compatible(spec: PlanSpec, backbone: PlanBackbone) -> None:
    """Checks of the spec against the backbone (no weights read)."""
    where = f"plan {spec.task}/{spec.name} v{spec.version}"
    if spec.backbone.architecture != backbone.architecture:
        raise PlanError(
            f"{where}: made for a {spec.backbone.architecture!r} backbone, this backbone is {backbone.architecture!r}"
        )
    if spec.backbone.fingerprint != backbone.fingerprint:
        raise PlanError(
            f"{where}: wrong backbone fingerprint: the plan was made for {spec.backbone.fingerprint[:19]}..., "
            f"the loaded backbone is {backbone.fingerprint[:19]}..."
        )
    out_of_range = [i for i in spec.skipped_layers if not 0 <= i < backbone.num_layers]
    if out_of_range:
        raise PlanError(
            f"{where}: layer index out of range in skipped_layers: {out_of_range} "
            f"(the backbone has layers 0..{backbone.num_layers - 1})"
        )
    if not spec.own_head and spec.task not in backbone.task_heads():
        raise PlanError(f"{where}: carries no {spec.task} head and the backbone checkpoint has none")
    backbone.check_plan_spec(spec)


def _check_weight_shapes(spec: PlanSpec, weights_path: Path, expected: dict[str, torch.Size]) -> None:
    where = f"plan {spec.task}/{spec.name} v{spec.version}"
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            found = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt header
        raise PlanError(f"{where}: {WEIGHTS_FILE} is not a readable safetensors file ({exc})") from None
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise PlanError(f"{where}: {WEIGHTS_FILE} lacks tensors the plan.json implies: {missing[:8]}")
    if unexpected:
        raise PlanError(f"{where}: {WEIGHTS_FILE} has tensors plan.json does not declare: {unexpected[:8]}")
    for key, shape in expected.items():
        if found[key] != shape:
            raise PlanError(
                f"{where}: shape mismatch for {key}: file has {list(found[key])}, plan.json and the backbone imply {list(shape)}"
            )


def validate_plan(path: str | os.PathLike, backbone: PlanBackbone) -> PlanSpec:
    """Every check `load_plan` makes, without building modules. Returns the spec or raises PlanError."""
    directory = Path(path)
    spec = read_plan_spec(directory)
    weights_path = directory / WEIGHTS_FILE
    where = f"plan {spec.task}/{spec.name} v{spec.version}"
    if spec.name == FULL_PLAN_NAME:
        raise PlanError(f"{where}: the name '{FULL_PLAN_NAME}' is reserved for the built-in plans")
    if spec.version < 1:
        raise PlanError(f"{where}: version must be >= 1 (0 is the built-in plans')")
    if not weights_path.is_file():
        raise PlanError(f"{directory}: missing file {WEIGHTS_FILE}")
    actual = sha256_file(weights_path)
    if actual != spec.weights_sha256:
        raise PlanError(
            f"{where}: checksum mismatch for {WEIGHTS_FILE}: plan.json says {str(spec.weights_sha256)[:16]}..., "
            f"the file hashes to {actual[:16]}..."
        )
    check_compatible(spec, backbone)
    with torch.device("meta"):
        expected_modules = backbone.build_plan_modules(spec)
    _check_weight_shapes(spec, weights_path, {k: v.shape for k, v in expected_modules.state_dict().items()})
    return spec


def load_plan(path: str | os.PathLike, backbone: PlanBackbone) -> Plan:
    """Validate a plan directory fully, then build its modules on the backbone's device and dtype."""
    directory = Path(path)
    spec = validate_plan(directory, backbone)
    modules = backbone.build_plan_modules(spec)
    state = load_file(str(directory / WEIGHTS_FILE))
    modules.load_state_dict(state, strict=True)
    modules.to(device=backbone.device, dtype=backbone.dtype).eval().requires_grad_(False)
    return Plan(spec=spec, modules=modules, path=directory.resolve())


def save_plan(path: str | os.PathLike, spec: PlanSpec, modules: PlanModules, overwrite: bool = False) -> PlanSpec:
    """Write a plan directory atomically (a temporary sibling renamed into place).

    ``weights_sha256`` and (when empty) ``created_at`` are filled in here; the returned spec is what
    plan.json holds.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in modules.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE))
        spec = dataclasses.replace(
            spec, weights_sha256=sha256_file(staging / WEIGHTS_FILE), created_at=spec.created_at or utc_now()
        )
        (staging / PLAN_FILE).write_text(json.dumps(spec.to_json_dict(), indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return spec
