"""The ablation table of a benchmark competition, as markdown, from the results on disk.

    python -m pipeline ablation [--workdir data/benchmarks/aerial] [--exp aerial]

`python -m pipeline benchmark-aerial` leaves, under its work folder, the test predictions of every row
(`data/predictions/<row>/`) and the training results (`models/<exp>/...`). This reads
them and prints one markdown row per result found (rows with nothing on disk are left
out), so docs/recipes.md's table is reproducible from files:

- test: the competition SSIM (`pipeline.tools.score`) of the row's predictions against the
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import io, paths
from pipeline.core.artifacts import oof_summary
from pipeline.core.checkpoints import read_checkpoint, run_seconds
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError

AERIAL_WORKDIR = paths.ROOT / "data" / "benchmarks" / "aerial"
REFERENCE_ROW = "pretrained-tta8"   # the gains are measured against pretrained RLFN + TTA
ABLATION_FOLD = 0                   # ablations are trained on this fold only
PARALLEL_JOBS = 2                   # folds trained side by side by `benchmark-aerial` (its --jobs)
RANDOM_FOLDS_SUFFIX = "-random-folds"   # <workdir>-random-folds: the same benchmark, folds without groups
TRAINING_BUDGET_HOURS = 2.5         # the default submission's training must fit in this on the 2-core machine
DEFAULT_SUBMISSION = "default-submission.txt"


@dataclass
class Row:
    label: str
    predictions: str | Path         # folder under data/predictions/ (a Path: another work folder's)
    cv: float | None
    cv_what: str
    cv_reference: float | None = None   # pretrained + TTA on the same CV scenes: the CV gain's origin
    train_seconds: float | None = None  # wall time of the training it needs (every member's, for a blend)
    checkpoint: Path | None = None      # what `predict --checkpoint` takes: a default-submission candidate


def _best_val(exp: str, fold: int = ABLATION_FOLD, seed: int = 0) -> float | None:
    path = paths.run_dir(exp, seed, fold) / "best.pt"
    return float(read_checkpoint(path)["val_ssim"]) if path.is_file() else None


def _unfinished(exp: str, fold: int = ABLATION_FOLD, seed: int = 0) -> str:
    """' (stopped at step N of M)' for a run whose log ends before its configured steps, else
    '': an interrupted run's best.pt is only the best so far, and the table must say so."""
    path = paths.run_dir(exp, seed, fold) / "log.csv"
    if not path.is_file():
        return ""
    last, steps = int(pd.read_csv(path)["step"].max()), int(load_config(exp)["train"]["steps"])
    return f" (stopped at step {last} of {steps})" if last < steps else ""


def _pretrained_cv(exp: str) -> tuple[float | None, int]:
    """Mean over the folds' held-out scenes of the step-0 validation (the untouched pretrained net)."""
    total, n, folds = 0.0, 0, 0
    for log_path in sorted(paths.experiment_dir(exp).glob("seed0/fold*/log.csv")):
        log = pd.read_csv(log_path)
        fold = int(log_path.parent.name[4:])
        size = len(_fold_ids(fold))
        total, n, folds = total + float(log.loc[log["step"] == 0, "val_ssim"].iloc[0]) * size, n + size, folds + 1
    return (total / n if n else None), folds


def _pretrained_tta_cv(exp: str, oof: dict | None) -> float | None:
    """Stage 03's starting-point figure of `exp`: its pretrained net, untouched, with the
    recipe's TTA, on every training scene (no fold trained it, so no fold can leak)."""
    if not oof or "start" not in oof or oof.get("start_weights") != load_config(exp)["model"]["pretrained"]:
        return None
    return float(oof["start"]["mean"])


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
    from pipeline.data.patches import fold_ids
    return fold_ids(fold)[1]


def _training_seconds(exp: str) -> float | None:
    """Training wall time of an experiment on this machine as `make benchmark-aerial` runs
    it (--jobs folds at once, one thread each): the runs' times summed, divided by the
    jobs that ran side by side."""
    seconds = [run_seconds(run) for run in sorted(paths.experiment_dir(exp).glob("seed*/fold*"))]
    seconds = [t for t in seconds if t is not None]
    return sum(seconds) / max(1, min(PARALLEL_JOBS, len(seconds))) if seconds else None


