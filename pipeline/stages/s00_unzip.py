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
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from tqdm import tqdm

from pipeline.core import io, locks, paths
from pipeline.core.artifacts import MANIFEST_COLUMNS, SPLIT_FOLDERS
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.competition import check_bounds, index_members, open_zip, read_member, short_list

STAMP_NAME = "zips.json"
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
        zf = open_zip(zip_path)
        zips[split] = zf
        jobs += [(split, zip_path, zf, i, members) for i, members in sorted(index_members(zip_path, zf, roles).items())]

    rows, rgba = [], []
    try:
        check_bounds(jobs, data_cfg)
        with locks.locked(paths.INTERIM), io.atomic_dir(paths.INTERIM) as tmp:
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
        warnings.warn(f"{len(rgba)} RGBA image(s), alpha channel dropped: {short_list(rgba)}")
    return manifest


def add_arguments(parser) -> None:
    parser.add_argument("--exp", default="demo", help="experiment name or YAML path (data: scale, file patterns)")
    parser.add_argument("--force", action="store_true", help="extract again even if the zips did not change")


def main(args) -> int:
    start = time.time()
    data_cfg = load_config(args.exp)["data"]
    with locks.locked(paths.INTERIM):
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
