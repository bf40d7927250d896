"""The compiled window attention of `kernels/window_attention.c`, built on first use and loaded with ctypes.

`kernel()` returns the loaded library, or None when it cannot be had (no C compiler, a failed
build), and `status()` says which and why, one line for the logs.

Built for AVX-512 (F, BW and VL: Intel Skylake-SP and later, AMD Zen 4 and later) its vectors
are 16 floats, else 8 (AVX2's registers); `vector_floats()` and the status line say which.

The library is built with the system's C compiler (`$CC`, else `cc`) for the CPU it runs on
(-march=native) into a cache directory (`$SR_KERNEL_CACHE`, else ~/.cache/sr-pipeline/kernels),
named by a hash of the sources, the flags and the CPU's model and flags: a checkout shared
between machines, or a session on another CPU, builds its own. A build is written to a
temporary name and renamed, so concurrent first uses and interrupted builds never leave a
half-written library behind. Building takes a few seconds. Why C and not a torch C++
extension: that compiles torch's headers (a minute, and ninja) for plain loops over floats.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

SOURCES = Path(__file__).parent / "kernels"
SOURCE = SOURCES / "window_attention.c"
FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC"]
CPU_FLAGS = ["-march=native"]        # dropped where the compiler does not take it

_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL | None, str] | None = None


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform.
    Not precision.cpu_flags: that reads x86's flags line only (ARM's is `Features`), and the
    model decides -mtune."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(dict.fromkeys(wanted)) or platform.processor()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_dir() -> Path:
    return Path(os.environ.get("SR_KERNEL_CACHE") or Path.home() / ".cache" / "sr-pipeline" / "kernels")


def _library_path(compiler: str) -> Path:
    digest = hashlib.sha256()
    for source in sorted(SOURCES.glob("*")):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(" ".join([compiler, *FLAGS, *CPU_FLAGS, _cpu_identity()]).encode())
    return cache_dir() / f"window_attention-{digest.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile into `target` (a temporary name, then a rename). Raises RuntimeError with the
    compiler's first error line."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for cpu_flags in (CPU_FLAGS, []):
            run = subprocess.run([compiler, *FLAGS, *cpu_flags, "-o", tmp, str(SOURCE)],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                os.replace(tmp, target)
                return
        first = next((ln for ln in run.stderr.splitlines() if "error" in ln), run.stderr.strip()[:200])
        raise RuntimeError(f"{compiler} failed: {first}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    for suffix in ("f32", "bf16"):
        forward = getattr(lib, f"window_attention_forward_{suffix}")
        forward.argtypes = [p, p, p, i64, i64, i64, i64, i64, f32, p, p]
        forward.restype = ctypes.c_int
    lib.window_attention_vector_floats.argtypes, lib.window_attention_vector_floats.restype = [], ctypes.c_int
    return lib


def _load() -> tuple[ctypes.CDLL | None, str]:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        return None, f"torch's fused attention (no C compiler: {compiler!r} not found; set CC to build the native kernel)"
    path = _library_path(compiler)
    built = ""
    try:
        if not path.exists():
            start = time.perf_counter()
            _build(compiler, path)
            built = f", built in {time.perf_counter() - start:.1f} s"
        lib = _declare(ctypes.CDLL(str(path)))
        width = lib.window_attention_vector_floats()
        return lib, f"native kernel ({width}-float vectors; {path}{built})"
    except (RuntimeError, OSError, AttributeError) as e:
        return None, f"torch's fused attention (the native kernel did not build: {e})"


def _get() -> tuple[ctypes.CDLL | None, str]:
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, built first if needed; None if it cannot be (see status())."""
    return _get()[0]


def vector_floats() -> int:
    """Floats a vector in the loaded kernel: 16 (AVX-512), 8 (AVX2 and others), 0 if none."""
    lib = kernel()
    return lib.window_attention_vector_floats() if lib is not None else 0


def status() -> str:
    """Which window attention CPU inference runs, and why: one line."""
    return _get()[1]


def forget() -> None:
    """Load again on the next use (tests change the environment)."""
    global _loaded
    with _lock:
        _loaded = None
