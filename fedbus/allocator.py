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

Large buffers are also backed by transparent huge pages where the kernel offers them
(``madvise`` mode, the common default). A model-sized buffer is written once, right
after it is allocated (a blob read, the lean sums, a worker's copy of the model), and with
4 KiB pages most of that time is page faults: filling a fresh 200 MB buffer measured
0.7-1.4 s with ``bytearray`` on the benchmark machine under load and 0.07-0.10 s with a
huge-page mapping (``large_buffer``); torch's own allocations of 2 MiB and more measured
~3x faster to allocate and first touch with ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's switch
for the same advice, read once, at torch's first allocation: ``prefer_huge_pages`` sets it
before torch is imported). Memory use is unchanged: the pages are the buffer's own and
go back to the OS with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys

import structlog

log = structlog.get_logger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024


def prefer_huge_pages() -> None:
    """Ask torch to back its large CPU tensors with transparent huge pages (unless the
    environment says otherwise). Call before torch allocates anything: the CLI does."""
    if os.environ.get("FEDBUS_MALLOC_DEFAULT") != "1":
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


# Buffers of up to WARM_MAX_BYTES are kept for the next read once nothing uses them (at most
# WARM_KEEP of them): a fresh mapping's first fill costs page faults (and, for huge pages,
# the kernel's compaction when memory is fragmented by the page cache), measured at 0.03 s
# to 1.1 s for the same 200 MB read on the benchmark machine; a warm one fills at memcpy
# speed. Larger models are left to page out instead (CoordinatorService._page_out_model),
# where a kept buffer would be a third copy of the model.
WARM_MAX_BYTES = 256 * 1024 * 1024
WARM_KEEP = 1
_warm: list[mmap.mmap] = []


def large_buffer(size: int) -> bytearray | mmap.mmap | memoryview:
    """A writable buffer of exactly ``size`` bytes for data about to be written into it
    (a blob being read); its contents are undefined until then. From ``MMAP_THRESHOLD`` up
    it is a private anonymous mapping advised for huge pages, unmapped when the last
    reference (a tensor view over it) goes; up to ``WARM_MAX_BYTES`` a mapping that an
    earlier read used and nothing references any more is handed out again (a view of
    its first ``size`` bytes). Call from one thread (the event loop's)."""
    if size < MMAP_THRESHOLD or os.environ.get("FEDBUS_MALLOC_DEFAULT") == "1":
        return bytearray(size)
    if size > WARM_MAX_BYTES:
        return _mapping(size)
    for i in range(len(_warm)):
        buf = _warm[i]
        # Referenced only by this list, ``buf`` and getrefcount's argument: every view and
        # tensor over it is gone (CPython counts the memoryviews' hold on it).
        if sys.getrefcount(buf) <= 3:
            if size <= len(buf) <= size + size // 4:
                return memoryview(buf)[:size]
            del _warm[i]  # free but a poor fit: make room for one that fits
            break
    buf = _mapping(size)
    if len(_warm) < WARM_KEEP:
        _warm.append(buf)
        return memoryview(buf)[:size]
    return buf


def _mapping(size: int) -> mmap.mmap:
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            buf.madvise(advice)
        except OSError:  # no THP on this kernel: 4 KiB pages, as a bytearray would have
            pass
    return buf


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
