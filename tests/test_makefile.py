"""The Makefile's user-facing targets say and do what the README promises (dry runs; nothing is installed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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


def test_make_gpu_check_runs_the_one_script_and_its_dry_run_works_without_a_gpu(tmp_path):
    """`make gpu-check` is scripts/gpu_check.sh; its --dry-run (no GPU) collects the CUDA tests, checks the
    bench target and writes the summary file naming both steps; bad arguments are refused."""
    assert "scripts/gpu_check.sh" in make("-n", "-o", ".venv/.installed", "gpu-check")
    env = dict(os.environ, VENV=str(Path(sys.executable).parent.parent), PY=sys.executable,
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "| cuda-tests | dry-run |" in summary and "| bench | dry-run |" in summary
    assert "-m cuda" in summary and "BENCH_DEVICE=cuda BENCH_DTYPE=float16 BENCH_SHORT=1" in summary
    assert "| collect | ok:" in summary  # the CUDA tests are collected (and would skip here with a reason)
    bad = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--bogus"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_cuda_tests_skip_on_cpu_with_a_reason():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA tests run instead")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "tests/test_cuda.py",
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "needs a CUDA GPU" in done.stdout and "skipped" in done.stdout

