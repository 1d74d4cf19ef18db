"""The Makefile's user-facing targets say and do what the README promises (dry runs; nothing is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str) -> str:
    done = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_help_prints_the_real_torch_spec_and_aligned_targets():
    out = make("help", "TORCH_SPEC=torch==9.9.9 --index-url file:///x")
    assert "torch==9.9.9 --index-url file:///x" in out and "$(TORCH_SPEC)" not in out
    rows = [line for line in out.splitlines() if line.strip()]
    assert {"serve", "test", "help"} <= {row.split()[0] for row in rows}
    # every description starts in the same column
    columns = {re.match(r"\s*\S+\s+", row).end() for row in rows}
    assert len(columns) == 1, out


def test_make_serve_binds_localhost_unless_host_is_given():
    # -o: treat the install stamp as up to date, so the dry run prints only the serve command
    assert "--host 127.0.0.1 --port 3000" in make("-n", "-o", ".venv/.installed", "serve")
    assert "--host 0.0.0.0 --port 3001" in make("-n", "-o", ".venv/.installed", "serve", "HOST=0.0.0.0", "PORT=3001")
