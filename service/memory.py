"""Worker memory that stays flat under a varied request mix (glibc's malloc only).

Two tools. The default is :func:`trim_heap`, called every ``DAS_MALLOC_TRIM_S`` seconds by each
worker: it hands the free pages inside the heap back to the system (``malloc_trim``), so memory
kept after a burst of large inputs is returned within seconds, at the cost of page faults once per
trim when the pages are used again. The older one, :func:`pin_malloc_thresholds`
(``DAS_MALLOC_THRESHOLD``, now off by default), is explained below; it keeps memory flat too, but
every buffer over the threshold then costs an mmap, page faults on every touch, and a munmap:
measured in one process, switching between thresholds (2026-11-23), a 1 MiB pin made a ViLT-B/32
forward pass 13% slower at batch 1 (522 against 461 ms) and 10% at batch 8, and the embedded model
40% slower at batch 16 (58 against 42 ms). Activations of a few MiB are exactly what it pushes
onto mmap.

glibc serves allocations above a threshold (128 KiB at start) with their own mmap and returns them to
the system on free, but each such free *raises* the threshold to that size (up to 32 MiB). After the
first large decoded image or batch tensor, buffers of a few MiB come from the heap instead, and freed
heap space below a live allocation is kept. A service whose inputs vary in size (thumbnails to
1024x768 uploads, batches of 1 to 16) then grows for minutes after start: +6-11% of worker memory
over 50 swaps under load in `make loadtest-hotswap`, with or without `MALLOC_ARENA_MAX=2`. Pinning the
threshold (``mallopt``, which also switches the adjustment off) keeps large buffers on mmap, returned
on free: +4.4% in the same run, flat after warm-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses more


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where it is not the C library this process uses (or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_heap() -> bool:
    """Return the free memory of every malloc arena to the system, inside the heap as well as at its
    top (glibc's ``malloc_trim(0)``). Returns whether anything was released (False off glibc)."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return malloc_trim(0) == 1


def pin_malloc_thresholds(threshold_bytes: int) -> bool:
    """Fix glibc's mmap and trim thresholds at ``threshold_bytes`` for this process. Returns whether they
    were set (False off glibc, e.g. macOS or musl, where there is nothing to do)."""
    if not 0 < threshold_bytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"the malloc threshold must be in 1..{MAX_MMAP_THRESHOLD} bytes, got {threshold_bytes}")
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1 and mallopt(M_TRIM_THRESHOLD, threshold_bytes) == 1
