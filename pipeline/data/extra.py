"""External training data (`data.extra`): folders of high-res images with synthesised low-res.

    data.extra: [DIR, ...]        tif/png/jpg, searched recursively, any size
    data.extra_kernel: NAME       default: the degradation probe's answer (degradation.json)
    data.extra_weight: SHARE      share of training crops drawn from them (default: in
                                  proportion to their pixels, like competition scenes)
      -> data/interim/extra/{manifest.json, high/extra_{k}.tif, low/extra_{k}.tif}

Each image is cut into scenes as `demo-data --source` does (centre-cropped to a multiple
of the scale; much larger than the competition's 1200x1500, it is cut into a grid of
pieces of at most that size) and its low-res made with the organiser's kernel: external high-res
images are only worth something when their low-res comes from the same degradation as
the competition's. Files are checked by the rules of stage 00 (uint8 RGB; 16-bit, grey
and undecodable files are refused, one line each) and a file identical to a competition
scene is refused (it would leak into validation).

The cache is rebuilt only when something it was made from changes: the folders' file
list, a file's content (size and date, then sha256 when those moved), the kernel or the
scale (`manifest.json` records them). External scenes are used for training only: they
have no fold, so they never reach validation, stage 03's out-of-fold score or CV.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.core import io, locks, paths
from pipeline.core.artifacts import load_degradation
from pipeline.core.errors import PipelineError
from pipeline.data.competition import MAX_HIGH_SIZE, MIN_LOW_SIDE
from pipeline.data.degradation import check_kernel, downscale

MANIFEST_NAME = "manifest.json"


def extra_dir() -> Path:
    return paths.INTERIM / "extra"


def configured_dirs(cfg: dict[str, Any]) -> list[Path]:
    """data.extra as absolute folders (relative ones are relative to the project root)."""
    extra = cfg["data"]["extra"] or []
    if isinstance(extra, (str, Path)):
        extra = [extra]
    if not isinstance(extra, list):
        raise PipelineError(f"config '{cfg['exp']}': data.extra must be a list of folders, got {extra!r}")
    return [(paths.ROOT / Path(d).expanduser()).resolve() for d in extra]


def kernel_for(cfg: dict[str, Any]) -> str:
    """data.extra_kernel, else the probe's kernel; refuses a probe that found no fit."""
    scale = int(cfg["data"]["scale"])
    if cfg["data"]["extra_kernel"]:
        return check_kernel(str(cfg["data"]["extra_kernel"]), scale)
    found = load_degradation()
    if found.get("scale") != scale:
        raise PipelineError(f"{paths.INTERIM / 'degradation.json'}: probed at x{found.get('scale')}, "
                            f"the config says x{scale}; rerun `python -m pipeline degradation`")
    if not found.get("fits"):
        raise PipelineError(f"{paths.INTERIM / 'degradation.json'}: no candidate reproduces the low-res images "
                            f"(closest {found['best']}, {found['psnr']:.1f} dB): set data.extra_kernel to "
                            "synthesise the external low-res with a kernel of your choice")
    return check_kernel(found["best"], scale)


def list_sources(dirs: list[Path]) -> list[Path]:
    files = []
    for folder in dirs:
        if not folder.is_dir():
            raise PipelineError(f"{folder}: data.extra folder not found")
        found = io.list_images(folder, recursive=True)
        if not found:
            raise PipelineError(f"{folder}: data.extra folder holds no tif/png/jpg image (searched recursively)")
        files += found
    return files


