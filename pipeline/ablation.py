"""The ablation table of a benchmark competition, as markdown, from the results on disk.

    python -m pipeline.ablation [--workdir data/benchmarks/aerial] [--exp aerial]

`make benchmark-aerial` leaves, under its work folder, the test predictions of every row
(`data/predictions/<row>/`) and the training results (`models/<exp>/...`). This reads
them and prints one markdown row per result found (rows with nothing on disk are left
out), so the README's table is reproducible from files:

- test: the competition SSIM (`pipeline.score`) of the row's predictions against the
  test answers (`data/demo/answers`);
- CV: what the training data says about the same recipe, measured on scenes the net
  never trained on: stage 03's out-of-fold SSIM (`models/<exp>/oof/summary.json`,
  TTA as in the config) for the fold ensemble and for fold 0 with TTA; the held-out
  fold's validation SSIM of `best.pt` (no TTA) for single-fold rows; step 0 of every
  fold's validation (the pretrained net before any step, no TTA) for the pretrained net;
  stage 03's bicubic figure for bicubic.
Ablations are the experiments `<exp>_*` (one change each to `<exp>.yaml`) trained on
fold 0 and predicted without TTA: compare them with the "fine-tuned, fold 0" row.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import paths
from .checkpoints import read_checkpoint
from .config import load_config
from .errors import PipelineError

AERIAL_WORKDIR = paths.ROOT / "data" / "benchmarks" / "aerial"
REFERENCE_ROW = "pretrained-tta8"   # the gains are measured against pretrained RLFN + TTA
ABLATION_FOLD = 0                   # ablations are trained on this fold only


@dataclass
class Row:
    label: str
    predictions: str                # folder name under data/predictions/
    cv: float | None
    cv_what: str


def _oof_summary(exp: str) -> dict | None:
    path = paths.oof_dir(exp) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _best_val(exp: str, fold: int = ABLATION_FOLD, seed: int = 0) -> float | None:
    path = paths.run_dir(exp, seed, fold) / "best.pt"
    return float(read_checkpoint(path)["val_ssim"]) if path.is_file() else None


def _pretrained_cv(exp: str) -> tuple[float | None, int]:
    """Mean over the folds' held-out scenes of the step-0 validation (the untouched pretrained net)."""
    total, n, folds = 0.0, 0, 0
    for log_path in sorted(paths.experiment_dir(exp).glob("seed0/fold*/log.csv")):
        log = pd.read_csv(log_path)
        fold = int(log_path.parent.name[4:])
        size = len(_fold_ids(fold))
        total, n, folds = total + float(log.loc[log["step"] == 0, "val_ssim"].iloc[0]) * size, n + size, folds + 1
    return (total / n if n else None), folds


def _fold_cv(exp: str, oof: dict | None) -> float | None:
    """Stage 03's SSIM of fold ABLATION_FOLD's checkpoint of the first seed (the one the
    fold-0 rows predict the test with); summary.json's per-fold figure averages all seeds."""
    if not oof:
        return None
    table_path = paths.oof_dir(exp) / "oof.csv"
    if len(oof["seeds"]) > 1 and table_path.is_file():
        table = pd.read_csv(table_path)
        rows = table[(table["fold"] == ABLATION_FOLD) & (table["seed"] == oof["seeds"][0])]
        return float(rows["ssim"].mean()) if len(rows) else None
    return oof["per_fold"].get(str(ABLATION_FOLD), {}).get("mean")


def _fold_ids(fold: int) -> list:
    from .data import fold_ids
    return fold_ids(fold)[1]


