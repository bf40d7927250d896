"""glibc keeps the memory that tensors free inside the process (`retain_freed_memory`).

By default glibc serves a large allocation (from 128 KiB, a threshold that moves with use)
with a fresh mmap and gives freed memory at the top of a heap back to the system. A CPU
training step frees and reallocates the same large activations and gradients every step,
so each of them comes back as new pages that the kernel faults in and zeroes again.

So allocations up to glibc's ceiling (32 MiB) come from its heaps, and a heap keeps up to
1 GiB free at its top instead of trimming it: a little more peak memory for fewer page
faults (docs/speed.md has what it buys). CUDA memory has its own caching allocator and is
not touched. A GLIBC_TUNABLES that sets malloc options is the user's choice and is kept;
other C libraries (and an LD_PRELOADed allocator) are left alone.
"""
from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1            # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20         # glibc's largest on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30
DEFAULT_THRESHOLD = 128 << 10     # glibc's starting value of both


def on_glibc() -> bool:
    """Whether this process allocates through glibc (Linux with the GNU C library)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    if not on_glibc() or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; setting either turns off glibc's own moving of both
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds as the module docstring says (calling it again sets
    the same values); True when they were set, False where this is not glibc or the user set
    malloc tunables."""
    return _mallopt(MMAP_THRESHOLD, TRIM_THRESHOLD)


def release_freed_memory() -> bool:
    """glibc's starting thresholds again (fixed at them: it no longer moves them itself)."""
    return _mallopt(DEFAULT_THRESHOLD, DEFAULT_THRESHOLD)
