"""The competition's score of a submission: per-image SSIM against the answers, then the mean.

Each `test_{i}_answer.tif` of the submission (a zip or a folder) is matched by id to
`test_{i}_high.tif` in the answers folder (names from the config's data patterns: the
answer pattern, and the test pattern with 'low' made 'high') and scored with
`competition_ssim`. A missing, extra, unreadable or wrongly sized answer is an error naming
the file: a partial score is never returned.
"""
from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import pandas as pd
from joblib import Parallel, delayed

from pipeline.core import io
from pipeline.core.config import DEFAULTS
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import competition_ssim
from pipeline.data.competition import answer_pattern, pattern_regex, read_member

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
