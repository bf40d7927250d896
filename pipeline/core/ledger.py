"""The submissions ledger: every zip, what made it, its CV, and the public leaderboard score.

    submissions/ledger.csv: zip, experiments, cv, created, sha256, lb, lb_recorded

Stage 05 adds a row for every zip it writes (experiments separated by `+`, the out-of-fold
CV of exactly the checkpoints the zip was predicted with, when stage 03 scored them).
The user records what the public leaderboard said:

    python -m pipeline lb submissions/aerial-20261201-120000.zip 0.8123
    python -m pipeline lb            # prints the ledger, and how well CV follows LB

The file is rewritten atomically (temporary file, rename) under its write lock (io.locked,
waited for rather than refused), so two writers (a submission and an `lb`) never lose each
other's row.
"""
from __future__ import annotations

import json
import math
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import io, locks, paths
from pipeline.core.errors import PipelineError

COLUMNS = ["zip", "experiments", "models", "cv", "created", "sha256", "lb", "lb_recorded"]
EXPERIMENT_SEP = "+"


def ledger_path() -> Path:
    return paths.SUBMISSIONS / "ledger.csv"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_ledger() -> pd.DataFrame:
    """The ledger as a table with COLUMNS (empty when there is none yet)."""
    path = ledger_path()
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    try:
        table = pd.read_csv(path, dtype={"zip": str, "experiments": str, "models": str, "created": str,
                                         "sha256": str, "lb_recorded": str})
    except (ValueError, pd.errors.ParserError) as exc:
        raise PipelineError(f"{path}: not a readable ledger ({str(exc).splitlines()[0]})") from None
    if "models" not in table.columns:    # a ledger from before full-data fits: every zip was of folds
        table.insert(2, "models", "folds")
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: columns {', '.join(missing)} missing (expected {', '.join(COLUMNS)})")
    for column in ("cv", "lb"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table[COLUMNS]


LOCK_WAIT = 60.0   # seconds: two stage 05 runs (two experiments) queue for the ledger


def _locked():
    """The ledger's write lock (io.locked) for a read-modify-write; a second writer waits."""
    return locks.locked(ledger_path(), what=f"{ledger_path()} (the submissions ledger)", wait=LOCK_WAIT)


def _write(table: pd.DataFrame) -> None:
    with io.atomic_path(ledger_path()) as tmp:
        table[COLUMNS].to_csv(tmp, index=False, float_format="%.6f")


def _append(table: pd.DataFrame, row: dict) -> pd.DataFrame:
    new = pd.DataFrame([row], columns=COLUMNS)
    return pd.concat([table, new], ignore_index=True) if len(table) else new


def _row_for(zip_path: Path, experiments: list[str], cv: float | None, created: str | None = None,
             models: str = "folds") -> dict:
    return {"zip": zip_path.name, "experiments": EXPERIMENT_SEP.join(experiments), "models": models,
            "cv": float("nan") if cv is None else float(cv), "created": created or _now(),
            "sha256": io.sha256_file(zip_path), "lb": float("nan"), "lb_recorded": ""}


def add_submission(zip_path: Path, experiments: list[str], cv: float | None, models: str = "folds") -> dict:
    """Record a new zip and the models that made it (folds, full: the full-data fits, or both;
    a rerun over the same name replaces its row, LB score kept if the bytes are the same)."""
    zip_path = Path(zip_path)
    row = _row_for(zip_path, experiments, cv, models=models)
    with _locked():
        table = read_ledger()
        same = table["zip"] == zip_path.name
        if same.any():
            old = table[same].iloc[0]
            if old["sha256"] == row["sha256"]:
                row.update(lb=old["lb"], lb_recorded=old["lb_recorded"])
            table = table[~same]
        _write(_append(table, row))
    return row


def experiment_of_zip(name: str) -> str:
    """`<exp>-<YYYYmmdd>-<HHMMSS>.zip` -> exp (stage 05's naming); else the stem."""
    parts = Path(name).stem.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0]
    return Path(name).stem


def _ensemble_cv(summary: dict, shas: set[str]) -> float | None:
    """CV of stage 03 when it scored exactly these checkpoints (all of them, or one seed's)."""
    scored = {c["sha256"]: c for c in summary.get("checkpoints", [])}
    if not shas or not shas <= set(scored):
        return None
    if shas == set(scored):
        ens = summary.get("seed_ensemble")
        return float(ens["cv"]["mean"]) if ens else float(summary["cv"]["mean"])
    used_seeds = {scored[s]["seed"] for s in shas}
    if len(used_seeds) == 1 and {c["sha256"] for c in scored.values() if c["seed"] in used_seeds} == shas:
        return float(summary["per_seed"][str(used_seeds.pop())]["mean"])
    return None


def submission_cv(exp: str, ensemble_record: dict) -> float | None:
    """The out-of-fold CV that belongs to a zip predicted as `ensemble_record` (stage 04's
    ensemble.json) says: stage 03's figure for the same checkpoint files and TTA, else None."""
    path = paths.oof_dir(exp) / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        return None
    inference = summary.get("inference", {})
    if ensemble_record.get("tta") != inference.get("tta"):
        return None   # e.g. `ensemble --tta 1` after an 8-view stage 03: another prediction than was scored
    shas = {c["sha256"] for c in ensemble_record.get("checkpoints", []) if c.get("sha256")}
    return _ensemble_cv(summary, shas)