def _description(exp: str) -> str:
    """The first comment line of the experiment's YAML after its 'Ablation of ...:' prefix."""
    path = paths.CONFIGS / f"{exp}.yaml"
    lines = path.read_text().splitlines() if path.is_file() else []
    return next((line.lstrip("# ").split(":", 1)[-1].strip().rstrip(".") for line in lines
                 if line.startswith("#")), exp)


def kfold_experiments(exp: str) -> list[str]:
    """`exp` and every experiment of this work folder that stage 03 scored on all folds, `exp` first."""
    found = sorted(p.parent.parent.name for p in paths.MODELS.glob("*/oof/summary.json"))
    return [exp] * (exp in found) + [e for e in found if e != exp]


def _kfold_row(exp: str, cfg: dict, main: str, oof: dict, reference: float | None) -> list[Row]:
    n_folds, seeds, tta = len(oof["folds"]), oof["seeds"], cfg["infer"]["tta"]
    label = "fine-tuned" if exp == main else f"`{exp}`: {_description(exp)}"
    common = dict(cv_reference=reference, train_seconds=_training_seconds(exp),
                  checkpoint=paths.experiment_dir(exp))
    if len(seeds) == 1:
        return [Row(f"{label}, {n_folds} folds + {tta}-way TTA (stage 04)", exp, oof["cv"]["mean"],
                    "stage 03, all folds, grouped", **common)]
    first = seeds[0]   # the first seed alone (`predict --checkpoint models/<exp>/seed<s>`), then all seeds
    cv = oof["seed_ensemble"]["cv"]["mean"] if oof.get("seed_ensemble") else None
    return [Row(f"{label}, {n_folds} folds, seed {first} + {tta}-way TTA", f"{exp}-seed{first}",
                oof["per_seed"][str(first)]["mean"], f"stage 03, all folds, seed {first}", cv_reference=reference),
            Row(f"{label}, {n_folds} folds x seeds {' '.join(map(str, seeds))} + {tta}-way TTA (stage 04)", exp, cv,
                "stage 03, all folds, seed ensemble", **common)]


def _blend_rows(reference: float | None, seconds_of: dict[str, float | None]) -> list[Row]:
    rows = []
    for path in sorted(paths.MODELS.glob("blends/*/blend.json")):   # pipeline/infer/blend.py
        record = json.loads(path.read_text())
        mix = " + ".join(f"{m['weight']:.2f} `{m['exp']}`" for m in record["members"] if m["weight"] > 0)
        # every member's training, zero weights too: the fit that gave them zero needed them
        seconds = [seconds_of.get(m["exp"]) for m in record["members"]]
        what = ("stage 03 floats, equal weights" if record["kept"] == "equal" else
                "stage 03 floats; weights fitted without the scored fold")
        rows.append(Row(f"blend `{record['name']}` ({record['kept']} weights): {mix}", record["name"],
                        record["cv"]["blend"], what, cv_reference=reference,
                        train_seconds=sum(seconds) if None not in seconds else None, checkpoint=path))
    return rows


def random_folds_workdir(workdir: Path) -> Path:
    """The sibling work folder of the same benchmark with folds split scene by scene (no groups)."""
    return workdir.parent / f"{workdir.name}{RANDOM_FOLDS_SUFFIX}"


def _random_folds_row(exp: str) -> Row | None:
    """`exp` trained and scored with random folds in the sibling work folder, if it was run:
    the same training and test tiles, only the folds ignore places."""
    grouped = paths.WORKDIR
    other = random_folds_workdir(grouped)
    if not (other / "models" / exp / "oof" / "summary.json").is_file():
        return None
    paths.set_workdir(other)
    try:
        oof = oof_summary(exp)
        return Row(f"fine-tuned (`{exp}`), {len(oof['folds'])} **random** folds + {oof['inference']['tta']}-way TTA",
                   paths.predictions_dir(exp), oof["cv"]["mean"],
                   f"stage 03, random folds ({other.name})", cv_reference=_pretrained_tta_cv(exp, oof),
                   train_seconds=_training_seconds(exp))
    finally:
        paths.set_workdir(grouped)


