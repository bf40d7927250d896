"""Stage 00: validate the competition zips and extract them into `data/interim/`.

    data/raw/train.zip, data/raw/evaluation.zip
      -> data/interim/train/train_{i}_{low,high}.tif, data/interim/evaluation/test_{i}_low.tif,
         data/interim/manifest.csv, data/interim/zips.json

Everything is checked before anything is kept: member paths, names against the config's
patterns, low/high pairing, ids, CRCs, TIFF decoding, dtype (uint8 only: never rescaled
by guessing), channels (RGB; RGBA loses alpha with a warning; grey refused) and the exact
scale between high and low. Files are decoded and rewritten as plain uint8 RGB TIFFs into
a temporary folder that replaces `data/interim` only when all of it checked out, so a
failure or Ctrl-C never leaves a half-written `data/interim`.

`zips.json` records each zip's size, date and sha256 plus the data config used: a rerun
with the same zips and config does nothing (and leaves the manifest's date alone, so
`make` does not redo later stages); a changed zip is extracted again.

Manifest columns (paths relative to `data/interim`; use `load_manifest` for absolute ones):
    id, scene, split ("train" | "test"), low_path, high_path (empty for test),
    low_height, low_width, high_height, high_width, low_sha256, high_sha256
"""
from __future__ import annotations

import hashlib
import io as bytes_io
import json
import logging
import math
import re
import shutil
import time
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import tifffile
from tqdm import tqdm

from pipeline.core import io, paths
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError

STAMP_NAME = "zips.json"
SPLIT_FOLDERS = {"train": "train", "test": "evaluation"}   # split -> folder under data/interim
MANIFEST_COLUMNS = ["id", "scene", "split", "low_path", "high_path", "low_height", "low_width",
                    "high_height", "high_width", "low_sha256", "high_sha256"]


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


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise PipelineError(f"{path}: zip not found (put the organiser's zip there, or run `make demo-data`)")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise PipelineError(f"{path}: not a zip file") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _short_list(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def index_members(zip_path: Path, zf: zipfile.ZipFile, roles: dict[str, str]) -> dict[int, dict[str, str]]:
    """Map scene id -> {role: member name} for the members matching the role patterns.

    Refuses members whose path escapes the folder and duplicate ids; names that match no
    pattern are listed in one warning and skipped. Members in a sub-folder are matched by
    their file name (a zip made from a folder is common); the output is always flat.
    """
    escaping = [info.filename for info in zf.infolist() if _escapes(info.filename)]
    if escaping:
        raise PipelineError(f"{zip_path}: member path escapes the extraction folder: {_short_list(escaping)} "
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
                      f"({', '.join(roles.values())}): {_short_list(unmatched)}")
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


def _write_tif(path: Path, image: np.ndarray) -> str:
    """Write a plain uint8 RGB TIFF; returns its sha256."""
    buf = bytes_io.BytesIO()
    tifffile.imwrite(buf, image, photometric="rgb")
    data = buf.getvalue()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _zip_state(path: Path, with_sha: bool) -> dict:
    stat = path.stat()
    state = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if with_sha:
        state["sha256"] = io.sha256_file(path)
    return state


def _data_key(data_cfg: dict) -> dict:
    return {k: data_cfg[k] for k in ("scale", "train_low", "train_high", "test_low")}


def _read_stamp() -> dict | None:
    stamp = paths.INTERIM / STAMP_NAME
    if not (stamp.exists() and paths.MANIFEST.exists()):
        return None
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def up_to_date(data_cfg: dict) -> bool:
    """True when data/interim already holds these zips (same bytes) under this data config.

    Size and date equal: trusted without reading the zips. Otherwise the sha256 decides;
    equal content (a zip rewritten or touched) only refreshes the recorded dates.
    """
    stamp = _read_stamp()
    zips = {"train": paths.TRAIN_ZIP, "evaluation": paths.EVAL_ZIP}
    if stamp is None or stamp.get("data") != _data_key(data_cfg) or not all(p.exists() for p in zips.values()):
        return False
    recorded = stamp.get("zips", {})
    quick = {name: _zip_state(p, with_sha=False) for name, p in zips.items()}
    if all({k: recorded.get(name, {}).get(k) for k in ("size", "mtime_ns")} == quick[name] for name in zips):
        return True
    full = {name: _zip_state(p, with_sha=True) for name, p in zips.items()}
    if any(recorded.get(name, {}).get("sha256") != full[name]["sha256"] for name in zips):
        return False
    with io.atomic_path(paths.INTERIM / STAMP_NAME) as tmp:
        tmp.write_text(json.dumps({**stamp, "zips": full}, indent=2))
    return True


def extract(data_cfg: dict) -> pd.DataFrame:
    """Validate both zips and build data/interim atomically; returns the manifest."""
    scale = int(data_cfg["scale"])
    if scale < 1:
        raise PipelineError(f"data.scale {scale} must be a positive integer")
    jobs = []  # (split, zip path, zip file, scene id, {role: member})
    zips = {}
    for split, zip_path, roles in (
            ("train", paths.TRAIN_ZIP, {"low": data_cfg["train_low"], "high": data_cfg["train_high"]}),
            ("test", paths.EVAL_ZIP, {"low": data_cfg["test_low"]})):
        zf = _open_zip(zip_path)
        zips[split] = zf
        jobs += [(split, zip_path, zf, i, members) for i, members in sorted(index_members(zip_path, zf, roles).items())]

    rows, rgba = [], []
    try:
        check_bounds(jobs, data_cfg)
        with io.locked(paths.INTERIM), io.atomic_dir(paths.INTERIM) as tmp:
            for folder in SPLIT_FOLDERS.values():
                (tmp / folder).mkdir()
            for split, zip_path, zf, i, members in tqdm(jobs, desc="unzip", unit="scene", disable=None):
                folder = SPLIT_FOLDERS[split]
                row = {"id": i, "scene": f"{split}_{i}", "split": split}
                images = {}
                for role, member in members.items():
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        images[role] = read_member(zip_path, zf, member, int(data_cfg["max_pixels"]))
                    for w in caught:  # gathered into one warning; anything else passes through
                        if "alpha" in str(w.message):
                            rgba.append(f"{zip_path.name}:{member}")
                        else:
                            warnings.warn(w.message, w.category)
                if "high" in images:
                    low_hw, high_hw = images["low"].shape[:2], images["high"].shape[:2]
                    if high_hw != (low_hw[0] * scale, low_hw[1] * scale):
                        raise PipelineError(
                            f"{zip_path}:{members['high']}: high {high_hw[0]}x{high_hw[1]} is not exactly "
                            f"{scale} x low {low_hw[0]}x{low_hw[1]} ({members['low']})")
                for role in ("low", "high"):
                    if role not in images:
                        row.update({f"{role}_path": "", f"{role}_height": pd.NA, f"{role}_width": pd.NA,
                                    f"{role}_sha256": ""})
                        continue
                    pattern = data_cfg[f"{'train' if split == 'train' else 'test'}_{role}"]
                    rel = f"{folder}/{pattern.format(i=i)}"
                    row[f"{role}_sha256"] = _write_tif(tmp / rel, images[role])
                    row[f"{role}_path"] = rel
                    row[f"{role}_height"], row[f"{role}_width"] = images[role].shape[:2]
                rows.append(row)
            manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
            for col in ("low_height", "low_width", "high_height", "high_width"):
                manifest[col] = manifest[col].astype("Int64")
            manifest.to_csv(tmp / paths.MANIFEST.name, index=False)
            stamp = {"data": _data_key(data_cfg),
                     "zips": {"train": _zip_state(paths.TRAIN_ZIP, True),
                              "evaluation": _zip_state(paths.EVAL_ZIP, True)}}
            (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2))
            if (paths.INTERIM / ".gitkeep").exists():  # the project's folder is kept in git
                (tmp / ".gitkeep").touch()
    finally:
        for zf in zips.values():
            zf.close()
    if rgba:
        warnings.warn(f"{len(rgba)} RGBA image(s), alpha channel dropped: {_short_list(rgba)}")
    return manifest


