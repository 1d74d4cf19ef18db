"""service/config.py: every DAS_* setting parsed and checked once, in one place, and documented.

Checked here: the defaults, the error naming the variable and what it allows, that no other module
of service/ reads the environment or names a DAS_* variable, that docs/configuration.md lists exactly
the settings with their defaults, and that importing the service pulls in no offline tooling.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import (
    DEFAULT_BACKBONE,
    DEFAULTS,
    DTYPES,
    QUEUE_WITHOUT_CAP,
    Settings,
    SettingsError,
    documented_default,
    settings_table,
)
from service.memory import MAX_MMAP_THRESHOLD

REPO = Path(__file__).resolve().parent.parent
SERVICE = REPO / "service"
CONFIG = SERVICE / "config.py"
DOC = REPO / "docs" / "configuration.md"
ENV_NAMES = {f.metadata["env"] for f in dataclasses.fields(Settings)}


def test_every_field_names_a_das_variable_with_a_parser_and_a_one_line_doc():
    assert len(ENV_NAMES) == len(dataclasses.fields(Settings))
    for f in dataclasses.fields(Settings):
        assert re.fullmatch(r"DAS_[A-Z0-9_]+", f.metadata["env"]), f.name
        assert callable(f.metadata["parser"]) and f.metadata["parser"].allowed, f.name
        doc = f.metadata["doc"]
        assert doc and "\n" not in doc, f.name


def test_an_empty_environment_gives_the_defaults():
    settings = Settings.from_env({"HOME": "/root", "OTHER_DAS_WORKERS": "7"})
    assert settings == DEFAULTS == Settings()
    assert settings.backbone == DEFAULT_BACKBONE and settings.plans is None and settings.admin_token == ""
    assert (settings.workers, settings.max_batch_size, settings.max_latency_ms) == (1, 16, 0)
    assert (settings.max_concurrency, settings.max_queue, settings.torch_threads) == (64, 64, None)
    assert (settings.header_timeout_s, settings.malloc_trim_s, settings.malloc_threshold) == (10.0, 10.0, 0)
    assert (settings.max_image_pixels, settings.max_image_bytes, settings.max_candidates) == (40_000_000, 20 << 20, 100)
    assert (settings.max_body_bytes, settings.max_plan_archive_bytes) == (64 << 20, 256 << 20)


def test_values_are_parsed_into_their_types():
    settings = Settings.from_env({
        "DAS_BACKBONE": "plans/meter/backbone", "DAS_PLANS": "/srv/plans", "DAS_DEVICE": "cuda:1",
        "DAS_DTYPE": "bfloat16", "DAS_ADMIN_TOKEN": "s3cret", "DAS_WORKERS": "2", "DAS_TORCH_THREADS": " 3 ",
        "DAS_MAX_CONCURRENCY": "0", "DAS_HEADER_TIMEOUT_S": "2.5", "DAS_MALLOC_THRESHOLD": str(MAX_MMAP_THRESHOLD),
    })
    assert settings.backbone == Path("plans/meter/backbone") and settings.plans == Path("/srv/plans")
    assert (settings.device, settings.dtype, settings.admin_token) == ("cuda:1", "bfloat16", "s3cret")
    assert (settings.workers, settings.torch_threads, settings.header_timeout_s) == (2, 3, 2.5)
    assert settings.max_queue == QUEUE_WITHOUT_CAP  # no in-flight cap: the queue's own default
    assert settings.malloc_threshold == MAX_MMAP_THRESHOLD
    assert "s3cret" not in repr(settings)  # the token stays out of logs
    assert Settings.from_env({"DAS_MAX_CONCURRENCY": "8", "DAS_MAX_QUEUE": "3"}).max_queue == 3
    assert Settings.from_env({"DAS_MAX_CONCURRENCY": "8"}).max_queue == 8


@pytest.mark.parametrize("blank", ["", "  "])
def test_optional_settings_read_blank_as_unset(blank):
    settings = Settings.from_env({"DAS_TORCH_THREADS": blank, "DAS_PLANS": blank, "DAS_ADMIN_TOKEN": ""})
    assert (settings.torch_threads, settings.plans, settings.admin_token) == (None, None, "")


@pytest.mark.parametrize("name, raw, allowed", [
    ("DAS_WORKERS", "0", "an integer >= 1"),
    ("DAS_WORKERS", "two", "an integer >= 1"),
    ("DAS_WORKERS", "1.5", "an integer >= 1"),
    ("DAS_TORCH_THREADS", "0", "an integer >= 1 (or empty: the default)"),
    ("DAS_MAX_BATCH_SIZE", "0", "an integer >= 1"),
    ("DAS_MAX_LATENCY_MS", "-1", "an integer >= 0"),
    ("DAS_MAX_CONCURRENCY", "-1", "an integer >= 0"),
    ("DAS_MAX_QUEUE", "0", "an integer >= 1"),
    ("DAS_MAX_QUEUE", "", "an integer >= 1"),
    ("DAS_MAX_IMAGE_PIXELS", "lots", "an integer >= 1"),
    ("DAS_MAX_IMAGE_BYTES", "0", "an integer >= 1"),
    ("DAS_MAX_CANDIDATES", "-3", "an integer >= 1"),
    ("DAS_MAX_BODY_BYTES", "64MiB", "an integer >= 1"),
    ("DAS_MAX_PLAN_ARCHIVE_BYTES", "", "an integer >= 1"),
    ("DAS_MALLOC_THRESHOLD", "-5", f"0 (off) or 1..{MAX_MMAP_THRESHOLD} bytes"),
    ("DAS_MALLOC_THRESHOLD", str(MAX_MMAP_THRESHOLD + 1), f"0 (off) or 1..{MAX_MMAP_THRESHOLD} bytes"),
    ("DAS_MALLOC_TRIM_S", "soon", "a number of seconds >= 0 (0: never trim)"),
    ("DAS_MALLOC_TRIM_S", "-1", "a number of seconds >= 0 (0: never trim)"),
    ("DAS_MALLOC_TRIM_S", "inf", "a number of seconds >= 0 (0: never trim)"),
    ("DAS_HEADER_TIMEOUT_S", "nan", "a number of seconds >= 0 (0: no limit)"),
    ("DAS_DEVICE", "tpu", "one of auto, cpu, cuda or cuda:<index>"),
    ("DAS_DEVICE", "cuda:x", "one of auto, cpu, cuda or cuda:<index>"),
    ("DAS_DTYPE", "fp16", "one of float32, float16, bfloat16"),
    ("DAS_BACKBONE", " ", "a path"),
])
def test_a_bad_value_names_the_variable_and_what_it_allows(name, raw, allowed):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: raw})
    assert str(info.value).startswith(f"{name} must be {allowed}")
    assert str(info.value) == f"{name} must be {allowed}, got {raw!r}"
    assert (info.value.name, info.value.raw) == (name, raw)


def test_the_dtypes_are_those_the_backbones_know():
    from models.backbones.base import DTYPES as BACKBONE_DTYPES

    assert set(DTYPES) == set(BACKBONE_DTYPES)


# ---------------------------------------------------------------------------------------------
# only service/config.py reads the environment
# ---------------------------------------------------------------------------------------------
def _reads_of_the_environment(tree: ast.AST) -> list[int]:
    """Lines that touch os.environ / os.getenv / os.putenv (by attribute or by name)."""
    names = {"environ", "getenv", "environb", "putenv", "unsetenv"}
    return [node.lineno for node in ast.walk(tree)
            if (isinstance(node, ast.Attribute) and node.attr in names)
            or (isinstance(node, ast.Name) and node.id in names)
            or (isinstance(node, ast.alias) and node.name in names)]


def test_only_config_reads_das_variables():
    offenders = []
    for source in sorted(SERVICE.rglob("*.py")):
        if source == CONFIG:
            continue
        tree = ast.parse(source.read_text(), filename=str(source))
        offenders += [f"{source.relative_to(REPO)}:{line} reads the environment" for line in _reads_of_the_environment(tree)]
        offenders += [f"{source.relative_to(REPO)}:{node.lineno} names {node.value}" for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and isinstance(node.value, str)
                      and re.fullmatch(r"DAS_[A-Z0-9_]+", node.value)]
    assert not offenders, "\n".join(offenders)


def test_every_das_literal_of_the_service_is_a_setting_of_config():
    """What tests/test_deploy.py's env_names_the_service_reads() collects: all of it in config.py."""
    literal = re.compile(r"""["'](DAS_[A-Z0-9_]+)["']""")
    in_config = set(literal.findall(CONFIG.read_text()))
    everywhere = {name for source in SERVICE.glob("*.py") for name in literal.findall(source.read_text())}
    assert everywhere == in_config == ENV_NAMES


