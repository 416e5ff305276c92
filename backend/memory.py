"""Process memory: what /metrics reports (resident bytes, glibc's heap statistics) and the
allocator settings a long-running server needs.

glibc only: on another libc (musl, macOS) every function here is a no-op or returns None.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from typing import Optional

logger = logging.getLogger(__name__)

# mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

_libc = None
_libc_lock = threading.Lock()


def _glibc():
    global _libc
    with _libc_lock:
        if _libc is None:
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                lib.gnu_get_libc_version  # raises AttributeError off glibc
                _libc = lib
            except (OSError, AttributeError):
                _libc = False
        return _libc or None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def resident_bytes(pid: int | str = "self") -> Optional[int]:
    """VmRSS of a process (this one by default), None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def malloc_stats() -> Optional[dict[str, int]]:
    """glibc's heap statistics, all arenas: `in_use` (malloc'ed, not freed), `free` (freed but kept
    inside the heaps: fragmentation or slack not yet returned), `mmapped` (large blocks mapped on
    their own, returned to the kernel on free). None off glibc or before glibc 2.33 (no mallinfo2)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return {"in_use": int(info.uordblks), "free": int(info.fordblks), "mmapped": int(info.hblkhd),
            "arena": int(info.arena)}


def trim() -> bool:
    """Give the free pages inside glibc's heaps back to the kernel (malloc_trim(0))."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(ctypes.c_size_t(0)))


# What a long-running server sets when the user has not (glibc reads the same names, with the
# trailing underscore, from the environment at start; the Docker image sets them there too).
# Measured with bench/soak.py, see docs/PERFORMANCE.md "Memory over weeks" for the figures.
ALLOCATOR_DEFAULTS = {
    # A fixed threshold turns off glibc's dynamic one, which rises to the size of the largest
    # block freed (up to 32 MiB): after the first forward pass every activation tensor (MiBs)
    # then comes from the heap, and the heap keeps growing in the holes they leave.
    # 256 KiB, not 1 MiB: at GEM_IMAGE_SIZE=224 a feature-cache entry (0.5 MiB, kept for hundreds
    # of requests) and a layer's activation (0.8 MiB, freed within the request) are both below
    # 1 MiB; in the heap they interleave, and the development server kept 165 MiB of freed heap
    # beside a full cache (ViT-B/16, 800 images; docs/PERFORMANCE.md "Memory over weeks").
    "MALLOC_MMAP_THRESHOLD_": 256 << 10,
    # Free memory at the top of a heap above this goes back to the kernel at once.
    "MALLOC_TRIM_THRESHOLD_": 4 << 20,
    # Each thread that calls malloc under contention may get its own arena (up to 8 x cores),
    # each keeping its own free memory; request threads, fetch threads and torch's pool add up.
    "MALLOC_ARENA_MAX": 2,
}
_MALLOPT = {"MALLOC_MMAP_THRESHOLD_": M_MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": M_TRIM_THRESHOLD,
            "MALLOC_ARENA_MAX": M_ARENA_MAX}


def allocator_environment(environ=os.environ) -> dict[str, str]:
    """The MALLOC_* variables a child process should start with: ALLOCATOR_DEFAULTS, except where
    `environ` sets one (that value is kept). For processes this code does not start itself (Ray
    workers): glibc reads them before the first malloc, so they cover everything the process does."""
    return {name: environ.get(name, "").strip() or str(value) for name, value in ALLOCATOR_DEFAULTS.items()}


def mmap_threshold_is_fixed(size: int = 16 << 20) -> Optional[bool]:
    """Whether a block of `size` bytes is still mapped on its own after one of that size was freed
    (a fixed mmap threshold below `size`), or comes from the heap (glibc's dynamic threshold, raised
    by the free). A probe of what the process actually runs with, wherever the setting came from;
    None off glibc. It frees what it allocates; an untuned process has its threshold raised to `size`.
    `size` is above the trim threshold, and below the dynamic threshold's ceiling (32 MiB): free
    space kept at the top of a heap is used before any new mapping, whatever the threshold."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    mapped = []
    for _ in range(2):
        before = malloc_stats()["mmapped"]
        block = libc.malloc(size)
        if not block:
            return None
        mapped.append(malloc_stats()["mmapped"] - before >= size)
        libc.free(block)
    return all(mapped)


def tune_allocator(environ=os.environ) -> dict[str, int]:
    """Apply ALLOCATOR_DEFAULTS through mallopt() for each one the environment does not set
    (set ones glibc has already applied itself). Returns what was applied; {} off glibc."""
    libc = _glibc()
    if libc is None:
        return {}
    applied = {}
    for name, value in ALLOCATOR_DEFAULTS.items():
        if environ.get(name, "").strip():
            continue
        if libc.mallopt(ctypes.c_int(_MALLOPT[name]), ctypes.c_int(value)) == 1:
            applied[name] = value
        else:
            logger.warning("mallopt(%s=%d) refused", name, value)
    return applied