def _cv_of_old_zip(zip_path: Path, exp: str) -> float | None:
    """CV of a zip made before the ledger existed: known when its answers are, byte for byte
    (CRC32), stage 04's current predictions of `exp`, whose ensemble.json names the checkpoints."""
    pred_dir = paths.predictions_dir(exp)
    try:
        record = json.loads(paths.ensemble_record(exp).read_text())
        with zipfile.ZipFile(zip_path) as zf:
            members = {i.filename: i.CRC for i in zf.infolist()}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    if sorted(members) != sorted(record.get("answers", [])):
        return None
    for name, crc in members.items():
        if not (pred_dir / name).is_file() or zlib.crc32((pred_dir / name).read_bytes()) != crc:
            return None
    return submission_cv(exp, record)


def _resolve_zip(arg: str, table: pd.DataFrame) -> Path:
    """A zip given by path or by name -> its path in submissions/ (a copy elsewhere is matched by sha256)."""
    given = Path(arg)
    inside = paths.SUBMISSIONS / given.name
    if given.is_file() and given.resolve().parent != paths.SUBMISSIONS.resolve():
        digest = io.sha256_file(given)
        match = table[table["sha256"] == digest]
        if len(match):
            return paths.SUBMISSIONS / match.iloc[0]["zip"]
        raise PipelineError(f"{given}: not a zip of {paths.SUBMISSIONS} (no ledger row has its sha256)")
    if inside.is_file() or (table["zip"] == given.name).any():
        return inside
    known = sorted(table["zip"]) or sorted(p.name for p in paths.SUBMISSIONS.glob("*.zip"))
    raise PipelineError(f"{arg}: no such submission in {paths.SUBMISSIONS} "
                        f"(known: {', '.join(known[-5:]) or 'none yet'})")


def parse_score(text: str) -> float:
    try:
        score = float(text)
    except ValueError:
        raise PipelineError(f"{text}: not a number (the public leaderboard score, e.g. 0.8123)") from None
    if not math.isfinite(score) or not -1.0 <= score <= 1.0:
        raise PipelineError(f"{text}: an SSIM score lies in [-1, 1]")
    return score


def record_lb(zip_arg: str, score: float) -> tuple[dict, float | None]:
    """Store the public LB score of a zip; returns its row and the score it replaced."""
    with _locked():
        table = read_ledger()
        path = _resolve_zip(zip_arg, table)
        rows = table.index[table["zip"] == path.name]
        if not len(rows):  # a zip made before the ledger existed: add it now
            if not path.is_file():
                raise PipelineError(f"{path}: zip not found")
            created = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            exp = experiment_of_zip(path.name)
            row = _row_for(path, [exp], _cv_of_old_zip(path, exp), created)
            table = _append(table, row)
            rows = table.index[table["zip"] == path.name]
        i = rows[0]
        old = table.at[i, "lb"]
        table.at[i, "lb"] = score
        table.at[i, "lb_recorded"] = _now()
        _write(table)
        return table.loc[i].to_dict(), (None if pd.isna(old) else float(old))


def correlation(table: pd.DataFrame) -> dict | None:
    """Pearson and Spearman correlation of CV and LB over the zips that have both (>= 3)."""
    both = table.dropna(subset=["cv", "lb"])
    if len(both) < 3 or both["cv"].nunique() < 2 or both["lb"].nunique() < 2:
        return None
    cv, lb = both["cv"].to_numpy(float), both["lb"].to_numpy(float)
    return {"n": int(len(both)), "pearson": float(np.corrcoef(cv, lb)[0, 1]),
            "spearman": float(both["cv"].rank().corr(both["lb"].rank())),
            "mean_lb_minus_cv": float((lb - cv).mean())}


def _fmt(value: float, spec: str = ".4f") -> str:
    return "-" if pd.isna(value) else format(value, spec)


def format_ledger(table: pd.DataFrame) -> str:
    if table.empty:
        return f"{ledger_path()}: no submissions yet (stage 05 adds every zip it writes)"
    header = ["zip", "experiments", "CV", "LB", "LB-CV", "created", "sha256"]
    lines = [[r.zip, r.experiments, _fmt(r.cv), _fmt(r.lb), _fmt(r.lb - r.cv, "+.4f"), r.created,
              str(r.sha256)[:12]] for r in table.itertuples()]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *lines]]
    corr = correlation(table)
    scored = int(table["lb"].notna().sum())
    if corr:
        out.append(f"CV vs LB over {corr['n']} zips: Pearson {corr['pearson']:+.3f}, Spearman "
                   f"{corr['spearman']:+.3f}, LB - CV {corr['mean_lb_minus_cv']:+.4f} on average")
    else:
        out.append(f"{scored} zip(s) with both CV and LB score; the CV-LB correlation needs 3")
    return "\n".join(out)