def collect_rows(exp: str) -> list[Row]:
    """Every row of the table that has results on disk, in the table's order."""
    cfg = load_config(exp)
    oof = oof_summary(exp)
    tta = cfg["infer"]["tta"]
    net = cfg["model"]["name"].upper().replace("_", "-")
    pre_cv, pre_folds = _pretrained_cv(exp)
    reference = _pretrained_tta_cv(exp, oof)
    rows = [
        Row("bicubic", "bicubic", oof["bicubic"]["mean"] if oof else None, "stage 03 bicubic, all folds"),
        Row(f"pretrained {net}, no fine-tuning", "pretrained", pre_cv,
            f"step-0 validation, {pre_folds} fold(s)"),
        Row(f"pretrained {net} + {tta}-way TTA", REFERENCE_ROW, reference,
            "stage 03 starting point, every training scene", cv_reference=reference),
        Row(f"fine-tuned (`{exp}`), fold {ABLATION_FOLD}", f"{exp}-fold{ABLATION_FOLD}",
            _best_val(exp), f"fold {ABLATION_FOLD} validation, best.pt{_unfinished(exp)}"),
        Row(f"fine-tuned, fold {ABLATION_FOLD} + {tta}-way TTA", f"{exp}-fold{ABLATION_FOLD}-tta{tta}",
            _fold_cv(exp, oof), f"stage 03, fold {ABLATION_FOLD}"),
    ]
    seconds_of = {}
    for other in kfold_experiments(exp):
        other_cfg = load_config(other)
        if other_cfg["data"]["scale"] != cfg["data"]["scale"]:
            continue   # another competition (aerial_x5), not a variant of this one
        rows += _kfold_row(other, other_cfg, exp, oof_summary(other), reference)
        seconds_of[other] = rows[-1].train_seconds
    rows += _blend_rows(reference, seconds_of)
    random_row = _random_folds_row(exp)
    rows += [random_row] if random_row else []
    for path in sorted(paths.CONFIGS.glob(f"{exp}_*.yaml")):
        variant = path.stem
        if load_config(variant)["data"]["scale"] != cfg["data"]["scale"]:
            continue
        rows.append(Row(f"ablation `{variant}`: {_description(variant)}", f"{variant}-fold{ABLATION_FOLD}",
                        _best_val(variant), f"fold {ABLATION_FOLD} validation, best.pt{_unfinished(variant)}"))
    return rows


class TestScore(float):
    """A prediction folder's mean test SSIM, carrying its per-scene scores (`per_scene`, by id)."""
    per_scene: pd.Series

    def __new__(cls, per_scene: pd.Series) -> "TestScore":
        score = super().__new__(cls, float(per_scene.mean()))
        score.per_scene = per_scene
        return score


def test_score(folder: Path, answers: Path, data_cfg: dict) -> TestScore | None:
    """Competition SSIM of a prediction folder against the answers, per scene and mean (None if absent).

    Stage 04 names its files like the submission (`test_{i}_answer.tif`); `predict` keeps
    the input names (`test_{i}_low.tif`): either is matched to `test_{i}_high.tif` by id.
    """
    from pipeline.data.scoring import score_submission

    if not folder.is_dir():
        return None
    pattern = data_cfg["answer"] if (folder / data_cfg["answer"].format(i=0)).exists() else data_cfg["test_low"]
    table = score_submission(folder, answers, {**data_cfg, "answer": pattern})
    return TestScore(table.set_index("id")["ssim"])


def paired_interval(score: float | None, reference: float | None, level: float = 0.95) -> tuple[float, float] | None:
    """The `level` confidence interval of a test gain, paired per scene against the reference
    (Student's t on the per-scene differences); None without per-scene scores on both sides."""
    from scipy import stats

    if not isinstance(score, TestScore) or not isinstance(reference, TestScore):
        return None
    diff = (score.per_scene - reference.per_scene).dropna()
    if len(diff) < 2:
        return None
    half = float(stats.t.ppf(0.5 + level / 2, len(diff) - 1) * diff.std(ddof=1) / len(diff) ** 0.5)
    return float(diff.mean()) - half, float(diff.mean()) + half


def rank_agreement(scored: list[tuple[Row, float | None]]) -> tuple[float, int] | None:
    """Spearman's rank correlation between grouped CV and test over the candidates trained on
    every fold (experiments and blends) with both figures, and how many; None under 3."""
    pairs = [(row.cv, score) for row, score in scored if row.checkpoint is not None
             and row.cv is not None and score is not None and "random" not in row.label]
    if len(pairs) < 3:
        return None
    cv, test = pd.Series([a for a, _ in pairs]), pd.Series([b for _, b in pairs])
    return float(cv.rank().corr(test.rank())), len(pairs)


