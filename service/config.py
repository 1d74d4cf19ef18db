"""Every setting of the service: the ``DAS_*`` environment variables, parsed and validated once.

:meth:`Settings.from_env` reads them into a frozen :class:`Settings`; ``service.service`` does so
once, at import (``SETTINGS``), stops with :class:`SettingsError`'s message on a bad value, and
hands the values down: no other module reads the environment. Each field names its variable, how
it is parsed (one helper per kind: :func:`integer`, :func:`seconds`, :func:`choice`, :func:`path`,
:func:`text`, and :func:`optional` around any of them) and a one-line doc; docs/configuration.md
lists exactly these variables with these defaults (tests/test_config.py checks it).

This module is imported by every other one of the package for the defaults (``DEFAULTS``), so it
imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.memory import MAX_MMAP_THRESHOLD

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLANS = REPO_ROOT / "plans"
DEFAULT_BACKBONE = DEFAULT_PLANS / "backbone"
MIB = 1 << 20
DEVICES = ("auto", "cpu", "cuda")  # and cuda:<index>; as models.backbones.base.resolve_device takes them
DTYPES = ("float32", "float16", "bfloat16")  # the names models.backbones.base.DTYPES knows
QUEUE_WITHOUT_CAP = 256  # DAS_MAX_QUEUE's default when DAS_MAX_CONCURRENCY is 0 (no in-flight cap)

class SettingsError(ValueError):
    """A DAS_* variable with a value that does not parse or is out of range. The message names the
    variable, what it allows and what it got: ``DAS_WORKERS must be an integer >= 1, got '0'``."""

    def __init__(self, name: str, allowed: str, raw: str) -> None:
        self.name, self.allowed, self.raw = name, allowed, raw
        super().__init__(f"{name} must be {allowed}, got {raw!r}")


@dataclass(frozen=True)
class Parser:
    """How one kind of setting is read: ``convert`` turns the raw string into the value, raising
    ValueError when it is not ``allowed`` (what the error message says)."""

    allowed: str
    convert: Callable[[str], Any]

    def __call__(self, name: str, raw: str) -> Any:
        try:
            return self.convert(raw)
        except ValueError:
            raise SettingsError(name, self.allowed, raw) from None


def _within(value: float, low: float | None, high: float | None) -> Any:
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(value)
    return value


# -- one parser per kind ------------------------------------------------------------------------
def integer(minimum: int | None = None, maximum: int | None = None, allowed: str | None = None) -> Parser:
    """An integer within [minimum, maximum]; ``allowed`` describes the range in the error message."""
    bounds = [f">= {minimum}"] * (minimum is not None) + [f"<= {maximum}"] * (maximum is not None)
    return Parser(allowed or " ".join(["an integer", " and ".join(bounds)]).strip(),
                  lambda raw: _within(int(raw), minimum, maximum))


def seconds(meaning_of_zero: str) -> Parser:
    """A finite number of seconds >= 0; ``meaning_of_zero`` says what 0 does."""
    return Parser(f"a number of seconds >= 0 (0: {meaning_of_zero})", lambda raw: _within(float(raw), 0, None))


def choice(values: tuple[str, ...], pattern: str | None = None, shown: str | None = None) -> Parser:
    """One of ``values``, or a full match of ``pattern`` (described by ``shown``); blanks stripped."""

    def convert(raw: str) -> str:
        value = raw.strip()
        if value in values or (pattern is not None and re.fullmatch(pattern, value)):
            return value
        raise ValueError(raw)

    return Parser(f"one of {', '.join(values)}" + (f" or {shown}" if shown else ""), convert)


def path() -> Parser:
    """A filesystem path, as given (a relative one is relative to the working directory)."""

    def convert(raw: str) -> Path:
        if not raw.strip():
            raise ValueError(raw)
        return Path(raw)

    return Parser("a path", convert)


def text() -> Parser:
    """Any string, as given."""
    return Parser("a string", str)


def optional(parser: Parser) -> Parser:
    """``parser``, or None (the field's default) when the variable is empty or blanks only."""
    return Parser(f"{parser.allowed} (or empty: the default)",
                  lambda raw: None if not raw.strip() else parser.convert(raw))


def env(name: str, parser: Parser, doc: str, shown: str | None = None) -> dict[str, Any]:
    """A Settings field's metadata: its variable, parser and one-line doc. ``shown``: how
    docs/configuration.md states a default worked out at start (else see documented_default)."""
    return {"env": name, "parser": parser, "doc": doc, "shown": shown}


@dataclass(frozen=True)
class Settings:
    """The service's settings, one field per DAS_* variable (``Settings.from_env()``)."""

    # model and plans
    backbone: Path = field(default=DEFAULT_BACKBONE, metadata=env(
        "DAS_BACKBONE", path(), "backbone checkpoint directory (Hugging Face layout; ViLT or METER)"))
    plans: Path | None = field(default=None, metadata=env(
        "DAS_PLANS", optional(path()), "plan store directory; unset: the store the backbone directory sits in "
                                       "(service.store.default_store_for), else plans/", shown="the backbone's store"))
    device: str = field(default="auto", metadata=env(
        "DAS_DEVICE", choice(DEVICES, r"cuda:\d+", "cuda:<index>"), "torch device; auto: CUDA when present"))
    dtype: str = field(default="float32", metadata=env("DAS_DTYPE", choice(DTYPES), "dtype of weights and activations"))
    admin_token: str = field(default="", repr=False, metadata=env(
        "DAS_ADMIN_TOKEN", text(), "bearer token of the admin API; empty: the admin API is disabled"))
    # workers, batching and overload
    workers: int = field(default=1, metadata=env("DAS_WORKERS", integer(1), "BentoML worker processes"))
    torch_threads: int | None = field(default=None, metadata=env(
        "DAS_TORCH_THREADS", optional(integer(1)), "torch threads per worker; unset: torch's default (one per core)"))
    max_batch_size: int = field(default=16, metadata=env(
        "DAS_MAX_BATCH_SIZE", integer(1), "most requests in one model batch"))
    max_latency_ms: int = field(default=0, metadata=env(
        "DAS_MAX_LATENCY_MS", integer(0), "extra wait (ms) for batch-mates when a batch would start on an idle model"))
    max_concurrency: int = field(default=64, metadata=env(
        "DAS_MAX_CONCURRENCY", integer(0), "in-flight HTTP requests per worker; past it a 429 (0: no cap)"))
    max_queue: int | None = field(default=None, metadata=env(  # None: worked out in __post_init__
        "DAS_MAX_QUEUE", integer(1), "requests a worker holds (waiting or running); past it a 503",
        shown=f"`DAS_MAX_CONCURRENCY`, or `{QUEUE_WITHOUT_CAP}` when that is `0`"))
    header_timeout_s: float = field(default=10.0, metadata=env(
        "DAS_HEADER_TIMEOUT_S", seconds("no limit"), "seconds a connection may take to send a request's headers"))
    # input limits
    max_image_pixels: int = field(default=40_000_000, metadata=env(
        "DAS_MAX_IMAGE_PIXELS", integer(1), "decoded pixels per image (decompression bombs)"))
    max_image_bytes: int = field(default=20 * MIB, metadata=env(
        "DAS_MAX_IMAGE_BYTES", integer(1), "bytes per uploaded image file"))
    max_candidates: int = field(default=100, metadata=env(
        "DAS_MAX_CANDIDATES", integer(1), "retrieval candidates per request"))
    max_body_bytes: int = field(default=64 * MIB, metadata=env(
        "DAS_MAX_BODY_BYTES", integer(1), "bytes per inference request body"))
    max_plan_archive_bytes: int = field(default=256 * MIB, metadata=env(
        "DAS_MAX_PLAN_ARCHIVE_BYTES", integer(1), "unpacked bytes of an uploaded plan archive"))
    # generative backbones (POST /v1/chat/completions)
    max_new_tokens: int = field(default=256, metadata=env(
        "DAS_MAX_NEW_TOKENS", integer(1), "most tokens a chat completion may generate (max_tokens' cap and default)"))
    max_messages: int = field(default=64, metadata=env(
        "DAS_MAX_MESSAGES", integer(1), "messages per chat completion request"))
    max_prompt_chars: int = field(default=32_000, metadata=env(
        "DAS_MAX_PROMPT_CHARS", integer(1), "characters of text over all messages of a chat completion request"))
    max_request_images: int = field(default=4, metadata=env(
        "DAS_MAX_REQUEST_IMAGES", integer(1), "images per chat completion request"))
    # memory
    malloc_trim_s: float = field(default=10.0, metadata=env(
        "DAS_MALLOC_TRIM_S", seconds("never trim"), "how often each worker returns its heap's free pages"))
    malloc_threshold: int = field(default=0, metadata=env(
        "DAS_MALLOC_THRESHOLD", integer(0, MAX_MMAP_THRESHOLD, f"0 (off) or 1..{MAX_MMAP_THRESHOLD} bytes"),
        "bytes; pins glibc's mmap and trim thresholds (0: glibc's own)"))

    def __post_init__(self) -> None:
        if self.max_queue is None:  # by default the in-flight cap: the cheap 429 at the door sheds first
            object.__setattr__(self, "max_queue", self.max_concurrency or QUEUE_WITHOUT_CAP)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """The settings the environment gives: each DAS_* variable parsed and checked, the default
        where it is unset. SettingsError (naming the variable and what it allows) on a bad value."""
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None:
                values[f.name] = f.metadata["parser"](f.metadata["env"], raw)
        return cls(**values)


DEFAULTS = Settings()  # every setting at its default: the limits a module uses when none is handed to it


def settings_table() -> list[dict[str, str]]:
    """One row per setting: variable, field, documented default, what is allowed, doc."""
    return [{"env": f.metadata["env"], "field": f.name, "default": documented_default(f),
             "allowed": f.metadata["parser"].allowed, "doc": f.metadata["doc"]} for f in dataclasses.fields(Settings)]


def documented_default(f: dataclasses.Field) -> str:
    """A field's default as docs/configuration.md states it: ``shown`` when it is worked out at start,
    'unset' for None or an empty string, a path relative to the repository, whole MiB as 'N MiB',
    else the value in backticks (10.0 as `10`)."""
    if f.metadata["shown"]:
        return f.metadata["shown"]
    value = f.default
    if value is None or value == "":
        return "unset"
    if isinstance(value, Path):
        return f"`{value.relative_to(REPO_ROOT).as_posix()}`"
    if isinstance(value, int) and value >= MIB and value % MIB == 0:
        return f"{value // MIB} MiB"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"
