"""service/memory.py: a periodic heap trim (the default) or pinned malloc thresholds keep freed large
buffers from staying in the worker's memory. Each scenario runs in its own interpreter (malloc settings are per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.memory import MAX_MMAP_THRESHOLD, pin_malloc_thresholds

REPO = Path(__file__).resolve().parent.parent
# One 8 MiB buffer freed (glibc then raises its mmap threshold to 8 MiB), then 40 buffers of 1.5 MiB
# of which all but the last are freed: the pattern of a large upload followed by smaller batches.
SCENARIO = r"""
import ctypes, json, sys
sys.path.insert(0, sys.argv[2])
from service.memory import pin_malloc_thresholds
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
from service.memory import trim_heap
pinned = pin_malloc_thresholds(1 << 20) if sys.argv[1] == "pin" else False
big = libc.malloc(8 << 20); ctypes.memset(big, 1, 8 << 20); libc.free(big)
base = rss()
chunks = [libc.malloc(3 << 19) for _ in range(40)]
for chunk in chunks:
    ctypes.memset(chunk, 1, 3 << 19)
peak = rss()
for chunk in chunks[:-1]:
    libc.free(chunk)
trimmed = trim_heap() if sys.argv[1] == "trim" else False
print(json.dumps({"pinned": pinned, "trimmed": trimmed, "grown": peak - base, "kept": rss() - base}))
"""


def _run(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", SCENARIO, mode, str(REPO)], capture_output=True, text=True,
                            timeout=120, check=True)
    return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_pinned_thresholds_return_freed_buffers_to_the_system():
    default, pinned = _run("default"), _run("pin")
    assert pinned["pinned"] is True
    assert pinned["grown"] > 50 << 20 and default["grown"] > 50 << 20  # 40 x 1.5 MiB were touched
    assert pinned["kept"] < 8 << 20, pinned  # only the one live buffer (and page-table noise) remains
    assert default["kept"] > 4 * max(pinned["kept"], 1 << 20), default  # the behaviour the pin exists to stop


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_a_heap_trim_returns_freed_buffers_without_a_pin():
    """The service's default (DAS_MALLOC_TRIM_S): glibc's own thresholds, so large activations stay off
    mmap, and a periodic malloc_trim hands what was freed inside the heap back to the system."""
    default, trimmed = _run("default"), _run("trim")
    assert trimmed["trimmed"] is True and trimmed["grown"] > 50 << 20
    assert trimmed["kept"] < 8 << 20, trimmed  # the last, live buffer sits on top of the freed ones
    assert default["kept"] > 4 * max(trimmed["kept"], 1 << 20), default


@pytest.mark.parametrize("value", [0, -1, MAX_MMAP_THRESHOLD + 1])
def test_thresholds_out_of_range_are_refused(value):
    with pytest.raises(ValueError, match="malloc threshold"):
        pin_malloc_thresholds(value)


def test_the_service_refuses_a_bad_setting_at_start():
    result = subprocess.run([sys.executable, "-c", "import service.service"], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, DAS_MALLOC_THRESHOLD="-5"))
    assert result.returncode != 0 and "DAS_MALLOC_THRESHOLD must be 0 (off) or 1.." in result.stderr, result.stderr


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_the_service_refuses_a_bad_trim_interval_at_start(value):
    result = subprocess.run([sys.executable, "-c", "import service.service"], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, DAS_MALLOC_TRIM_S=value))
    assert result.returncode != 0 and "DAS_MALLOC_TRIM_S must be" in result.stderr, result.stderr
