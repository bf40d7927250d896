"""Image reading and writing, atomic file writes, a full disk in one line.

TIFF goes through tifffile, PNG/JPEG through Pillow. Images are uint8 RGB HxWx3 numpy
arrays everywhere in the pipeline; anything else is refused with a message naming the
file (bit depth is never guessed from pixel values).

Every artifact appears whole or not at all: it is written to a temporary beside it and
renamed into place (`atomic_path` for a file, `atomic_dir` for a folder). A full disk
(ENOSPC, also EDQUOT and EFBIG) inside them becomes one line naming the file; the temporary
is removed and the previous artifact stays as it was. Writers also hold the artifact's lock
(`pipeline.core.locks`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile
from PIL import Image

from pipeline.core.errors import PipelineError

TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = TIFF_SUFFIXES | {".png", ".jpg", ".jpeg"}


def is_image(path: Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in a folder, sorted by name (recursive on request)."""
    folder = Path(folder)
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and is_image(p))


def _decode(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            arr = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                arr = np.asarray(im)
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except Exception as exc:  # any decoder failure is the file's problem, not ours
        raise PipelineError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    if arr.size == 0:  # tifffile returns an empty array for some broken headers instead of raising
        raise PipelineError(f"{path}: cannot decode image (no pixel data)")
    return arr


def to_rgb_uint8(arr: np.ndarray, name: str | Path) -> np.ndarray:
    """Check an decoded image is 8-bit RGB; RGBA loses alpha with a warning."""
    if arr.dtype != np.uint8:
        raise PipelineError(
            f"{name}: dtype {arr.dtype} is not uint8 (8-bit RGB expected; "
            "16-bit or float images are refused, never rescaled by guessing)"
        )
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 1):
        raise PipelineError(f"{name}: greyscale image of shape {arr.shape}; RGB expected")
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise PipelineError(f"{name}: shape {arr.shape} is not HxWx3 RGB")
    if arr.shape[-1] == 4:
        warnings.warn(f"{name}: RGBA image, alpha channel dropped", stacklevel=2)
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def read_image(path: str | Path) -> np.ndarray:
    """Read a tif/png/jpg as uint8 RGB HxWx3, or raise PipelineError naming the file."""
    path = Path(path)
    return to_rgb_uint8(_decode(path), path)


# --- full disk ------------------------------------------------------------------------

# errno -> what the one-line message says; EDQUOT and EFBIG (a file-size limit, `ulimit -f`)
# are out of space for this file too
NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "no space left on device (disk quota exceeded)",
            errno.EFBIG: "no space left on device (file size limit exceeded)"}


class NoSpaceError(PipelineError):
    """A write ran out of space: one line naming the file."""

    def __init__(self, path: str | Path, reason: str = NO_SPACE[errno.ENOSPC]):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason} (nothing was replaced, the temporary was removed; "
                         "free some space and rerun)")


def no_space_error(exc: BaseException, path: str | Path) -> NoSpaceError | None:
    """The NoSpaceError for an exception that means "out of space" (naming `path`), else None."""
    if isinstance(exc, NoSpaceError):
        return NoSpaceError(path, exc.reason)
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return NoSpaceError(path, NO_SPACE[exc.errno])
    return None


def crash_point(name: str) -> None:
    """Test hook of the crash-consistency test (tests/test_reliability.py): with
    SR_CRASH_AT=k in the environment, this process SIGKILLs itself at the k-th point it
    passes (points sit around every lock and atomic write). Costs one dict lookup."""
    global crash_points_passed
    crash_points_passed += 1
    if os.environ.get("SR_CRASH_AT") == str(crash_points_passed):
        os.kill(os.getpid(), signal.SIGKILL)


crash_points_passed = 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only on success.

    An exception or Ctrl-C inside the block removes the temporary file and leaves any
    previous `path` untouched; out of space is a NoSpaceError naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes it owner-only; artifacts get normal modes
    try:
        yield tmp
        crash_point("before rename")
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = no_space_error(exc, path)
        if full is not None:
            raise full from None
        raise
    crash_point("after rename")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only on success.

    Out of space while filling it is a NoSpaceError naming the file in `path` that was
    being written (nothing of the new folder is kept, the previous one stays).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by a kill between the two renames below
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        crash_point("before swap")
        if path.exists():
            os.replace(path, old)
            crash_point("mid swap")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        full = no_space_error(exc, path)
        if full is not None:  # name the file of the folder being written: a write() error has
            # no file name, so the file last written to is the one that did not fit
            inner = exc.path if isinstance(exc, NoSpaceError) else getattr(exc, "filename", None)
            if inner is None:
                files = [p for p in tmp.rglob("*") if p.is_file()]
                inner = max(files, key=lambda p: p.stat().st_mtime_ns) if files else tmp
            with contextlib.suppress(ValueError):
                full = no_space_error(exc, path / Path(inner).relative_to(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from None
        raise
    crash_point("after swap")


def write_tif(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 RGB image as an uncompressed TIFF, atomically."""
    image = to_rgb_uint8(np.asarray(image), path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, image, photometric="rgb")


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write by suffix: .tif/.tiff via tifffile, anything else via Pillow."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        write_tif(path, image)
    else:
        image = to_rgb_uint8(np.asarray(image), path)
        with atomic_path(path) as tmp:
            Image.fromarray(image).save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))


# Out-of-fold float predictions (stage 03 -> blend): what the ensemble averages, before the
# one clip-and-round, in 2 bytes a value: fixed point over [-0.25, 1.25] (uint16), steps of
# 1/171 grey level, so a blend rounds like the float32 ensemble on all but ~0.2 % of
# pixels (float16 has steps of 1/8 grey level near white and flips ~3 % of them), with
# headroom for the out-of-range values a weighted mean can pull back.
FLOAT_PREDICTION_RANGE = (-0.25, 1.25)
_Q = 65535 / (FLOAT_PREDICTION_RANGE[1] - FLOAT_PREDICTION_RANGE[0])


def write_float_prediction(path: str | Path, image) -> None:
    """A float 3xHxW prediction in [0, 1] units (not clipped, not rounded) as a uint16 .npy, atomically."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[0] != 3:
        raise PipelineError(f"{path}: a 3xHxW float prediction expected, got shape {array.shape}")
    coded = np.rint((np.clip(array, *FLOAT_PREDICTION_RANGE) - FLOAT_PREDICTION_RANGE[0]) * _Q).astype(np.uint16)
    with atomic_path(path) as tmp:
        np.save(tmp, coded, allow_pickle=False)


def read_float_prediction(path: str | Path) -> np.ndarray:
    """A prediction written by write_float_prediction, decoded to float32 3xHxW."""
    try:
        coded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise PipelineError(f"{path}: out-of-fold prediction missing; rerun stage 03 (`make oof`)") from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: not a readable .npy prediction ({type(exc).__name__})") from None
    if coded.dtype != np.uint16 or coded.ndim != 3 or coded.shape[0] != 3:
        raise PipelineError(f"{path}: {coded.dtype} {coded.shape}, a uint16 3xHxW prediction expected")
    return (coded.astype(np.float32) / np.float32(_Q) + np.float32(FLOAT_PREDICTION_RANGE[0])).astype(np.float32)


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (zips, checkpoints, weight files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
