"""`retain_freed_memory()`: glibc keeps the memory that tensors free inside the process.

By default glibc serves a large allocation (from 128 KiB, a threshold that moves with use)
with a fresh mmap and gives freed memory at the top of a heap back to the system. A CPU
training step frees and reallocates the same large activations and gradients every step,
so each of them comes back as new pages that the kernel faults in and zeroes again. On the
AMD EPYC (2 cores), processes each way in turn, medians: the SSIM loss of 8 crops (forward +
backward, one thread) 20-26 -> 13-15 ms; an RLFN training step (batch 16, 2 shards) fp32
0.207 -> 0.197 s, bf16 0.150 -> 0.139 s, 10-15 MB more peak memory; a SwinIR-S step (batch 24)
fp32 1.49 -> 1.35 s at the same peak, bf16 0.91 -> 0.88 s for 2.66 -> 2.98 GB (BENCHMARKS.md,
training round 4).

So allocations up to glibc's ceiling (32 MiB) come from its heaps, and a heap keeps up to
1 GiB free at its top instead of trimming it. CUDA memory has its own caching allocator and
is not touched. A GLIBC_TUNABLES that sets malloc options is the user's choice and is kept;
other C libraries (and an LD_PRELOADed allocator) are left alone.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

_M_TRIM_THRESHOLD = -1            # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20         # glibc's largest on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30


def on_glibc() -> bool:
    """Whether this process allocates through glibc (Linux with the GNU C library)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds as the module docstring says (calling it again sets
    the same values); True when they were set, False where this is not glibc or the user set
    malloc tunables."""
    if not on_glibc():
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; setting either turns off glibc's own moving of both
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (MB), None where the OS does not tell."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10   # bytes on macOS, KiB on Linux
