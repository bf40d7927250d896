"""`python -m pipeline score --submission ZIP_OR_DIR --answers DIR`: the competition score.

Each `test_{i}_answer.tif` of the submission (a zip or a folder) is matched by id to
`test_{i}_high.tif` in the answers folder (names from the config's data patterns: the
answer pattern, and the test pattern with 'low' made 'high') and scored with
`competition_ssim`; the score is the mean over images. A missing, extra, unreadable or
wrongly sized answer is an error naming the file: a partial score is never printed.
"""
from __future__ import annotations

import argparse
import time
import warnings
import zipfile
from pathlib import Path

import pandas as pd
from joblib import Parallel, delayed

from pipeline.core import io
from pipeline.core.config import DEFAULTS, load_config
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import competition_ssim
from pipeline.stages.s00_unzip import pattern_regex, read_member
from pipeline.tools.demo_data import answer_pattern

# per-image scoring runs in worker processes from this many images on (start-up costs ~1 s)
PARALLEL_FROM = 8


def _short(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _index(names: list[str], pattern: str, where: str, what: str) -> dict[int, str]:
    """id -> name for the image names matching `pattern`; other image names are refused."""
    regex = pattern_regex(pattern)
    found: dict[int, str] = {}
    stray = []
    for name in names:
        match = regex.match(Path(name).name)
        if not match:
            stray.append(name)
            continue
        i = int(match.group(1))
        if i in found:
            raise PipelineError(f"{where}: two {what} for id {i}: {found[i]} and {name}")
        found[i] = name
    if stray:
        raise PipelineError(f"{where}: image(s) not named like '{pattern}': {_short(stray)}")
    return found


def submission_members(submission: Path, pattern: str) -> dict[int, str]:
    """id -> member name (zip) or file path (folder) of the submitted answers."""
    if submission.is_dir():
        names = [str(p) for p in io.list_images(submission)]
    elif submission.is_file():
        try:
            with zipfile.ZipFile(submission) as zf:
                members = [i.filename for i in zf.infolist() if not i.is_dir()]
        except zipfile.BadZipFile:
            raise PipelineError(f"{submission}: neither a folder nor a zip file") from None
        names = [m for m in members if io.is_image(Path(m))]
        ignored = sorted(set(members) - set(names))
        if ignored:
            warnings.warn(f"{submission}: {len(ignored)} non-image member(s) ignored: {_short(ignored)}")
    else:
        raise PipelineError(f"{submission}: submission not found")
    return _index(names, pattern, str(submission), "answers")


def _read_answer(submission: Path, name: str):
    if submission.is_dir():
        return io.read_image(name)
    with zipfile.ZipFile(submission) as zf:
        return read_member(submission, zf, name)


def _score_one(submission: Path, answer_name: str, high_path: Path) -> float:
    answer = _read_answer(submission, answer_name)
    high = io.read_image(high_path)
    if answer.shape != high.shape:
        where = answer_name if submission.is_dir() else f"{submission}:{answer_name}"
        raise PipelineError(f"{where}: shape {answer.shape}, but {high_path.name} is {high.shape}")
    return competition_ssim(answer, high)


def score_submission(submission: str | Path, answers: str | Path, data_cfg: dict | None = None,
                     jobs: int = -1) -> pd.DataFrame:
    """Per-image competition SSIM: a DataFrame (id, answer, ssim) sorted by id.

    Raises PipelineError for a missing, extra, unreadable or wrongly sized answer.
    """
    data_cfg = data_cfg or DEFAULTS["data"]
    submission, answers = Path(submission), Path(answers)
    if not answers.is_dir():
        raise PipelineError(f"{answers}: answers folder not found")
    high_pattern = answer_pattern(data_cfg["test_low"])
    highs = _index([str(p) for p in io.list_images(answers)], high_pattern, str(answers), "answers")
    if not highs:
        raise PipelineError(f"{answers}: no file named like '{high_pattern}'")
    submitted = submission_members(submission, data_cfg["answer"])
    missing = sorted(set(highs) - set(submitted))
    extra = sorted(set(submitted) - set(highs))
    if missing:
        raise PipelineError(f"{submission}: {len(missing)} answer(s) missing: "
                            f"{_short([data_cfg['answer'].format(i=i) for i in missing])}")
    if extra:
        raise PipelineError(f"{submission}: {len(extra)} answer(s) with no high-res image in {answers}: "
                            f"{_short([Path(submitted[i]).name for i in extra])}")
    ids = sorted(highs)
    n_jobs = jobs if len(ids) >= PARALLEL_FROM else 1
    scores = Parallel(n_jobs=n_jobs)(
        delayed(_score_one)(submission, submitted[i], Path(highs[i])) for i in ids)
    return pd.DataFrame({"id": ids, "answer": [Path(submitted[i]).name for i in ids], "ssim": scores})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--submission", required=True, type=Path, help="submission zip or folder of answers")
    parser.add_argument("--answers", required=True, type=Path,
                        help="folder of high-res answers (test_{i}_high.tif), e.g. data/demo/answers")
    parser.add_argument("--exp", default=None,
                        help="experiment config whose data patterns name the files (default: the defaults)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the per-image table here")
    parser.add_argument("--jobs", type=int, default=-1, help="worker processes (-1: all cores)")


def main(args: argparse.Namespace) -> int:
    start = time.time()
    data_cfg = load_config(args.exp)["data"] if args.exp else DEFAULTS["data"]
    table = score_submission(args.submission, args.answers, data_cfg, jobs=args.jobs)
    print(table.to_string(index=False, formatters={"ssim": "{:.5f}".format}))
    if args.csv:
        with io.locked(args.csv), io.atomic_path(args.csv) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")
    mean = table["ssim"].mean()
    print(f"mean SSIM {mean:.5f} over {len(table)} images ({args.submission}) in {time.time() - start:.1f}s"
          + (f"; table in {args.csv}" if args.csv else ""))
    return 0
