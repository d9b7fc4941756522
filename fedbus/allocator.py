"""Keep glibc's allocator from holding on to freed model-sized memory.

A large body arrives as ~1 MiB chunk messages, is opened and decoded in worker threads,
and is freed a round later. glibc serves allocations above its mmap threshold with
``mmap`` and returns them to the OS on free, but the threshold is dynamic: after the
first such free it rises to the freed size (up to 32 MiB), and from then on the chunks
come from the heap and from per-thread arenas, where freed memory stays in the
process's RSS. A fixed threshold (which also turns the dynamic one off) keeps every
buffer of at least ``MMAP_THRESHOLD`` mapped and unmapped, so what a round frees goes
back; smaller allocations are unaffected. (Not lower: at 256 KiB every ~1 MiB chunk
message was mapped and unmapped, which measured a 40 MB round 1.8x slower; at 4 MiB the
rounds are as fast as without tuning and the coordinator's peak RSS is ~40% lower:
benchmarks/big_payload.py.) Elsewhere than glibc this does nothing, nor
with ``FEDBUS_MALLOC_DEFAULT=1`` in the environment (to measure the difference).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import structlog

log = structlog.get_logger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024

_done = False


def keep_large_buffers_mapped() -> bool:
    """Fix glibc's mmap threshold (once per process); False where that is not possible."""
    global _done
    if _done:
        return True
    if os.environ.get("FEDBUS_MALLOC_DEFAULT") == "1":  # to measure the difference
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _done = ok
    if not ok:
        log.debug("allocator.untuned")
    return ok