def load_manifest(split: str | None = None) -> pd.DataFrame:
    """The manifest with `low_path`/`high_path` as absolute Paths (None where absent)."""
    if not paths.MANIFEST.exists():
        raise PipelineError(f"{paths.MANIFEST}: missing; run `make unzip` (stage 00) first")
    manifest = pd.read_csv(paths.MANIFEST, dtype={"low_path": str, "high_path": str, "low_sha256": str,
                                                  "high_sha256": str}, keep_default_na=False,
                           na_values={c: [""] for c in ("low_height", "low_width", "high_height", "high_width")})
    for col in ("low_height", "low_width", "high_height", "high_width"):
        manifest[col] = manifest[col].astype("Int64")
    for col in ("low_path", "high_path"):
        manifest[col] = [paths.INTERIM / p if p else None for p in manifest[col]]
    if split is not None:
        if split not in SPLIT_FOLDERS:
            raise PipelineError(f"unknown split '{split}' (train or test)")
        manifest = manifest[manifest["split"] == split].reset_index(drop=True)
    return manifest


def add_arguments(parser) -> None:
    parser.add_argument("--exp", default="demo", help="experiment name or YAML path (data: scale, file patterns)")
    parser.add_argument("--force", action="store_true", help="extract again even if the zips did not change")


def main(args) -> int:
    start = time.time()
    data_cfg = load_config(args.exp)["data"]
    with io.locked(paths.INTERIM):
        if not args.force and up_to_date(data_cfg):
            print(f"unzip: {paths.INTERIM} is up to date with {paths.TRAIN_ZIP.name} and {paths.EVAL_ZIP.name}; "
                  "nothing to do")
            return 0
        manifest = extract(data_cfg)
    counts = manifest["split"].value_counts()
    print(f"unzip: {counts.get('train', 0)} train pairs + {counts.get('test', 0)} test scenes "
          f"(x{data_cfg['scale']}) -> {paths.INTERIM}, manifest {paths.MANIFEST.name} "
          f"({time.time() - start:.1f} s)")
    return 0
