"""Stage 05: check the test predictions and zip them into a submission.

    data/predictions/<exp>/test_{i}_answer.tif + ensemble.json
      -> submissions/<exp>-<timestamp>.zip, submissions/<exp>-latest.txt

The zip is flat: exactly one `test_{i}_answer.tif` per `test_{i}_low.tif` of the manifest,
nothing else. Before writing, every answer is checked: present, uint8, RGB, shape exactly
scale x its low image. Predictions are refused when they are older than the checkpoints
that made them (a checkpoint listed in ensemble.json is gone, changed or newer than the
predictions, or a checkpoint of the same seeds appeared since; for a blend, also its
blend.json changed): rerun `make ensemble`. `--blend NAME` zips a blend's predictions.
The zip is written atomically and read back; `<exp>-latest.txt` names it (the file make
tracks, so a rerun of `make submission` with nothing new does no work), and
`submissions/ledger.csv` records it (pipeline/ledger.py).
"""
from __future__ import annotations

import re
import time
import zipfile
from datetime import datetime
from pathlib import Path

import tifffile

from pipeline.core import io, ledger, locks, paths
from pipeline.core.artifacts import blend_config, read_ensemble_record, test_scenes
from pipeline.core.checkpoints import find_checkpoints
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.io import sha256_file
from pipeline.data.competition import zip_member


def latest_pointer(exp: str) -> Path:
    """The text file naming the newest submission zip of `exp` (make's target for stage 05)."""
    return paths.SUBMISSIONS / f"{exp}-latest.txt"


def _short(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_fresh(exp: str, record: dict, answer_paths: list[Path]) -> None:
    """Refuse predictions older than (or not made from) the checkpoints they came from."""
    rerun = (f"rerun `python -m pipeline ensemble --blend {exp}`" if "blend" in record
             else f"rerun `make ensemble EXP={exp}`")
    oldest = min(p.stat().st_mtime for p in answer_paths)
    used = set()
    for ckpt in record.get("checkpoints", []):
        path = (paths.WORKDIR / ckpt["path"]).resolve()
        used.add(path)
        if not path.is_file():
            raise PipelineError(f"{path}: checkpoint used by the predictions is gone; {rerun}")
        if path.stat().st_mtime > oldest:
            raise PipelineError(f"{paths.predictions_dir(exp)}: predictions are older than checkpoint "
                                f"{path}; {rerun}")
        if sha256_file(path) != ckpt["sha256"]:
            raise PipelineError(f"{path}: checkpoint changed since the predictions were made; {rerun}")
    if "blend" in record:
        blend = paths.WORKDIR / record["blend"]["path"]
        if not blend.is_file() or sha256_file(blend) != record["blend"]["sha256"]:
            raise PipelineError(f"{blend}: blend changed (or gone) since the predictions were made; {rerun}")
    members = record.get("members") or [{"exp": exp, "seeds": record.get("seeds")}]
    current = [p for m in members if m.get("weight", 1) > 0
               for p in find_checkpoints(paths.experiment_dir(m["exp"]), seeds=m["seeds"],
                                         models=record.get("models", "folds"))]
    new = [str(p) for p in current if p.resolve() not in used]
    if new:
        raise PipelineError(f"{_short(new)}: checkpoint(s) of seed(s) {record.get('seeds')} not in the "
                            f"ensemble (trained after it); {rerun}")


def check_answers(cfg: dict) -> list[Path]:
    """The answer files in zip order, each checked for name, dtype and shape."""
    exp = cfg["exp"]
    pred_dir = paths.predictions_dir(exp)
    scenes = test_scenes(cfg)
    missing = [s["answer"] for s in scenes if not (pred_dir / s["answer"]).is_file()]
    if missing:
        raise PipelineError(f"{pred_dir}: {len(missing)} of {len(scenes)} answers missing ({_short(missing)}); "
                            f"run `make ensemble EXP={exp}`")
    for scene in scenes:
        path = pred_dir / scene["answer"]
        try:
            answer = tifffile.imread(path)
        except Exception as exc:  # a decoder failure is the file's problem
            raise PipelineError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
        if answer.dtype.name != "uint8":
            raise PipelineError(f"{path}: dtype {answer.dtype}, the competition expects uint8")
        if answer.shape != scene["shape"]:
            raise PipelineError(f"{path}: shape {answer.shape}, expected {scene['shape']} "
                                f"({cfg['data']['scale']} x {scene['low_path'].name})")
    return [pred_dir / s["answer"] for s in scenes]


def build_submission(cfg: dict) -> Path:
    """Check the predictions of `cfg`'s experiment and write the submission zip; returns its path."""
    exp = cfg["exp"]
    record = read_ensemble_record(exp)
    answers = check_answers(cfg)
    check_fresh(exp, record, answers)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = paths.SUBMISSIONS / f"{exp}-{stamp}.zip"
    names = [p.name for p in answers]
    with io.atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in answers:
                zf.writestr(zip_member(path.name), path.read_bytes())  # fixed dates: same answers, same bytes
        with zipfile.ZipFile(tmp) as zf:  # read back: every member's CRC, nothing else inside
            bad = zf.testzip()
            if bad is not None or sorted(zf.namelist()) != sorted(names):
                raise PipelineError(f"{out}: zip did not read back correctly ({bad or 'member list'})")
    # recorded before the pointer make tracks: a ledger that cannot be written leaves stage 05 to rerun
    ledger.add_submission(out, [exp], ledger.submission_cv(exp, record), record.get("models", "folds"))  # `python -m pipeline lb` adds the LB score
    with io.atomic_path(latest_pointer(exp)) as tmp:
        tmp.write_text(out.name + "\n")
    return out


def remove_zip_temporaries(exp: str) -> None:
    """Temporary zips of `exp` a killed run left (`.<exp>-<stamp>.zip.XXXXXXXX.tmp.zip`);
    called under the lock, so none of them is being written."""
    pattern = re.compile(rf"\.{re.escape(exp)}-\d{{8}}-\d{{6}}\.zip\.[a-z0-9_]{{8}}\.tmp\.zip")
    for path in paths.SUBMISSIONS.glob(".*.tmp.zip"):
        if pattern.fullmatch(path.name):
            path.unlink(missing_ok=True)


def add_arguments(parser) -> None:
    parser.add_argument("--exp", default="demo", help="experiment name or YAML path")
    parser.add_argument("--blend", default=None, help="a blend name or blend.json instead of --exp")


def main(args) -> int:
    start = time.time()
    blend = getattr(args, "blend", None)
    cfg = blend_config(blend)[0] if blend else load_config(args.exp)
    with locks.locked(latest_pointer(cfg["exp"]), what=f"{paths.SUBMISSIONS} ({cfg['exp']}'s submissions)"):
        remove_zip_temporaries(cfg["exp"])
        out = build_submission(cfg)
    with zipfile.ZipFile(out) as zf:
        n = len(zf.namelist())
    print(f"submission {cfg['exp']}: {n} answers checked and zipped ({out.stat().st_size / 1e6:.1f} MB, "
          f"{time.time() - start:.1f} s)")
    print(out)
    return 0
