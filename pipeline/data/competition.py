"""The competition's file format: the organiser's zips, their members and scene sizes.

The organiser ships flat zips of TIFFs named by patterns with one `{i}` (`train_{i}_low.tif`,
`train_{i}_high.tif`, `test_{i}_low.tif`); a submission is a flat zip of `test_{i}_answer.tif`.
Stage 00 reads the organiser's zips through `index_members`, `check_bounds` and `read_member`;
`score` reads a submission's members the same way; the demo competition and the tests write
zips with `zip_bytes` and TIFFs with `tif_bytes`. Every member written here carries a fixed
date and mode, so the same content always makes the same zip bytes.
"""
from __future__ import annotations

import io as bytes_io
import logging
import math
import re
import shutil
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import tifffile

from pipeline.core import io, paths
from pipeline.core.errors import PipelineError

# The competition's high-res scenes are 1200 (rows) x 1500 (columns).
MAX_HIGH_SIZE = (1200, 1500)
MIN_LOW_SIDE = 8          # smaller scenes are useless for SSIM (7x7 window) and are skipped
ZIP_DATE = (1980, 1, 1, 0, 0, 0)   # the earliest date a zip stores: members carry no build time


def pattern_regex(pattern: str) -> re.Pattern:
    """`train_{i}_low.tif` -> a regex whose one group is the scene id (digits)."""
    if pattern.count("{i}") != 1:
        raise PipelineError(f"file pattern '{pattern}' must contain '{{i}}' exactly once")
    head, tail = pattern.split("{i}")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"\Z")



def _escapes(name: str) -> bool:
    """A member path that would land outside the extraction folder."""
    unix = name.replace("\\", "/")
    return unix.startswith("/") or re.match(r"[A-Za-z]:", unix) is not None or ".." in PurePosixPath(unix).parts



def open_zip(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise PipelineError(f"{path}: zip not found (put the organiser's zip there, or run `make demo-data`)")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise PipelineError(f"{path}: not a zip file") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc.strerror or exc})") from None