def cut_scenes(image: np.ndarray, scale: int) -> list[np.ndarray]:
    """Scenes of an image: itself centre-cropped to a multiple of the scale (and to at most
    the competition's 1200x1500), or, when it holds more than 1.5 of those along a side, a
    centred grid of equal pieces of at most that size (less than half a piece is lost)."""
    h, w = image.shape[:2]
    rows, cols = (max(1, round(side / limit)) for side, limit in zip((h, w), MAX_HIGH_SIZE))
    ph, pw = (min(side // n, limit) // scale * scale for side, n, limit in zip((h, w), (rows, cols), MAX_HIGH_SIZE))
    top, left = (h - rows * ph) // 2, (w - cols * pw) // 2
    pieces = [image[top + r * ph:top + (r + 1) * ph, left + c * pw:left + (c + 1) * pw]
              for r in range(rows) for c in range(cols)]
    return [p for p in pieces if min(p.shape[:2]) >= MIN_LOW_SIDE * scale]


# Folds trained at once share the cache: a second builder queues behind the first (however
# long its build takes) instead of stopping, and then reuses what it built.
BUILD_WAIT = 24 * 3600.0


def _lock():
    """The cache's write lock (io.locked: one mechanism for every artifact, taken over from a
    builder that died, its half-built temporaries removed)."""
    return locks.locked(extra_dir(), what=f"{extra_dir()} (the external data cache)", wait=BUILD_WAIT)


def _file_state(path: Path, with_sha: bool) -> dict:
    stat = path.stat()
    state = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if with_sha:
        state["sha256"] = io.sha256_file(path)
    return state


def _key(dirs: list[Path], kernel: str, scale: int) -> dict:
    return {"dirs": [str(d) for d in dirs], "kernel": kernel, "scale": scale}


def _cached(key: dict, files: list[Path]) -> dict | None:
    """The cache's manifest if it was made from exactly these inputs (dates refreshed when
    only they moved), else None."""
    path = extra_dir() / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    recorded = manifest.get("sources", [])
    if {k: manifest.get(k) for k in key} != key or [r["path"] for r in recorded] != [str(f) for f in files]:
        return None
    if all({k: r.get(k) for k in ("size", "mtime_ns")} == {k: v for k, v in _file_state(f, False).items()
                                                           if k != "path"} for r, f in zip(recorded, files)):
        return manifest
    states = [_file_state(f, True) for f in files]
    if any(r.get("sha256") != s["sha256"] for r, s in zip(recorded, states)):
        return None
    manifest["sources"] = states
    with io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return manifest


def _competition_hashes() -> dict[str, str]:
    """sha256 of the pixels of every competition training high-res image -> its scene name."""
    import hashlib

    from pipeline.core.artifacts import load_manifest

    rows = load_manifest("train")
    return {hashlib.sha256(io.read_image(p).tobytes()).hexdigest(): str(s)
            for p, s in zip(rows["high_path"], rows["scene"])}


def _read_sources(files: list[Path]) -> list[np.ndarray]:
    """Decode and check every file; every bad one gets its own error line."""
    images, bad, rgba = [], [], []
    for path in tqdm(files, desc="extra data: read", unit="image", disable=None):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                images.append(io.read_image(path))
            rgba += [str(path) for w in caught if "alpha" in str(w.message)]
        except PipelineError as exc:
            bad.append(str(exc))
    if bad:
        more = f"\nerror: data.extra: {len(bad)} bad image(s) of {len(files)}" if len(bad) > 1 else ""
        raise PipelineError("\nerror: ".join(bad) + more)
    if rgba:
        warnings.warn(f"data.extra: {len(rgba)} RGBA image(s), alpha channel dropped: {', '.join(rgba[:5])}"
                      + (" ..." if len(rgba) > 5 else ""))
    return images


def build(dirs: list[Path], files: list[Path], kernel: str, scale: int) -> dict:
    """Cut, check and downscale every source into the cache folder (atomically)."""
    import hashlib

    images = _read_sources(files)
    competition = _competition_hashes()
    for path, image in zip(files, images):
        copy_of = competition.get(hashlib.sha256(image.tobytes()).hexdigest())
        if copy_of is not None:
            raise PipelineError(f"{path}: identical to the competition's training scene {copy_of}; external "
                                "data must not hold competition scenes (it would leak into validation)")
    scenes = []
    with io.atomic_dir(extra_dir()) as tmp:
        (tmp / "high").mkdir()
        (tmp / "low").mkdir()
        for path, image in tqdm(list(zip(files, images)), desc=f"extra data: {kernel} x{scale}",
                                unit="image", disable=None):
            for piece, high in enumerate(cut_scenes(image, scale)):
                name = f"extra_{len(scenes)}.tif"
                io.write_tif(tmp / "high" / name, high)
                io.write_tif(tmp / "low" / name, downscale(high, scale, kernel))
                scenes.append({"id": f"extra_{len(scenes)}", "source": str(path), "piece": piece,
                               "high": f"high/{name}", "low": f"low/{name}", "height": high.shape[0],
                               "width": high.shape[1]})
        if not scenes:
            raise PipelineError(f"data.extra: no image of {', '.join(map(str, dirs))} is at least "
                                f"{MIN_LOW_SIDE * scale} px on its short side (x{scale})")
        manifest = {**_key(dirs, kernel, scale), "sources": [_file_state(f, True) for f in files],
                    "scenes": scenes}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


def prepare(cfg: dict[str, Any]) -> dict | None:
    """The external data's manifest, built or reused (None when data.extra is empty)."""
    dirs = configured_dirs(cfg)
    if not dirs:
        return None
    scale, kernel = int(cfg["data"]["scale"]), kernel_for(cfg)
    files = list_sources(dirs)
    key = _key(dirs, kernel, scale)
    with _lock():
        manifest = _cached(key, files)
        if manifest is None:
            manifest = build(dirs, files, kernel, scale)
            manifest["built"] = True
    return manifest


def training_scenes(cfg: dict[str, Any], min_lr_side: int) -> list:
    """The external scenes for training (data.Scene), smaller ones than a crop left out."""
    from pipeline.data.patches import Scene

    manifest = prepare(cfg)
    if manifest is None or cfg["data"]["extra_weight"] == 0:
        return []
    root = extra_dir()
    scenes = [Scene(s["id"], io.read_image(root / s["low"]), io.read_image(root / s["high"]))
              for s in manifest["scenes"]]
    kept = [s for s in scenes if min(s.lr.shape[:2]) >= min_lr_side]
    if len(kept) < len(scenes):
        warnings.warn(f"data.extra: {len(scenes) - len(kept)} external scene(s) smaller than "
                      f"train.lr_patch {min_lr_side} px (low-res) left out")
    if not kept:
        raise PipelineError(f"data.extra: no external scene is at least train.lr_patch {min_lr_side} px "
                            "(low-res) on its short side")
    return kept


def describe(cfg: dict[str, Any], scenes: list) -> str:
    share = cfg["data"]["extra_weight"]
    manifest = json.loads((extra_dir() / MANIFEST_NAME).read_text())
    return (f"{len(scenes)} external scenes from {len(manifest['sources'])} image(s), low-res by "
            f"{manifest['kernel']} x{manifest['scale']}, "
            + (f"{share:.0%} of the crops" if share is not None else "crops in proportion to pixels")
            + f" ({extra_dir()})")
