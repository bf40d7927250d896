"""Stage 03 (out-of-fold SSIM) on a tiny experiment: scores, files, summary, seed ensemble."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tiny_experiment import (
    assert_rounds_to,
    build_competition,
    expected_float,
    save_tiny_checkpoint,
    to_tensor,
    to_uint8,
    write_config,
)

from pipeline.core import io, paths
from pipeline.core.artifacts import load_manifest
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import competition_ssim
from pipeline.infer.ensemble import predict_scene
from pipeline.nets import net_from_checkpoint
from pipeline.stages import s03_oof


@pytest.fixture(scope="module")
def oof_folder(tmp_path_factory):
    """6 training scenes in 2 folds, a checkpoint per fold for seeds 0 and 1, and one OOF
    run, shared by the tests that only read its output."""
    folder = tmp_path_factory.mktemp("oof")
    previous = paths.WORKDIR
    paths.set_workdir(folder)
    try:
        cfg = build_competition(write_config(folder))
        ckpts = {(s, f): save_tiny_checkpoint(cfg["exp"], s, f) for s in (0, 1) for f in (0, 1)}
        summary = s03_oof.run_oof(cfg)
    finally:
        paths.set_workdir(previous)
    return folder, cfg, ckpts, summary


@pytest.fixture
def two_seeds(oof_folder):
    """The shared OOF run, with the artifact paths pointing at its folder for one test."""
    folder, cfg, ckpts, summary = oof_folder
    previous = paths.WORKDIR
    paths.set_workdir(folder)
    yield cfg, ckpts, summary
    paths.set_workdir(previous)


def truth_of(scene_id) -> np.ndarray:
    train = load_manifest("train").set_index("id")
    return io.read_image(train.loc[int(scene_id), "high_path"])


def test_oof_scores_equal_competition_ssim_of_the_written_files(two_seeds):
    cfg, ckpts, _ = two_seeds
    out = paths.oof_dir("tiny")
    table = pd.read_csv(out / "oof.csv")
    folds = pd.read_csv(paths.FOLDS).set_index("id")["fold"]
    assert list(table.columns) == ["id", "fold", "seed", "ssim", "bicubic_ssim", "start_ssim"]
    assert table["start_ssim"].isna().all()   # trained from scratch: no starting point to score
    assert len(table) == 12 and sorted(table["seed"].unique()) == [0, 1]
    assert sorted(table["id"].unique()) == sorted(folds.index)
    for row in table.itertuples():
        assert row.fold == folds[row.id]  # scored by the checkpoint of the scene's own fold
        truth = truth_of(row.id)
        pred = io.read_image(out / f"pred_seed{row.seed}" / f"{row.id}.tif")
        assert row.ssim == pytest.approx(competition_ssim(pred, truth), abs=1e-6)
        # bicubic recomputed by hand: torch bicubic, clamped, rounded
        low = load_manifest("train").set_index("id").loc[row.id, "low_path"]
        with torch.no_grad():
            up = to_uint8(F.interpolate(to_tensor(io.read_image(low)), scale_factor=4, mode="bicubic",
                                        align_corners=False))
        assert row.bicubic_ssim == pytest.approx(competition_ssim(up, truth), abs=1e-6)
        # out of fold: the prediction is the 8-view TTA of this fold's checkpoint
        assert_rounds_to(pred, expected_float([ckpts[(row.seed, row.fold)]], io.read_image(low)))

def test_oof_summary_matches_the_tables(two_seeds):
    _, _, summary = two_seeds
    out = paths.oof_dir("tiny")
    assert json.loads((out / "summary.json").read_text()) == summary
    table = pd.read_csv(out / "oof.csv")
    assert summary["seeds"] == [0, 1] and summary["folds"] == [0, 1] and summary["n_scenes"] == 6
    assert summary["cv"]["mean"] == pytest.approx(table["ssim"].mean(), abs=1e-6)
    assert summary["cv"]["std"] == pytest.approx(table["ssim"].std(ddof=0), abs=1e-6)
    bicubic = table.groupby("id")["bicubic_ssim"].first()
    assert summary["bicubic"]["mean"] == pytest.approx(bicubic.mean(), abs=1e-6)
    assert summary["gain_over_bicubic"] == pytest.approx(table["ssim"].mean() - bicubic.mean(), abs=1e-6)
    for fold, rows in table.groupby("fold"):
        assert summary["per_fold"][str(fold)]["mean"] == pytest.approx(rows["ssim"].mean(), abs=1e-6)
        assert summary["per_fold"][str(fold)]["n"] == len(rows)
    for seed, rows in table.groupby("seed"):
        assert summary["per_seed"][str(seed)]["mean"] == pytest.approx(rows["ssim"].mean(), abs=1e-6)
    assert summary["inference"]["tta"] == 8 and len(summary["checkpoints"]) == 4
    png = (out / "oof.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_oof_scores_the_pretrained_starting_point_with_the_same_tta(tmp_path):
    """With model.pretrained, each scene is also scored by the untouched starting net (same
    TTA): start_ssim, summary.start and gain_over_start are what the CV says fine-tuning bought."""
    previous = paths.WORKDIR
    paths.set_workdir(tmp_path)
    try:
        config = write_config(tmp_path)
        build_competition(config)
        start = save_tiny_checkpoint("start", 0, 0)          # the "pretrained" weights
        weight_file = tmp_path / "start.pth"
        torch.save(net_from_checkpoint(start).state_dict(), weight_file)
        config.write_text(config.read_text().replace("channels: [8, 6]}", f"channels: [8, 6]}}, pretrained: '{weight_file}'"))
        cfg = load_config(config)
        for fold in (0, 1):
            save_tiny_checkpoint(cfg["exp"], 0, fold)
        summary = s03_oof.run_oof(cfg)
        table = pd.read_csv(paths.oof_dir(cfg["exp"]) / "oof.csv")
        net = net_from_checkpoint(start)
        for row in table.itertuples():
            low = io.read_image(load_manifest("train").set_index("id").loc[row.id, "low_path"])
            by_hand = competition_ssim(predict_scene([net], low, tta=8, tile=0, overlap=16, batch=8), truth_of(row.id))
            assert row.start_ssim == pytest.approx(by_hand, abs=1e-6)
        assert summary["start_weights"] == str(weight_file)
        assert summary["start"]["mean"] == pytest.approx(table["start_ssim"].mean(), abs=1e-6)
        assert summary["gain_over_start"] == pytest.approx(table["ssim"].mean() - table["start_ssim"].mean(), abs=1e-6)
    finally:
        paths.set_workdir(previous)


def test_oof_seed_ensemble_averages_both_seeds(two_seeds):
    _, ckpts, summary = two_seeds
    out = paths.oof_dir("tiny")
    seeds = pd.read_csv(out / "oof_seeds.csv")
    assert len(seeds) == 6 and set(seeds["seed"]) == {s03_oof.SEED_ENSEMBLE}
    assert summary["seed_ensemble"]["cv"]["mean"] == pytest.approx(seeds["ssim"].mean(), abs=1e-6)
    single = pd.read_csv(out / "oof.csv")
    for row in seeds.itertuples():
        pred = io.read_image(out / "pred_seeds" / f"{row.id}.tif")
        assert row.ssim == pytest.approx(competition_ssim(pred, truth_of(row.id)), abs=1e-6)
        # both seeds' checkpoints of the scene's fold, every view, averaged in float, rounded once
        low = io.read_image(load_manifest("train").set_index("id").loc[row.id, "low_path"])
        pair = [ckpts[(0, row.fold)], ckpts[(1, row.fold)]]
        assert_rounds_to(pred, expected_float(pair, low))
        # and bit for bit what stage 04's call with both nets gives
        np.testing.assert_array_equal(pred, predict_scene([net_from_checkpoint(p) for p in pair], low, tta=8))
        p0, p1 = (io.read_image(out / f"pred_seed{s}" / f"{row.id}.tif") for s in (0, 1))
        assert not np.array_equal(pred, p0) and not np.array_equal(pred, p1)
    assert summary["seed_ensemble"]["cv"]["mean"] != pytest.approx(summary["cv"]["mean"], abs=1e-4)
    assert len(single) == 12


def test_oof_float_predictions_are_what_the_ensemble_averages(two_seeds):
    """pred_float/<id>.npy: uint16 fixed point 3xHxW, the float mean of the fold's seeds x
    views before clipping and rounding; rounded, it is the scored seed-ensemble prediction."""
    _, ckpts, summary = two_seeds
    out = paths.oof_dir("tiny")
    assert summary["float_predictions"] == {"folder": "pred_float", "dtype": "uint16",
                                            "layout": "3xHxW, (value + 0.25) / 1.5 * 65535, not clipped to [0, 1] or rounded",
                                            "seeds": [0, 1]}
    train = load_manifest("train").set_index("id")
    assert sorted(p.name for p in (out / "pred_float").iterdir()) == sorted(f"{i}.npy" for i in train.index)
    folds = pd.read_csv(paths.FOLDS).set_index("id")["fold"]
    for scene_id, row in train.iterrows():
        raw = np.load(out / "pred_float" / f"{scene_id}.npy")
        assert raw.dtype == np.uint16 and raw.shape == (3, row.low_height * 4, row.low_width * 4)
        decoded = io.read_float_prediction(out / "pred_float" / f"{scene_id}.npy")
        assert decoded.dtype == np.float32
        np.testing.assert_allclose(decoded, raw / (65535 / 1.5) - 0.25, atol=1e-7)
        low = io.read_image(row.low_path)
        expected = expected_float([ckpts[(0, folds[scene_id])], ckpts[(1, folds[scene_id])]], low)
        got = np.clip(decoded.astype(np.float64).transpose(1, 2, 0), 0, 1) * 255
        assert np.abs(got - expected).max() < 0.004                       # half a step of 1/171 grey level
        rounded = np.round(got).astype(np.uint8)
        scored = io.read_image(out / "pred_seeds" / f"{scene_id}.tif")
        assert (rounded != scored).mean() < 0.005 and np.abs(rounded.astype(int) - scored).max() <= 1


def test_oof_tta_changes_the_scores(workdir):
    cfg = build_competition(write_config(workdir))
    for f in (0, 1):
        save_tiny_checkpoint(cfg["exp"], 0, f)
    tta8 = s03_oof.run_oof(cfg)
    tta1 = s03_oof.run_oof(cfg, tta=1)
    assert tta1["inference"]["tta"] == 1 and tta1["seed_ensemble"] is None
    assert abs(tta8["cv"]["mean"] - tta1["cv"]["mean"]) > 1e-3
    assert tta8["bicubic"] == tta1["bicubic"]
    assert not (paths.oof_dir("tiny") / "oof_seeds.csv").exists()


def test_oof_without_checkpoints_or_with_missing_folds(workdir):
    cfg = build_competition(write_config(workdir))
    with pytest.raises(PipelineError, match=r"models/tiny: no checkpoint seed\*/fold\*/best.pt; "
                                            r"run `make train-all EXP=tiny` first"):
        s03_oof.run_oof(cfg)
    save_tiny_checkpoint("tiny", 0, 1)
    with pytest.warns(UserWarning, match=r"no best.pt for seed0/fold0; the CV covers only"):
        summary = s03_oof.run_oof(cfg)
    assert summary["folds"] == [1] and summary["n_scenes"] == 3
    save_tiny_checkpoint("tiny", 0, 7)
    with pytest.raises(PipelineError, match=r"checkpoints for fold\(s\) \[7\]"):
        s03_oof.run_oof(cfg)


def test_oof_refuses_a_checkpoint_trained_on_another_split(workdir):
    """Folds re-split after training (same K): the held-out scenes of a checkpoint's fold are
    not the ones it was validated on, so its out-of-fold score would leak."""
    from pipeline.core.checkpoints import read_checkpoint, save_checkpoint
    from pipeline.data.patches import fold_ids, split_digest

    cfg = build_competition(write_config(workdir))
    for f in (0, 1):
        path = save_tiny_checkpoint("tiny", 0, f)
        ckpt = read_checkpoint(path)
        save_checkpoint(path, net_name=ckpt["net"]["name"], net_args=ckpt["net"]["args"],
                        state_dict=ckpt["state_dict"], seed=0, fold=f, val_split=split_digest(fold_ids(f)[1]))
    assert s03_oof.run_oof(cfg)["folds"] == [0, 1]                      # recorded split = folds.csv
    folds = pd.read_csv(paths.FOLDS)
    folds["fold"] = 1 - folds["fold"]                                    # the same K, other scenes
    folds.to_csv(paths.FOLDS, index=False)
    with pytest.raises(PipelineError, match=r"seed0/fold0/best.pt: trained with other validation scenes "
                                            r"than fold 0 of .*folds.csv.*would leak"):
        s03_oof.run_oof(cfg)
