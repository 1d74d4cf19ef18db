"""Worker memory that stays flat under a varied request mix (glibc's malloc only).

glibc serves allocations above a threshold (128 KiB at start) with their own mmap and returns them to
the system on free, but each such free *raises* the threshold to that size (up to 32 MiB). After the
first large decoded image or batch tensor, buffers of a few MiB come from the heap instead, and freed
heap space below a live allocation is kept. A service whose inputs vary in size (thumbnails to
1024x768 uploads, batches of 1 to 16) then grows for minutes after start: +6-11% of worker memory
over 50 swaps under load in `make loadtest-hotswap`, with or without `MALLOC_ARENA_MAX=2`. Pinning the
threshold (``mallopt``, which also switches the adjustment off) keeps large buffers on mmap, returned
on free: +4.4% in the same run, flat after warm-up. The cost is an mmap/munmap pair per buffer over
the threshold, small next to the model work on that buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses more


def pin_malloc_thresholds(threshold_bytes: int) -> bool:
    """Fix glibc's mmap and trim thresholds at ``threshold_bytes`` for this process. Returns whether they
    were set (False off glibc, e.g. macOS or musl, where there is nothing to do)."""
    if not 0 < threshold_bytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"the malloc threshold must be in 1..{MAX_MMAP_THRESHOLD} bytes, got {threshold_bytes}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1 and mallopt(M_TRIM_THRESHOLD, threshold_bytes) == 1
