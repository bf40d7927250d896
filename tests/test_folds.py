"""Stage 01 (folds): every scene in exactly one fold, seeded, balanced on edge density."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter

from pipeline.core import artifacts, paths
from pipeline.core.errors import PipelineError
from pipeline.data import competition
from pipeline.data import folds as fold_split
from pipeline.data.folds import assign_group_folds


def tiny_competition(n_train: int, seed: int = 0) -> list[float]:
    """Zips of n_train scenes whose low-res images range from smooth to busy; returns
    the blur applied to each (more blur, fewer edges)."""
    rng = np.random.default_rng(seed)
    blurs = rng.uniform(0, 3, n_train)
    train = {}
    for i, blur in enumerate(blurs):
        noise = rng.uniform(0, 255, (8, 10, 3))
        low = np.clip(gaussian_filter(noise, (blur, blur, 0)), 0, 255).astype(np.uint8)
        train[f"train_{i}_low.tif"] = competition.tif_bytes(low)
        train[f"train_{i}_high.tif"] = competition.tif_bytes(np.repeat(np.repeat(low, 4, 0), 4, 1))
    paths.RAW.mkdir(parents=True, exist_ok=True)
    paths.TRAIN_ZIP.write_bytes(competition.zip_bytes(list(train.items())))
    paths.EVAL_ZIP.write_bytes(competition.zip_bytes([("test_0_low.tif", train["train_0_low.tif"])]))
    return blurs.tolist()


def test_edge_density():
    flat = np.full((16, 16, 3), 120, np.uint8)
    stripes = np.zeros((16, 16, 3), np.uint8)
    stripes[:, (np.arange(16) // 2) % 2 == 1] = 255  # 2-pixel stripes (1-pixel ones alias to no gradient)
    ramp = np.repeat(np.linspace(0, 255, 16).astype(np.uint8)[None, :, None], 16, 0).repeat(3, 2)
    assert fold_split.edge_density(flat) == pytest.approx(0.0, abs=1e-9)
    assert 0 < fold_split.edge_density(ramp) < 0.1 < 0.5 < fold_split.edge_density(stripes) <= 1.0


def test_assign_folds_covers_balances_and_is_seeded():
    stat = np.random.default_rng(0).permutation(103).astype(float)  # values 0..102, shuffled
    folds = fold_split.assign_folds(stat, 5, seed=0)
    assert set(folds) == {0, 1, 2, 3, 4} and len(folds) == 103
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() == 1 and sizes.sum() == 103
    # stratified: every fold's mean rank is within 2.5 of the overall 51; a random split
    # of this size typically misses by ~6
    means = [stat[folds == f].mean() for f in range(5)]
    assert max(abs(m - 51) for m in means) < 2.5, means
    np.testing.assert_array_equal(folds, fold_split.assign_folds(stat, 5, seed=0))
    assert (folds != fold_split.assign_folds(stat, 5, seed=1)).sum() > 50


def test_assign_folds_refuses_more_folds_than_scenes(workdir):
    with pytest.raises(PipelineError, match="6 folds requested but only 5 training scene"):
        fold_split.assign_folds(np.arange(5.0), 6, seed=0)
    with pytest.raises(PipelineError, match="at least 2 folds"):
        fold_split.assign_folds(np.arange(5.0), 1, seed=0)
    assert sorted(fold_split.assign_folds(np.arange(5.0), 5, seed=0)) == [0, 1, 2, 3, 4]


def test_folds_stage_end_to_end(workdir, config_file, cli):
    config = config_file(data=dict(n_folds=3, fold_seed=7))
    blurs = tiny_competition(13)
    proc = cli("folds", "--exp", config)
    assert proc.returncode == 1 and proc.stderr.strip() == \
        f"error: {paths.MANIFEST}: missing; run `make unzip` (stage 00) first"

    cli("unzip", "--exp", config, check=True)
    out = cli("folds", "--exp", config, check=True).stdout
    assert "13 scenes in 3 folds (seed 7" in out and "(written" in out
    folds = pd.read_csv(paths.FOLDS)
    assert list(folds.columns) == ["id", "scene", "fold", "edge_density"]
    assert sorted(folds["id"]) == list(range(13))
    assert sorted(np.bincount(folds["fold"])) == [4, 4, 5]
    # the statistic follows the scene content: blurrier scenes have fewer edges
    order = folds.sort_values("id")
    corr = np.corrcoef(order["edge_density"], blurs)[0, 1]
    assert corr < -0.8, corr

    text = paths.FOLDS.read_text()
    assert "(unchanged" in cli("folds", "--exp", config, check=True).stdout
    assert paths.FOLDS.read_text() == text
    pd.testing.assert_frame_equal(artifacts.load_folds(), folds)

    cli("folds", "--exp", config, "--n-folds", 5, check=True)
    assert sorted(pd.read_csv(paths.FOLDS)["fold"].unique()) == [0, 1, 2, 3, 4]
    proc = cli("folds", "--exp", config, "--n-folds", 14)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: {paths.MANIFEST}: 14 folds requested but only 13 training "
                                   "scene(s); use --n-folds 13 or fewer")


# --- grouped folds (data/raw/groups.csv) ------------------------------------------------

def test_assign_group_folds_keeps_groups_whole_and_balanced():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 8, 40)                      # 40 groups of 1-7 scenes
    groups = np.repeat([f"g{k}" for k in range(40)], sizes)
    stat = np.repeat(rng.uniform(0, 1, 40), sizes) + rng.normal(0, 0.01, len(groups))
    folds = assign_group_folds(stat, groups, 5, seed=0)
    # a group never straddles two folds
    per_group = pd.DataFrame({"g": groups, "f": folds}).groupby("g")["f"].nunique()
    assert (per_group == 1).all()
    counts = np.bincount(folds, minlength=5)
    assert counts.min() > 0 and counts.max() - counts.min() <= sizes.max(), counts
    means = [stat[folds == f].mean() for f in range(5)]
    assert max(means) - min(means) < 0.15, means          # stratified on the group means
    np.testing.assert_array_equal(folds, assign_group_folds(stat, groups, 5, seed=0))
    with pytest.raises(PipelineError, match="3 group\\(s\\) cannot fill 5 folds"):
        assign_group_folds(stat[:6], np.array(list("aabbcc")), 5, seed=0)


def test_folds_stage_with_groups_csv(workdir, config_file, cli):
    config = config_file(data=dict(n_folds=3))
    tiny_competition(13)
    cli("unzip", "--exp", config, check=True)
    out = cli("folds", "--exp", config, check=True).stdout
    assert out.count("scenes are split one by one") == 1
    assert "group" not in pd.read_csv(paths.FOLDS).columns
    groups = [f"place{i // 3}" for i in range(13)]              # 5 groups: 3,3,3,3,1 scenes
    (paths.RAW / "groups.csv").write_text("id,group\n" + "".join(f"{i},{g}\n" for i, g in enumerate(groups)))
    out = cli("folds", "--exp", config, check=True).stdout
    assert "5 groups kept whole" in out and "split one by one" not in out
    folds = pd.read_csv(paths.FOLDS)
    assert list(folds.columns) == ["id", "scene", "fold", "edge_density", "group"]
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    assert folds.set_index("id").loc[list(range(13)), "group"].tolist() == groups
    # a scene without a group is refused by name; data.groups: null switches groups off
    (paths.RAW / "groups.csv").write_text("id,group\n" + "".join(f"{i},{g}\n" for i, g in enumerate(groups[:12])))
    proc = cli("folds", "--exp", config)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: {paths.RAW / 'groups.csv'}: no group for 1 training scene(s) (ids [12]); "
        "list every scene or remove the file")
    off = config_file("off", data=dict(n_folds=3, groups=None))
    out = cli("folds", "--exp", off, check=True).stdout
    assert "kept whole" not in out and "one by one" not in out
    assert "group" not in pd.read_csv(paths.FOLDS).columns
