"""Stages 04 (fold x seed ensemble with TTA) and 05 (submission zip) on a tiny experiment."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import time
import zipfile
from io import BytesIO

import numpy as np
import pytest
import tifffile
import torch
from tiny_experiment import assert_rounds_to, build_competition, expected_float, save_tiny_checkpoint, write_config

from pipeline.core import io, paths
from pipeline.core.artifacts import load_manifest
from pipeline.core.errors import PipelineError
from pipeline.stages import s04_ensemble, s05_submission


@pytest.fixture
def tiny(workdir):
    """A tiny competition (6 train / 2 test scenes, 2 folds) and three checkpoints."""
    cfg = build_competition(write_config(workdir))
    ckpts = [save_tiny_checkpoint(cfg["exp"], seed, fold) for seed, fold in ((0, 0), (0, 1), (1, 0))]
    return cfg, ckpts


def test_ensemble_equals_direct_tta_computation(tiny):
    cfg, ckpts = tiny
    record = s04_ensemble.run_ensemble(cfg)
    pred_dir = paths.predictions_dir(cfg["exp"])
    test = load_manifest("test")
    assert sorted(p.name for p in pred_dir.iterdir()) == sorted(
        [f"test_{i}_answer.tif" for i in test["id"]] + ["ensemble.json"])
    for row in test.itertuples():
        low = io.read_image(row.low_path)
        written = tifffile.imread(pred_dir / f"test_{row.id}_answer.tif")
        assert written.shape == (row.low_height * 4, row.low_width * 4, 3)
        assert_rounds_to(written, expected_float(ckpts, low))
        # every checkpoint counts: one alone gives another image
        assert np.abs(written - expected_float(ckpts[:1], low)).max() > 10
    assert record == json.loads((pred_dir / "ensemble.json").read_text())


def test_ensemble_json_records_checkpoints_and_settings(tiny):
    cfg, ckpts = tiny
    record = s04_ensemble.run_ensemble(cfg, seeds=[0])
    assert record["seeds"] == [0] and record["tta"] == 8 and record["tile"] == 0
    assert record["precision"] == "fp32" and record["device"] == "cpu" and record["scale"] == 4
    assert record["threads"] == torch.get_num_threads()
    assert record["answers"] == ["test_0_answer.tif", "test_1_answer.tif"]
    assert record["seconds"] > 0
    by_path = {c["path"]: c for c in record["checkpoints"]}
    assert sorted(by_path) == ["models/tiny/seed0/fold0/best.pt", "models/tiny/seed0/fold1/best.pt"]
    for path in ckpts[:2]:
        entry = by_path[str(path.relative_to(paths.WORKDIR))]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["mtime"] == path.stat().st_mtime
        assert (entry["seed"], entry["fold"], entry["step"], entry["net"]) == (0, int(path.parent.name[4:]), 10, "espcn")
    # TTA 1 is a different (single-view) prediction of the same checkpoints
    tta8 = tifffile.imread(paths.predictions_dir("tiny") / "test_0_answer.tif")
    assert s04_ensemble.run_ensemble(cfg, seeds=[0], tta=1)["tta"] == 1
    assert not np.array_equal(tta8, tifffile.imread(paths.predictions_dir("tiny") / "test_0_answer.tif"))


def test_ensemble_without_checkpoints_says_to_train(workdir):
    cfg = build_competition(write_config(workdir))
    with pytest.raises(PipelineError) as refused:
        s04_ensemble.run_ensemble(cfg)
    assert str(refused.value) == (f"{workdir}/models/tiny: no checkpoint seed*/fold*/best.pt; "
                                  "run `make train-all EXP=tiny` first")
    assert not paths.predictions_dir("tiny").exists()


def test_submission_zip_is_flat_complete_and_exact(tiny, capsys):
    cfg, _ = tiny
    s04_ensemble.run_ensemble(cfg)
    pred_dir = paths.predictions_dir("tiny")
    (pred_dir / "notes.txt").write_text("not an answer")
    io.write_tif(pred_dir / "test_9_answer.tif", np.zeros((8, 8, 3), np.uint8))  # no such test scene
    capsys.readouterr()
    assert s05_submission.main(argparse.Namespace(exp=str(paths.WORKDIR / "tiny.yaml"))) == 0
    zip_path = paths.SUBMISSIONS / (paths.SUBMISSIONS / "tiny-latest.txt").read_text().strip()
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(zip_path)
    assert zip_path.name.startswith("tiny-") and zip_path.suffix == ".zip"
    # the zip, its pointer, and the ledger that recorded it, nothing else (no lock left)
    assert sorted(p.name for p in paths.SUBMISSIONS.iterdir()) == sorted(
        [zip_path.name, "tiny-latest.txt", "ledger.csv"])
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        assert sorted(names) == ["test_0_answer.tif", "test_1_answer.tif"]
        for name in names:
            data = zf.read(name)
            assert data == (pred_dir / name).read_bytes()
            answer = tifffile.imread(BytesIO(data))
            low = tifffile.imread(paths.INTERIM / "evaluation" / name.replace("answer", "low"))
            assert answer.dtype == np.uint8 and answer.shape == (low.shape[0] * 4, low.shape[1] * 4, 3)


def test_submission_refuses_missing_answer(tiny):
    cfg, _ = tiny
    s04_ensemble.run_ensemble(cfg)
    (paths.predictions_dir("tiny") / "test_1_answer.tif").unlink()
    with pytest.raises(PipelineError) as refused:
        s05_submission.build_submission(cfg)
    assert str(refused.value) == (f"{paths.predictions_dir('tiny')}: 1 of 2 answers missing "
                                  "(test_1_answer.tif); run `make ensemble EXP=tiny`")
    assert not paths.SUBMISSIONS.exists() or not any(paths.SUBMISSIONS.iterdir())


def test_submission_refuses_without_ensemble(tiny):
    cfg, _ = tiny
    with pytest.raises(PipelineError, match=r"ensemble.json: missing.*make ensemble EXP=tiny"):
        s05_submission.build_submission(cfg)


def test_submission_refuses_predictions_older_than_a_checkpoint(tiny):
    cfg, ckpts = tiny
    s04_ensemble.run_ensemble(cfg)
    # as if seed0/fold1 was trained again after the ensemble (`touch` does the same to make)
    now = time.time()
    for path in ckpts:
        os.utime(path, (now - 200, now - 200))
    for answer in paths.predictions_dir("tiny").glob("*.tif"):
        os.utime(answer, (now - 100, now - 100))
    os.utime(ckpts[1], (now - 50, now - 50))
    with pytest.raises(PipelineError, match=r"predictions are older than checkpoint .*seed0/fold1/best.pt; "
                                            r"rerun `make ensemble EXP=tiny`"):
        s05_submission.build_submission(cfg)
    s04_ensemble.run_ensemble(cfg)  # fresh predictions are accepted again
    assert s05_submission.build_submission(cfg).is_file()


def test_submission_refuses_changed_or_new_checkpoints(tiny):
    cfg, ckpts = tiny
    s04_ensemble.run_ensemble(cfg, seeds=[0])
    s05_submission.build_submission(cfg)
    new = save_tiny_checkpoint("tiny", seed=0, fold=2)  # a fold trained after the ensemble
    answers = sorted(paths.predictions_dir("tiny").glob("*.tif"))
    old = answers[0].stat().st_mtime - 100
    os.utime(new, (old, old))
    with pytest.raises(PipelineError, match=r"seed0/fold2/best.pt: checkpoint\(s\) of seed\(s\) \[0\] not in the ensemble"):
        s05_submission.build_submission(cfg)
    new.unlink()
    save_tiny_checkpoint("tiny", seed=0, fold=0, step=99)  # same path, other content, old date
    os.utime(ckpts[0], (old, old))
    with pytest.raises(PipelineError, match=r"seed0/fold0/best.pt: checkpoint changed since the predictions"):
        s05_submission.build_submission(cfg)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((32, 28, 3), np.uint8), r"shape \(32, 28, 3\), expected \(32, 32, 3\) \(4 x test_0_low.tif\)"),
    (np.zeros((32, 32, 3), np.uint16), r"dtype uint16, the competition expects uint8"),
])
def test_submission_refuses_wrong_shape_or_dtype(tiny, bad, message):
    cfg, _ = tiny
    s04_ensemble.run_ensemble(cfg)
    answer = paths.predictions_dir("tiny") / "test_0_answer.tif"
    tifffile.imwrite(answer, bad, photometric="rgb")
    with pytest.raises(PipelineError, match=message):
        s05_submission.build_submission(cfg)


def test_make_reruns_only_stale_stages(tmp_path):
    """Make's view of stages 03-05 (`make -q`: exit 0 = up to date, 1 = would run): a built
    submission is not rebuilt; a touched checkpoint makes oof, ensemble and submission stale."""
    files = ["data/raw/train.zip", "data/raw/evaluation.zip", "data/interim/manifest.csv", "data/folds.csv",
             "models/x/seed0/fold0/best.pt", "models/x/seed0/fold1/best.pt",
             "models/x/oof/summary.json", "data/predictions/x/ensemble.json", "submissions/x-latest.txt"]
    start = time.time() - 1000
    for age, name in enumerate(files):  # each file newer than the ones before it
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
        os.utime(tmp_path / name, (start + 10 * age, start + 10 * age))

    def up_to_date(target: str) -> bool:
        proc = subprocess.run(["make", "-q", "-f", str(paths.ROOT / "Makefile"), target, "EXP=x", "SETUP="],
                              cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode in (0, 1), proc.stderr
        return proc.returncode == 0

    assert up_to_date("oof") and up_to_date("ensemble") and up_to_date("submission")
    os.utime(tmp_path / "models/x/seed0/fold1/best.pt")  # retrained: now newer than everything
    assert not up_to_date("oof") and not up_to_date("ensemble") and not up_to_date("submission")
    os.utime(tmp_path / "models/x/oof/summary.json")
    os.utime(tmp_path / "data/predictions/x/ensemble.json")
    assert up_to_date("oof") and up_to_date("ensemble") and not up_to_date("submission")
    os.utime(tmp_path / "submissions/x-latest.txt")
    assert up_to_date("submission")


def test_the_same_answers_make_the_same_zip_bytes(tiny):
    cfg, _ = tiny
    s04_ensemble.run_ensemble(cfg)
    first = s05_submission.build_submission(cfg)
    time.sleep(1.1)                          # a later second: a time stamp would differ
    for answer in paths.predictions_dir("tiny").glob("*.tif"):
        os.utime(answer)                     # and so would the files' dates
    second = s05_submission.build_submission(cfg)
    assert first != second and first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(second) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
