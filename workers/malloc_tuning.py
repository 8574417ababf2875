"""glibc malloc settings that keep a process's memory near what it holds.

By default glibc raises its mmap threshold each time a large block is freed
(up to 32 MiB), so after the store's tensors are loaded and converted, later
blocks of a few MiB come from the heap, whose freed holes are kept rather than
given back (docs/benchmarks.md has what that cost the engine). Each thread that allocates may also get its own arena (8 x cores of
them), each keeping its own free memory. A fixed threshold (which also turns
off the dynamic raise), a low trim threshold and two arenas give that back.
`limit_malloc_growth()` is called once per process (the engine, every worker).
"""
from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial default, kept fixed
TRIM_THRESHOLD_BYTES = 128 * 1024
ARENA_MAX = 2


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def limit_malloc_growth() -> bool:
    """Set the thresholds and arena count for this process; False where malloc is not glibc's."""
    libc = _libc()
    if libc is None:
        return False
    ok = True
    for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                         (M_ARENA_MAX, ARENA_MAX)):
        ok = bool(libc.mallopt(param, value)) and ok
    return ok


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (after loading, when the temporaries are gone)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
