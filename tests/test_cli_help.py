"""`das --help` and every `das COMMAND [SUBCOMMAND] --help` answer at once: the parser is built from light
modules, torch and transformers load only when a command runs."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.cli.main import build_parser

REPO = Path(__file__).resolve().parent.parent


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser tree: (), ("plan",), ("plan", "inspect"), ..."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, prefix + (name,))
    return paths


PATHS = command_paths(build_parser())


def test_building_the_parser_loads_neither_torch_nor_transformers():
    code = ("import sys; from models.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'PIL', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_tree_has_every_command():
    assert {p[0] for p in PATHS if p} == {"plan", "flops", "bench", "pretrain", "search", "train", "eval", "pipeline",
                                         "data", "meter", "lavin", "llava"}
    assert {("plan", "inspect"), ("plan", "validate"), ("data", "synth"), ("meter", "convert"), ("lavin", "convert"),
            ("llava", "pipeline")} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "das")
def test_help_answers_at_once(path):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "models.cli.main", *path, "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: das" + "".join(" " + p for p in path))
    assert seconds < 3, f"`das {' '.join(path)} --help` took {seconds:.1f} s"
