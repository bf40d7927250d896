"""The submissions ledger (submissions/ledger.csv) and `python -m pipeline lb`."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core import io, ledger, paths
from pipeline.core.errors import PipelineError


def make_zip(name: str, content: bytes = b"x") -> "Path":
    paths.SUBMISSIONS.mkdir(parents=True, exist_ok=True)
    path = paths.SUBMISSIONS / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("test_0_answer.tif", content)
    return path


def test_add_submission_writes_the_exact_format(workdir):
    z = make_zip("tiny-20261201-120000.zip")
    ledger.add_submission(z, ["tiny"], 0.81234567)
    lines = (workdir / "submissions/ledger.csv").read_text().splitlines()
    assert lines[0] == "zip,experiments,models,cv,created,sha256,lb,lb_recorded"
    name, exps, models, cv, created, sha, lb, recorded = lines[1].split(",")
    assert (name, exps, models, cv, lb, recorded) == ("tiny-20261201-120000.zip", "tiny", "folds", "0.812346", "", "")
    assert sha == io.sha256_file(z) and len(created) == 20 and created.endswith("Z")
    ledger.add_submission(make_zip("b-20261201-130000.zip"), ["a", "b"], None, models="full")
    table = ledger.read_ledger()
    assert list(table["zip"]) == ["tiny-20261201-120000.zip", "b-20261201-130000.zip"]
    assert table.loc[1, "experiments"] == "a+b" and np.isnan(table.loc[1, "cv"])
    assert list(table["models"]) == ["folds", "full"]
    # a ledger written before the models column: its zips were made of folds
    path = workdir / "submissions/ledger.csv"
    old = [line.split(",") for line in path.read_text().splitlines()]
    path.write_text("\n".join(",".join(row[:2] + row[3:]) for row in old) + "\n")
    assert list(ledger.read_ledger()["models"]) == ["folds", "folds"]
    assert not list((workdir / "submissions").glob(".ledger.csv.*"))   # no temporary left behind


def test_lb_records_by_path_or_name_and_replaces(workdir, cli):
    z = make_zip("tiny-20261201-120000.zip")
    ledger.add_submission(z, ["tiny"], 0.8)
    env = {"SR_WORKDIR": str(workdir)}
    proc = cli("lb", z, "0.7912", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"lb tiny-20261201-120000.zip: 0.7912, CV 0.8000 (LB - CV -0.0088) -> "
                                   f"{workdir}/submissions/ledger.csv")
    proc = cli("lb", "tiny-20261201-120000.zip", "0.7950", env=env)
    assert "0.7950 (was 0.7912)" in proc.stdout
    table = ledger.read_ledger()
    assert len(table) == 1 and table.loc[0, "lb"] == pytest.approx(0.795) and table.loc[0, "lb_recorded"].endswith("Z")
    # a copy of the zip elsewhere is matched by its bytes
    copy = workdir / "elsewhere.zip"
    copy.write_bytes(z.read_bytes())
    assert ledger.record_lb(str(copy), 0.80)[0]["zip"] == z.name


def test_lb_adds_a_zip_made_before_the_ledger(workdir):
    z = make_zip("aerial-20261130-093000.zip")
    row, old = ledger.record_lb(str(z), 0.81)
    assert old is None and row["experiments"] == "aerial" and row["sha256"] == io.sha256_file(z)
    assert np.isnan(row["cv"]) and ledger.read_ledger()["zip"].tolist() == [z.name]
    # its answers are stage 04's current predictions, scored by stage 03: the CV is known
    pred = paths.predictions_dir("e")
    pred.mkdir(parents=True)
    (pred / "test_0_answer.tif").write_bytes(b"answer")
    (pred / "ensemble.json").write_text(json.dumps({"answers": ["test_0_answer.tif"], "tta": 8,
                                                    "checkpoints": [{"sha256": "a" * 64}]}))
    paths.oof_dir("e").mkdir(parents=True)
    (paths.oof_dir("e") / "summary.json").write_text(json.dumps(
        {"checkpoints": [{"seed": 0, "fold": 0, "sha256": "a" * 64}], "cv": {"mean": 0.77},
         "seed_ensemble": None, "inference": {"tta": 8}}))
    assert ledger.record_lb(make_zip("e-20261130-100000.zip", b"answer").name, 0.8)[0]["cv"] == 0.77
    assert np.isnan(ledger.record_lb(make_zip("e-20261130-110000.zip", b"other").name, 0.8)[0]["cv"])


@pytest.mark.parametrize("args, message", [
    (("nothere.zip", "0.8"), "nothere.zip: no such submission in {sub} (known: none yet)"),
    (("a-20261201-120000.zip", "abc"), "abc: not a number (the public leaderboard score, e.g. 0.8123)"),
    (("a-20261201-120000.zip", "8123"), "8123: an SSIM score lies in [-1, 1]"),
    (("a-20261201-120000.zip", "nan"), "nan: an SSIM score lies in [-1, 1]"),
    (("a-20261201-120000.zip",), "a-20261201-120000.zip: give the score too: python -m pipeline lb ZIP SCORE"),
])
def test_lb_bad_input_is_one_line(workdir, cli, args, message):
    if args[0].startswith("a-"):
        make_zip(args[0])
    proc = cli("lb", *args, env={"SR_WORKDIR": str(workdir)})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: " + message.format(sub=workdir / "submissions")]


def test_lb_prints_the_ledger_and_the_correlation(workdir, cli):
    env = {"SR_WORKDIR": str(workdir)}
    assert cli("lb", env=env).stdout.strip() == (f"{workdir}/submissions/ledger.csv: no submissions yet "
                                                 "(stage 05 adds every zip it writes)")
    cvs, lbs = [0.80, 0.81, 0.83, 0.82], [0.79, 0.805, 0.815, 0.818]
    for i, (cv, lb) in enumerate(zip(cvs, lbs)):
        z = make_zip(f"e{i}-20261201-12000{i}.zip", bytes([i]))
        ledger.add_submission(z, [f"e{i}"], cv)
        ledger.record_lb(z.name, lb)
    ledger.add_submission(make_zip("e9-20261201-130000.zip", b"9"), ["e9"], 0.9)   # no LB yet
    out = cli("lb", env=env).stdout.strip().splitlines()
    assert out[0].split() == ["zip", "experiments", "CV", "LB", "LB-CV", "created", "sha256"]
    assert out[1].split()[:5] == ["e0-20261201-120000.zip", "e0", "0.8000", "0.7900", "-0.0100"]
    assert out[5].split()[:5] == ["e9-20261201-130000.zip", "e9", "0.9000", "-", "-"]
    r = np.corrcoef(cvs, lbs)[0, 1]
    rho = pd.Series(cvs).rank().corr(pd.Series(lbs).rank())
    assert out[-1] == (f"CV vs LB over 4 zips: Pearson {r:+.3f}, Spearman {rho:+.3f}, "
                       f"LB - CV {np.mean(np.subtract(lbs, cvs)):+.4f} on average")


def test_submission_cv_is_stage_03_of_the_same_checkpoints(workdir):
    ckpts = [{"seed": s, "fold": f, "sha256": f"{s}{f}" * 32} for s in (0, 1) for f in (0, 1)]
    summary = {"checkpoints": ckpts, "cv": {"mean": 0.80}, "per_seed": {"0": {"mean": 0.79}, "1": {"mean": 0.81}},
               "seed_ensemble": {"cv": {"mean": 0.82}}, "inference": {"tta": 8}}
    oof = paths.oof_dir("e")
    oof.mkdir(parents=True)
    (oof / "summary.json").write_text(json.dumps(summary))
    record = lambda cs, tta=8: {"tta": tta, "checkpoints": [{"sha256": c["sha256"]} for c in cs]}
    assert ledger.submission_cv("e", record(ckpts)) == 0.82                      # all seeds: the seed ensemble
    assert ledger.submission_cv("e", record(ckpts[2:])) == 0.81                  # seed 1's folds
    assert ledger.submission_cv("e", record(ckpts[:1])) is None                 # one fold alone: no CV of it
    assert ledger.submission_cv("e", record([{"sha256": "f" * 64}])) is None     # retrained since stage 03
    assert ledger.submission_cv("e", record(ckpts, tta=1)) is None              # other TTA than was scored
    assert ledger.submission_cv("other", record(ckpts)) is None                 # no stage 03 at all


def test_unreadable_ledger_is_a_clear_error(workdir):
    paths.SUBMISSIONS.mkdir(parents=True)
    ledger.ledger_path().write_text("zip,cv\na.zip,0.1\n")
    with pytest.raises(PipelineError, match=r"ledger.csv: columns experiments, created, sha256, lb, lb_recorded missing"):
        ledger.read_ledger()
