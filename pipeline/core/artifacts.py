"""Readers of the artifacts the stages leave on disk, one place for each format.

Every stage writes its artifacts under the work folder (`pipeline.core.paths`) and the later
stages, the tools and the report read them back through these functions, which say in one
line what is missing and which command makes it:
- `data/interim/manifest.csv` (stage 00): `load_manifest`;
- `data/interim/degradation.json` (the degradation probe): `load_degradation`;
- `data/folds.csv` (stage 01): `load_folds`;
- `models/<exp>/oof/summary.json` (stage 03): `oof_summary`;
- `models/blends/<name>/blend.json` (`python -m pipeline blend`): `read_blend`, `weighted_checkpoints`;
- `data/predictions/<exp>/ensemble.json` (stage 04): `read_ensemble_record`, `checkpoint_record`;
- the test scenes a submission must answer: `test_scenes`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.core import paths
from pipeline.core.checkpoints import find_checkpoints, read_checkpoint
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.io import sha256_file

# --- stage 00: the manifest ----------------------------------------------------------------

SPLIT_FOLDERS = {"train": "train", "test": "evaluation"}   # split -> folder under data/interim
MANIFEST_COLUMNS = ["id", "scene", "split", "low_path", "high_path", "low_height", "low_width",
                    "high_height", "high_width", "low_sha256", "high_sha256"]
SIZE_COLUMNS = ("low_height", "low_width", "high_height", "high_width")


def load_manifest(split: str | None = None) -> pd.DataFrame:
    """The manifest with `low_path`/`high_path` as absolute Paths (None where absent)."""
    if not paths.MANIFEST.exists():
        raise PipelineError(f"{paths.MANIFEST}: missing; run `make unzip` (stage 00) first")
    manifest = pd.read_csv(paths.MANIFEST, dtype={"low_path": str, "high_path": str, "low_sha256": str,
                                                  "high_sha256": str}, keep_default_na=False,
                           na_values={c: [""] for c in SIZE_COLUMNS})
    for col in SIZE_COLUMNS:
        manifest[col] = manifest[col].astype("Int64")
    for col in ("low_path", "high_path"):
        manifest[col] = [paths.INTERIM / p if p else None for p in manifest[col]]
    if split is not None:
        if split not in SPLIT_FOLDERS:
            raise PipelineError(f"unknown split '{split}' (train or test)")
        manifest = manifest[manifest["split"] == split].reset_index(drop=True)
    return manifest


def answer_name(cfg: dict, scene_id: int) -> str:
    return cfg["data"]["answer"].format(i=int(scene_id))


def test_scenes(cfg: dict) -> list[dict]:
    """The test split of the manifest: id, low path, expected answer name and shape."""
    scale = int(cfg["data"]["scale"])
    test = load_manifest("test")
    if test.empty:
        raise PipelineError(f"{paths.MANIFEST}: no test scenes")
    return [{"id": int(row.id), "low_path": row.low_path, "answer": answer_name(cfg, row.id),
             "shape": (int(row.low_height) * scale, int(row.low_width) * scale, 3)}
            for row in test.itertuples()]


# --- the degradation probe -------------------------------------------------------------------

def degradation_path() -> Path:
    return paths.INTERIM / "degradation.json"


def load_degradation() -> dict:
    path = degradation_path()
    if not path.is_file():
        raise PipelineError(f"{path}: missing; run `python -m pipeline degradation` (`make unzip` runs it)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None


# --- stage 01: folds -------------------------------------------------------------------------

def load_folds() -> pd.DataFrame:
    """data/folds.csv as a DataFrame (id, scene, fold, edge_density[, group])."""
    if not paths.FOLDS.exists():
        raise PipelineError(f"{paths.FOLDS}: missing; run `make folds` (stage 01) first")
    return pd.read_csv(paths.FOLDS, dtype={"group": str})


# --- stage 03: out-of-fold scores --------------------------------------------------------------

def oof_summary(exp: str) -> dict | None:
    """Stage 03's summary.json of `exp` (None when stage 03 has not run)."""
    path = paths.oof_dir(exp) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


# --- blends ------------------------------------------------------------------------------------

BLEND_JSON = "blend.json"
BLEND_FORMAT = "sr-pipeline-blend/1"