def short_list(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")



def index_members(zip_path: Path, zf: zipfile.ZipFile, roles: dict[str, str]) -> dict[int, dict[str, str]]:
    """Map scene id -> {role: member name} for the members matching the role patterns.

    Refuses members whose path escapes the folder and duplicate ids; names that match no
    pattern are listed in one warning and skipped. Members in a sub-folder are matched by
    their file name (a zip made from a folder is common); the output is always flat.
    """
    escaping = [info.filename for info in zf.infolist() if _escapes(info.filename)]
    if escaping:
        raise PipelineError(f"{zip_path}: member path escapes the extraction folder: {short_list(escaping)} "
                            "(refused, nothing written)")
    regexes = {role: pattern_regex(pattern) for role, pattern in roles.items()}
    scenes: dict[int, dict[str, str]] = {}
    unmatched = []
    for info in zf.infolist():
        if info.is_dir():
            continue
        base = PurePosixPath(info.filename.replace("\\", "/")).name
        for role, regex in regexes.items():
            match = regex.match(base)
            if match:
                scene = scenes.setdefault(int(match.group(1)), {})
                if role in scene:
                    raise PipelineError(f"{zip_path}: duplicate id {int(match.group(1))}: "
                                        f"'{scene[role]}' and '{info.filename}'")
                scene[role] = info.filename
                break
        else:
            unmatched.append(info.filename)
    if unmatched:
        warnings.warn(f"{zip_path}: skipped {len(unmatched)} member(s) matching no pattern "
                      f"({', '.join(roles.values())}): {short_list(unmatched)}")
    if not scenes:
        raise PipelineError(f"{zip_path}: no member matches {' / '.join(roles.values())}")
    for i, scene in sorted(scenes.items()):
        missing = [role for role in roles if role not in scene]
        if missing:
            present = next(iter(scene.values()))
            raise PipelineError(f"{zip_path}: '{present}' has no matching "
                                f"'{roles[missing[0]].format(i=i)}'")
    return scenes



class _TiffLog(logging.Handler):
    """Collects what tifffile logs while decoding one member."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())



HEADER_BYTES = 1 << 20  # a TIFF's first directory is in its first MiB for tifffile, Pillow and libtiff



def _size(n: int) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} bytes"



def member_image_size(zf: zipfile.ZipFile, member: str, whole: bool) -> tuple[int, int] | None:
    """(height, width) of a TIFF member's first image from its header alone: its first MiB,
    or when the directory lies beyond (and `whole`) the member's bytes. None when no header
    can be read (read_member then says why)."""
    logged = _TiffLog()
    tiff_logger = logging.getLogger("tifffile")
    tiff_logger.addHandler(logged)
    tiff_logger.propagate = False
    try:
        with zf.open(member) as fh:
            head = fh.read(HEADER_BYTES)
        for data in (head, zf.read(member) if whole and len(head) == HEADER_BYTES else None):
            if data is None:
                break
            try:
                with tifffile.TiffFile(bytes_io.BytesIO(data)) as tif:
                    page = tif.pages.first
                    return int(page.imagelength), int(page.imagewidth)
            except Exception:  # truncated head or not a TIFF: try the whole member / let decoding tell
                continue
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError):
        return None
    finally:
        tiff_logger.removeHandler(logged)
        tiff_logger.propagate = True
    return None



def check_bounds(jobs: list, data_cfg: dict) -> None:
    """Before anything is decoded or written: every image within `data.max_pixels` (from
    its TIFF header, and its uncompressed size from the zip's directory), and the extracted
    total within the free space of the disk that will hold it. A zip bomb is refused by name."""
    max_pixels = int(data_cfg["max_pixels"])
    limit = f"data.max_pixels = {max_pixels} ({max_pixels / 1e6:.1f} Mpx)"
    max_bytes = 8 * max_pixels + HEADER_BYTES  # RGBA at 16 bits, uncompressed, plus headers
    total = 0
    for _, zip_path, zf, _, members in jobs:
        for member in members.values():
            info = zf.getinfo(member)
            hw = member_image_size(zf, member, whole=info.file_size <= max_bytes)
            if (hw is not None and hw[0] * hw[1] > max_pixels) or info.file_size > max_bytes:
                size = f"{_size(info.file_size)} uncompressed, {_size(info.compress_size)} in the zip"
                what = (f"{hw[0]}x{hw[1]} image ({hw[0] * hw[1] / 1e6:.1f} Mpx, {size})" if hw is not None
                        else f"{size}, more than an image within the limit takes")
                raise PipelineError(f"{zip_path}:{member}: {what} exceeds {limit}; refused before decoding, "
                                    "nothing extracted (raise data.max_pixels if the image is genuine)")
            total += (hw[0] * hw[1] * 3 if hw is not None else info.file_size) + 4096
    disk = next(p for p in (paths.INTERIM, *paths.INTERIM.parents) if p.exists())
    free = shutil.disk_usage(disk).free
    if total > free:
        raise PipelineError(f"{paths.INTERIM}: extracting needs {_size(total)} but only {_size(free)} is free "
                            f"on its disk ({disk}); nothing extracted: free some space")



def read_member(zip_path: Path, zf: zipfile.ZipFile, member: str, max_pixels: int | None = None) -> np.ndarray:
    """Decode one TIFF member as uint8 RGB (CRC checked by zipfile while reading); with
    `max_pixels`, a stack of pages larger than that many RGBA pixels is refused undecoded."""
    where = f"{zip_path}:{member}"
    try:
        data = zf.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise PipelineError(f"{where}: corrupt member, CRC check failed ({exc})") from None
    logged = _TiffLog()
    tiff_logger = logging.getLogger("tifffile")
    tiff_logger.addHandler(logged)
    tiff_logger.propagate = False  # its complaints become part of our one-line message
    try:
        with tifffile.TiffFile(bytes_io.BytesIO(data)) as tif:
            if not tif.pages:  # a broken header decodes to an empty float array, not an error
                raise ValueError("; ".join(logged.messages) or "no image in it")
            shape = tif.series[0].shape
            if max_pixels is not None and math.prod(shape) > 4 * max_pixels:
                raise PipelineError(f"{where}: {'x'.join(map(str, shape))} image stack exceeds data.max_pixels = "
                                    f"{max_pixels}; refused before decoding, nothing extracted")
            image = tif.asarray()
    except PipelineError:
        raise
    except Exception as exc:  # any decoder failure is the file's problem
        raise PipelineError(f"{where}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    finally:
        tiff_logger.removeHandler(logged)
        tiff_logger.propagate = True
    return io.to_rgb_uint8(image, where)


def crop_to_scale(image: np.ndarray, scale: int, max_size: tuple[int, int] = MAX_HIGH_SIZE) -> np.ndarray:
    """Centre crop to at most `max_size` and to sides that are multiples of `scale`."""
    h, w = (min(side, limit) // scale * scale for side, limit in zip(image.shape[:2], max_size))
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    return image[top:top + h, left:left + w]



def answer_pattern(test_low: str) -> str:
    """Name of a demo answer: the test pattern with its last 'low' made 'high' (test_{i}_high.tif)."""
    head, sep, tail = test_low.rpartition("low")
    if not sep:
        raise PipelineError(f"test pattern '{test_low}' has no 'low' to turn into the answer's 'high'")
    return head + "high" + tail



def tif_bytes(image: np.ndarray) -> bytes:
    buf = bytes_io.BytesIO()
    tifffile.imwrite(buf, image, photometric="rgb")
    return buf.getvalue()



def zip_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A flat zip with fixed member dates, so equal content gives equal bytes."""
    buf = bytes_io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            zf.writestr(zip_member(name), data)
    return buf.getvalue()


def zip_member(name: str) -> zipfile.ZipInfo:
    """A deflated zip member with a fixed date and mode."""
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info