def _gain(value: float | None, reference: float | None) -> str:
    return "" if value is None or reference is None else f"{value - reference:+.4f}"


def _hours(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 3600:.2f} h"


def scored_rows(exp: str = "aerial") -> list[tuple[Row, float | None]]:
    """(row, test SSIM or None) for every row with a CV or a test figure."""
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
    return scored


def table(exp: str = "aerial", scored: list[tuple[Row, float | None]] | None = None) -> str:
    """The markdown table of the current work folder.

    Gains are against pretrained + TTA on both sides: the test's on the test tiles, the CV's
    on the training scenes (stage 03's starting point), so "CV gain - test gain" says how
    far the CV's promise was from what the unseen places gave. A gain depends on how hard
    the places are, so each is also a share of the reference's error (1 - its SSIM), which
    compares across places; the test gain's 95 % interval is paired per scene; a line under
    the table gives the rank agreement (Spearman) of grouped CV and test over the candidates."""
    scored = scored_rows(exp) if scored is None else scored
    reference = next((s for r, s in scored if r.predictions == REFERENCE_ROW), None)
    n_test = len(list(paths.DEMO_ANSWERS.glob("*")))
    lines = [f"| recipe | CV | test SSIM ({n_test} answers) | test gain vs pretrained + TTA | CV gain | "
             "CV gain - test gain | training (2 cores) | CV measured on | test gain, 95 % interval | "
             "test gain / (1 - reference) | CV gain / (1 - reference) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, score in scored:
        cv = "—" if row.cv is None else f"{row.cv:.4f}"
        test = "—" if score is None else f"{score:.4f}"
        is_reference = row.predictions == REFERENCE_ROW
        test_gain = "" if is_reference else _gain(score, reference)
        cv_gain = "" if is_reference else _gain(row.cv, row.cv_reference)
        gap = interval = test_share = cv_share = ""
        if not is_reference and None not in (score, reference, row.cv, row.cv_reference):
            gap = f"{(row.cv - row.cv_reference) - (score - reference):+.4f}"
        if not is_reference and None not in (score, reference):
            bounds = paired_interval(score, reference)
            interval = "" if bounds is None else f"{bounds[0]:+.4f} to {bounds[1]:+.4f}"
            test_share = f"{(score - reference) / (1 - reference):+.1%}"
        if not is_reference and None not in (row.cv, row.cv_reference):
            cv_share = f"{(row.cv - row.cv_reference) / (1 - row.cv_reference):+.1%}"
        lines.append(f"| {row.label} | {cv} | {test} | {test_gain} | {cv_gain} | {gap} | "
                     f"{_hours(row.train_seconds)} | {row.cv_what} | {interval} | {test_share} | {cv_share} |")
    agreement = rank_agreement(scored)
    if agreement is not None:
        lines += ["", f"Rank agreement of the grouped CV with the test over the {agreement[1]} candidates "
                      f"trained on every fold: Spearman {agreement[0]:+.2f}."]
    return "\n".join(lines)


def choose_default(rows: list[Row], budget_hours: float = TRAINING_BUDGET_HOURS) -> Row | None:
    """The default submission: the candidate (an experiment on all folds, or a blend) with the
    best grouped CV among those whose training fits the budget. Chosen on the CV alone,
    never on the test (so it needs no test scores), and the test stays an honest check."""
    fits = [row for row in rows if row.checkpoint is not None and row.cv is not None
            and row.train_seconds is not None and row.train_seconds <= budget_hours * 3600]
    return max(fits, key=lambda row: row.cv, default=None)


def _stage04_record(row: Row) -> dict:
    """The row's stage 04 ensemble.json (what ran: checkpoints, TTA, precision, threads)."""
    record_path = paths.ensemble_record(row.predictions)
    if not record_path.is_file():
        raise PipelineError(f"{record_path}: missing; run stage 04 for {row.predictions} first")
    return json.loads(record_path.read_text())


def predict_arguments(row: Row) -> str:
    """`predict` arguments that reproduce the row's stage 04 predictions: its checkpoint (path
    relative to the project root when inside it) with the TTA and precision stage 04 ran."""
    record = _stage04_record(row)
    checkpoint = row.checkpoint.resolve()
    shown = checkpoint.relative_to(paths.ROOT) if checkpoint.is_relative_to(paths.ROOT) else checkpoint
    return f"--checkpoint {shown} --tta {record['tta']} --precision {record['precision']}"


def write_default(row: Row) -> Path:
    """<workdir>/default-submission.txt: one line of `predict` arguments (see predict_arguments)."""
    out = paths.WORKDIR / DEFAULT_SUBMISSION
    with io.atomic_path(out) as tmp:
        tmp.write_text(predict_arguments(row) + "\n")
    return out


def check_default(folder: Path, rows: list[Row]) -> str:
    """Compare `predict $(cat default-submission.txt)`'s output folder with stage 04's files of
    the default: the same pixels for every test scene, or an error naming the first that differs."""
    chosen = choose_default(rows)
    written = (paths.WORKDIR / DEFAULT_SUBMISSION).read_text().strip() if (paths.WORKDIR / DEFAULT_SUBMISSION).is_file() else None
    if chosen is None or written != predict_arguments(chosen):
        raise PipelineError(f"{paths.WORKDIR / DEFAULT_SUBMISSION}: not the current default; rerun with --write-default")
    stage04 = sorted((paths.PREDICTIONS / chosen.predictions).glob("test_*_answer.tif"))
    differing: list[tuple[Path, Path]] = []
    values = largest = 0
    for answer in stage04:
        predicted = folder / answer.name.replace("_answer", "_low")
        if not predicted.is_file():
            raise PipelineError(f"{predicted}: missing; predict did not write every test scene")
        ours, theirs = io.read_image(predicted), io.read_image(answer)
        if not np.array_equal(ours, theirs):
            differing.append((predicted, answer))
            if ours.shape == theirs.shape:
                gap = np.abs(ours.astype(np.int16) - theirs)
                values += int(np.count_nonzero(gap))
                largest = max(largest, int(gap.max()))
    if differing:
        # fp32 convolutions on a CPU may round differently with another number of threads,
        # which moves a few values across a rounding boundary: say how many and how far
        threads = _stage04_record(chosen).get("threads")
        ran = f"; stage 04 ran on {threads} thread(s): run predict with OMP_NUM_THREADS={threads}" if threads else ""
        raise PipelineError(f"{differing[0][0]}: differs from stage 04's {differing[0][1]} "
                            f"({len(differing)} of {len(stage04)} scenes, {values} values, by at most {largest}{ran}): "
                            f"`predict {written}` does not reproduce the default submission")
    return (f"default submission reproduced: `predict {written}` wrote the same pixels as stage 04 "
            f"for all {len(stage04)} test scenes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=AERIAL_WORKDIR,
                        help=f"the benchmark's work folder (default {AERIAL_WORKDIR.relative_to(paths.ROOT)})")
    parser.add_argument("--exp", default="aerial", help="the recipe whose table to print (default aerial)")
    parser.add_argument("--write-default", action="store_true",
                        help=f"choose the default submission (best grouped CV within {TRAINING_BUDGET_HOURS} h of "
                             f"training) and write <workdir>/{DEFAULT_SUBMISSION}")
    parser.add_argument("--check-default", type=Path, metavar="FOLDER",
                        help="check that FOLDER (predict's output with the default's arguments) equals "
                             "stage 04's predictions of the default, pixel for pixel")


def main(args: argparse.Namespace) -> int:
    paths.set_workdir(args.workdir)
    if args.check_default:   # the choice needs the CVs only: no test scoring here
        print(check_default(args.check_default, collect_rows(args.exp)))
        return 0
    scored = scored_rows(args.exp)
    print(table(args.exp, scored))
    if args.write_default:
        chosen = choose_default([row for row, _ in scored])
        if chosen is None:
            raise PipelineError(f"{args.workdir}: no experiment on all folds or blend with its training time "
                                f"within {TRAINING_BUDGET_HOURS} h: nothing to choose the default from")
        score = next(s for r, s in scored if r is chosen)
        out = write_default(chosen)
        print(f"\ndefault submission (best grouped CV within {TRAINING_BUDGET_HOURS} h of training): "
              f"{chosen.label}: CV {chosen.cv:.4f}, test {'—' if score is None else f'{score:.4f}'}, "
              f"training {_hours(chosen.train_seconds)} -> {out}: {out.read_text().strip()}")
    return 0