def collect_rows(exp: str) -> list[Row]:
    """Every row of the table that has results on disk, in the table's order."""
    cfg = load_config(exp)
    oof = _oof_summary(exp)
    tta = cfg["infer"]["tta"]
    net = cfg["model"]["name"].upper().replace("_", "-")
    pre_cv, pre_folds = _pretrained_cv(exp)
    rows = [
        Row("bicubic", "bicubic", oof["bicubic"]["mean"] if oof else None, "stage 03 bicubic, all folds"),
        Row(f"pretrained {net}, no fine-tuning", "pretrained", pre_cv,
            f"step-0 validation, {pre_folds} fold(s)"),
        Row(f"pretrained {net} + 8-way TTA", REFERENCE_ROW, None, ""),
        Row(f"fine-tuned (`{exp}`), fold {ABLATION_FOLD}", f"{exp}-fold{ABLATION_FOLD}",
            _best_val(exp), f"fold {ABLATION_FOLD} validation, best.pt"),
        Row(f"fine-tuned, fold {ABLATION_FOLD} + {tta}-way TTA", f"{exp}-fold{ABLATION_FOLD}-tta{tta}",
            _fold_cv(exp, oof), f"stage 03, fold {ABLATION_FOLD}"),
    ]
    if oof:
        n_folds, seeds = len(oof["folds"]), oof["seeds"]
        folds_label = f"fine-tuned, {n_folds} folds"
        if len(seeds) == 1:
            rows.append(Row(f"{folds_label} + {tta}-way TTA (stage 04)", exp, oof["cv"]["mean"], "stage 03, all folds"))
        else:   # the first seed alone (`predict --checkpoint models/<exp>/seed<s>`), then all seeds
            first = seeds[0]
            rows.append(Row(f"{folds_label}, seed {first} + {tta}-way TTA", f"{exp}-seed{first}",
                            oof["per_seed"][str(first)]["mean"], f"stage 03, all folds, seed {first}"))
            cv = oof["seed_ensemble"]["cv"]["mean"] if oof.get("seed_ensemble") else None
            rows.append(Row(f"{folds_label} x seeds {' '.join(map(str, seeds))} + {tta}-way TTA (stage 04)", exp, cv,
                            "stage 03, all folds, seed ensemble"))
    for path in sorted(paths.MODELS.glob("blends/*/blend.json")):   # pipeline/blend.py
        record = json.loads(path.read_text())
        mix = " + ".join(f"{m['weight']:.2f} `{m['exp']}`" for m in record["members"] if m["weight"] > 0)
        rows.append(Row(f"blend `{record['name']}` ({record['kept']} weights): {mix}", record["name"],
                        record["cv"]["blend"], "stage 03 floats; fitted weights scored out of fold"))
    for path in sorted(paths.CONFIGS.glob(f"{exp}_*.yaml")):
        variant = path.stem
        if load_config(variant)["data"]["scale"] != cfg["data"]["scale"]:
            continue   # another competition (aerial_x5), not a variant of this one
        description = next((line.lstrip("# ").split(":", 1)[-1].strip().rstrip(".") for line in path.read_text().splitlines()
                            if line.startswith("#")), variant)
        rows.append(Row(f"ablation `{variant}`: {description}", f"{variant}-fold{ABLATION_FOLD}",
                        _best_val(variant), f"fold {ABLATION_FOLD} validation, best.pt"))
    return rows


def test_score(folder: Path, answers: Path, data_cfg: dict) -> float | None:
    """Mean competition SSIM of a prediction folder against the answers (None if absent).

    Stage 04 names its files like the submission (`test_{i}_answer.tif`); `predict` keeps
    the input names (`test_{i}_low.tif`): either is matched to `test_{i}_high.tif` by id.
    """
    from .score import score_submission

    if not folder.is_dir():
        return None
    pattern = data_cfg["answer"] if (folder / data_cfg["answer"].format(i=0)).exists() else data_cfg["test_low"]
    return float(score_submission(folder, answers, {**data_cfg, "answer": pattern})["ssim"].mean())


def table(exp: str = "aerial") -> str:
    """The markdown table of the current work folder."""
    answers = paths.DEMO_ANSWERS
    if not answers.is_dir():
        raise PipelineError(f"{answers}: no test answers here; build the benchmark first "
                            "(`make benchmark-aerial`)")
    data_cfg = load_config(exp)["data"]
    scored = []
    for row in collect_rows(exp):
        score = test_score(paths.PREDICTIONS / row.predictions, answers, data_cfg)
        if score is not None or row.cv is not None:
            scored.append((row, score))
    reference = next((s for r, s in scored if r.predictions == REFERENCE_ROW), None)
    n_test = len(list(answers.glob("*")))
    lines = [f"| recipe | CV | test SSIM ({n_test} answers) | vs pretrained + TTA | CV measured on |",
             "|---|---|---|---|---|"]
    for row, score in scored:
        cv = "—" if row.cv is None else f"{row.cv:.4f}"
        test = "—" if score is None else f"{score:.4f}"
        gain = "" if score is None or reference is None or row.predictions == REFERENCE_ROW \
            else f"{score - reference:+.4f}"
        lines.append(f"| {row.label} | {cv} | {test} | {gain} | {row.cv_what} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=AERIAL_WORKDIR,
                        help=f"the benchmark's work folder (default {AERIAL_WORKDIR.relative_to(paths.ROOT)})")
    parser.add_argument("--exp", default="aerial", help="the recipe whose table to print (default aerial)")
    args = parser.parse_args(argv)
    paths.set_workdir(args.workdir)
    try:
        print(table(args.exp))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