def is_blend_file(path: str | Path) -> bool:
    return Path(path).suffix == ".json"


def read_blend(name_or_path: str | Path) -> tuple[Path, dict]:
    """(path, record) of a blend by name (models/blends/<name>/blend.json) or file path."""
    path = Path(name_or_path)
    if not is_blend_file(path):
        path = paths.blend_dir(str(name_or_path)) / BLEND_JSON
    if not path.is_file():
        raise PipelineError(f"{path}: no such blend; fit one with `python -m pipeline blend --exps A B --name NAME`")
    try:
        record = json.loads(path.read_text())
    except ValueError:
        raise PipelineError(f"{path}: not valid JSON") from None
    if not isinstance(record, dict) or record.get("format") != BLEND_FORMAT:
        raise PipelineError(f"{path}: not a blend file (format '{BLEND_FORMAT}' expected)")
    weights = [m["weight"] for m in record["members"]]
    if min(weights) < 0 or abs(sum(weights) - 1) > 1e-6:
        raise PipelineError(f"{path}: member weights {weights} must be non-negative and sum to 1")
    return path, record


def member_dir(exp: str, source: Path) -> Path:
    """A member's experiment folder: beside the blend's own models/ folder when the blend file
    sits in <models>/blends/<name>/ (so a blend of another work folder, a benchmark's, works
    from anywhere), else the current work folder's models/<exp>."""
    blends = source.resolve().parent.parent        # <models>/blends
    beside = blends.parent / exp
    if blends.name == "blends" and beside.is_dir():
        return beside
    return paths.experiment_dir(exp)


def weighted_checkpoints(record: dict, source: Path, models: str = "folds") -> list[tuple[Path, float]]:
    """Every member's fold x seed best.pt (`models="folds"`), or its full-data fits (`"full"`),
    or both, with its weight in the blend: the member's weight (fitted out of fold) shared
    equally among its checkpoints (as stage 04 averages one experiment's)."""
    out = []
    for member in record["members"]:
        if member["weight"] == 0:
            continue
        folder = member_dir(member["exp"], source)
        found = find_checkpoints(folder, seeds=member["seeds"], models=models)
        if not found:
            raise PipelineError(f"{source}: member {member['exp']} has no checkpoint "
                                f"seed*/{paths.runs_glob(models)}/best.pt "
                                f"for seed(s) {member['seeds']} under {folder}")
        out += [(p, member["weight"] / len(found)) for p in found]
    return out


# --- stage 04: the ensemble record -----------------------------------------------------------

def relative_to_workdir(path: Path) -> str:
    """Paths in the JSON records are relative to the work folder, so it can move."""
    try:
        return str(Path(path).resolve().relative_to(paths.WORKDIR))
    except ValueError:
        return str(Path(path).resolve())


def checkpoint_record(path: Path) -> dict:
    """What identifies one checkpoint for later staleness checks."""
    ckpt = read_checkpoint(path)
    return {"path": relative_to_workdir(path), "seed": ckpt.get("seed"), "fold": ckpt.get("fold"),
            "step": ckpt.get("step"), "val_ssim": ckpt.get("val_ssim"),
            "net": ckpt["net"]["name"], "val_split": ckpt.get("val_split"),
            "mtime": path.stat().st_mtime, "sha256": sha256_file(path)}


def read_ensemble_record(exp: str) -> dict:
    meta = paths.ensemble_record(exp)
    if not meta.is_file():
        raise PipelineError(f"{meta}: missing, no ensembled predictions; run `make ensemble EXP={exp}` first")
    try:
        return json.loads(meta.read_text())
    except ValueError:
        raise PipelineError(f"{meta}: not valid JSON; rerun `make ensemble EXP={exp}`") from None


def blend_config(blend: str | Path) -> tuple[dict, Path, dict]:
    """(config, blend file, blend record) of a blend: the first member's config, named after
    the blend (its predictions and zips go under that name), with the blend's TTA."""
    path, record = read_blend(blend)
    cfg = load_config(record["members"][0]["exp"])
    cfg["exp"] = record["name"]
    cfg["infer"]["tta"] = record["tta"]
    return cfg, path, record
