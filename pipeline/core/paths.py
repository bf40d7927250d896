"""Every path the pipeline reads or writes, relative to the project root, in one place.

Nothing changes the working directory: all paths are absolute, derived from this file's
location, so commands behave the same from any folder.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CONFIGS = ROOT / "pipeline" / "configs"   # experiment YAML files (code, not artifacts)


def set_workdir(workdir: str | Path) -> None:
    """Point every artifact path at `workdir` (default: the project root).

    `SR_WORKDIR` sets it for a whole process; tests call this to work in a temporary
    folder. Code must read `paths.X` at call time (never `from .paths import X`) so
    this takes effect everywhere.
    """
    global WORKDIR, DATA, RAW, TRAIN_ZIP, EVAL_ZIP, INTERIM, MANIFEST, FOLDS, PREDICTIONS
    global DEMO, DEMO_ANSWERS, MODELS, PRETRAINED, SUBMISSIONS, BENCH, REPORTS
    WORKDIR = Path(workdir).resolve()
    DATA = WORKDIR / "data"
    RAW = DATA / "raw"                      # the organiser's zips
    TRAIN_ZIP = RAW / "train.zip"
    EVAL_ZIP = RAW / "evaluation.zip"
    INTERIM = DATA / "interim"              # stage 00: unzipped scenes + manifest.csv
    MANIFEST = INTERIM / "manifest.csv"
    FOLDS = DATA / "folds.csv"              # stage 01
    PREDICTIONS = DATA / "predictions"      # stage 04: predictions/<exp>/test_{i}_answer.tif
    DEMO = DATA / "demo"                    # demo competition answers (demo/answers/)
    DEMO_ANSWERS = DEMO / "answers"
    MODELS = WORKDIR / "models"             # models/<exp>/seed<s>/fold<f>/, models/<exp>/oof/
    PRETRAINED = MODELS / "pretrained"
    SUBMISSIONS = WORKDIR / "submissions"   # <exp>-<timestamp>.zip
    BENCH = WORKDIR / "bench"               # make bench results
    REPORTS = WORKDIR / "reports"           # make report: index.html + its images


set_workdir(os.environ.get("SR_WORKDIR", ROOT))

# Read-only material beside the checkout (weights, fixtures, real data); may be absent.
SHARED = Path(os.environ.get("SR_SHARED_DIR", ROOT.parent / "shared")).resolve()
SHARED_WEIGHTS = SHARED / "weights"
SHARED_FIXTURES = SHARED / "fixtures"
SHARED_DATA = SHARED / "data"


def experiment_dir(exp: str) -> Path:
    return MODELS / exp


FULL = "all"           # the `fold` of a full-data fit: every training scene, no validation
FULL_FOLDER = "full"   # ... and its run folder beside the folds' (models/<exp>/seed<s>/full)
# which runs an ensemble takes (`infer.models`), as run-folder patterns under models/<exp>/seed<s>/
ENSEMBLE_RUNS = {"folds": ("fold*",), "full": (FULL_FOLDER,), "both": ("fold*", FULL_FOLDER)}


def runs_glob(models: str) -> str:
    """The run folders of `models` as one name for messages: fold*, full or {fold*,full}."""
    runs = ENSEMBLE_RUNS[models]
    return runs[0] if len(runs) == 1 else "{" + ",".join(runs) + "}"


def run_dir(exp: str, seed: int, fold: int | str) -> Path:
    """Where one training run (one fold of one seed, or the seed's full-data fit) keeps its artifacts."""
    return MODELS / exp / f"seed{seed}" / (FULL_FOLDER if fold == FULL else f"fold{fold}")


def oof_dir(exp: str) -> Path:
    return MODELS / exp / "oof"


def oof_predictions_dir(exp: str) -> Path:
    """Stage 03's float out-of-fold predictions, one <scene id>.npy each (what a blend fits on)."""
    return oof_dir(exp) / "pred_float"


def blend_dir(name: str) -> Path:
    return MODELS / "blends" / name


def predictions_dir(exp: str) -> Path:
    return PREDICTIONS / exp


# stage 04's record beside its answers (checkpoints, TTA, precision): stage 05, the ledger and
# the ablation table read it
ENSEMBLE_JSON = "ensemble.json"


def ensemble_record(exp: str) -> Path:
    """Stage 04's record of `exp`'s current predictions."""
    return predictions_dir(exp) / ENSEMBLE_JSON


def weights_search_dirs() -> list[Path]:
    """SR_WEIGHTS_DIR (':'-separated) first, then models/pretrained/."""
    dirs = [Path(p) for p in os.environ.get("SR_WEIGHTS_DIR", "").split(os.pathsep) if p]
    return dirs + [PRETRAINED]
