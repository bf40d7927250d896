"""Image reading/writing and atomic file writes.

TIFF goes through tifffile, PNG/JPEG through Pillow. Images are uint8 RGB HxWx3 numpy
arrays everywhere in the pipeline; anything else is refused with a message naming the
file (bit depth is never guessed from pixel values).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile
from PIL import Image

from .errors import PipelineError

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only on success.

    An exception or Ctrl-C inside the block removes the temporary file and leaves any
    previous `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes it owner-only; artifacts get normal modes
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