# ---------------------------------------------------------------------------------------------
# docs/configuration.md lists exactly these settings, with these defaults
# ---------------------------------------------------------------------------------------------
def _documented() -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(DAS_[A-Z0-9_]+)`", cells[0]) if len(cells) >= 3 else None
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} is listed twice"
            rows[match.group(1)] = cells[1]
    return rows


def test_the_configuration_doc_lists_exactly_the_settings_and_their_defaults():
    documented = _documented()
    assert set(documented) == ENV_NAMES, (
        f"missing from {DOC.name}: {sorted(ENV_NAMES - set(documented))}; "
        f"not settings: {sorted(set(documented) - ENV_NAMES)}")
    expected = {row["env"]: row["default"] for row in settings_table()}
    wrong = {name: (documented[name], expected[name]) for name in ENV_NAMES if documented[name] != expected[name]}
    assert not wrong, f"(documented, config.py) defaults differ: {wrong}"


def test_documented_defaults_follow_the_values():
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert documented_default(fields["backbone"]) == "`plans/backbone`"
    assert documented_default(fields["max_image_bytes"]) == "20 MiB"
    assert documented_default(fields["malloc_trim_s"]) == "`10`"
    assert documented_default(fields["torch_threads"]) == "unset"
    assert documented_default(fields["admin_token"]) == "unset"


# ---------------------------------------------------------------------------------------------
# the service imports only its serving core
# ---------------------------------------------------------------------------------------------
def test_importing_the_service_pulls_in_no_offline_tooling():
    """transformers itself imports tqdm (its hub and generation utilities: `import transformers`
    alone puts it in sys.modules), so tqdm cannot be asserted absent; what the service must not load
    is the project's offline tooling (models.producer, models.bench, models.cli, whose progress bars
    and plots are what used tqdm and matplotlib) and matplotlib."""
    probe = ("import sys, service.service\n"
             "print('\\n'.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(done.stdout.split())
    tooling = sorted(m for m in loaded if m.split(".")[:2] in (["models", "producer"], ["models", "bench"], ["models", "cli"]))
    assert not tooling, tooling
    assert "matplotlib" not in loaded
    assert "service.config" in loaded and "service.store" in loaded  # the probe did import the service
