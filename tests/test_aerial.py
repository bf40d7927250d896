"""The aerial benchmark and its recipes: config inheritance, the SwinIR-S recipe stepping
from a random init, the benchmark competition built from real tiles, the ablation table."""
from __future__ import annotations

import argparse
import json
import subprocess
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import demo_data, io, paths
from pipeline.ablation import table
from pipeline.checkpoints import read_checkpoint, save_checkpoint
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.metrics import competition_ssim
from pipeline.stages import s00_unzip, s01_folds, s02_train

AERIAL_VARIANTS = sorted(p.stem for p in paths.CONFIGS.glob("aerial_*.yaml"))


# --- configs ---------------------------------------------------------------------------

def test_base_key_starts_from_another_experiment(tmp_path):
    (tmp_path / "parent.yaml").write_text("train: {steps: 7, lr: 3.0e-4}\nloss: {ssim: 1.0}\n")
    (tmp_path / "child.yaml").write_text("base: parent\ntrain: {lr: 1.0e-5}\nloss: {l1: 0.5}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg["exp"] == "child"
    assert cfg["train"]["steps"] == 7 and cfg["train"]["lr"] == 1e-5        # inherited, overridden
    assert cfg["loss"] == {"ssim": 1.0, "l1": 0.5, "charbonnier": 0.0, "sobel": 0.0}
    assert cfg["train"]["batch_size"] == 16                                   # from DEFAULTS
    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    with pytest.raises(PipelineError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "typo.yaml").write_text("base: parent\ntrain: {stepz: 3}\n")
    with pytest.raises(PipelineError, match="unknown config key 'train.stepz'"):
        load_config(tmp_path / "typo.yaml")


def test_aerial_recipe_and_each_ablation_changes_one_thing():
    base = load_config("aerial")
    assert base["model"]["name"] == "rlfn" and base["model"]["pretrained"] == "rlfn_x4"
    assert base["loss"]["ssim"] == 1.0 and base["train"]["optimizer"] == "madgrad"
    assert base["train"]["ema"] > 0 and base["train"]["augment"]["dihedral"]
    assert len(AERIAL_VARIANTS) >= 6
    for variant in AERIAL_VARIANTS:
        cfg = load_config(variant)
        changed = s02_train.config_diff(base, cfg)
        assert "exp" in changed and 2 <= len(changed) <= 3, (variant, changed)  # exp + one setting (+ its pair)


def test_swinir_s_recipe_is_the_public_solution():
    cfg = load_config("swinir_s")
    t = cfg["train"]
    assert cfg["model"]["name"] == "swinir_s" and cfg["model"]["pretrained"] == "swinir_s_x4"
    assert cfg["model"]["pretrained_required"] is True
    assert cfg["loss"] == {"ssim": 1.0, "l1": 0.0, "charbonnier": 0.0, "sobel": 0.0}
    assert (t["optimizer"], t["batch_size"], t["lr_patch"]) == ("madgrad", 24, 32)
    lrs = [t["lr"] * s02_train.lr_factor_at(step, t) for step in (0, t["steps"] * 3 // 4, t["steps"] - 1)]
    assert lrs == pytest.approx([2e-4, 1e-4, 2e-5])
    assert cfg["infer"]["tta"] == 8


def _tiny_competition(exp: str, n_train: int = 4, n_test: int = 1, tile: int = 64) -> None:
    """Demo zips of tile x tile scenes -> data/interim -> 2 folds."""
    demo_data.build_demo(exp=exp, n_train=n_train, n_test=n_test, tile=tile)
    s00_unzip.extract(load_config(exp)["data"])
    s01_folds.main(argparse.Namespace(exp=exp, n_folds=2, seed=None))


def test_swinir_s_recipe_trains_a_few_steps_from_random_init(workdir):
    """The real recipe, shrunk only in size (no weights, CPU): 3 steps update the net."""
    _tiny_competition("swinir_s")
    cfg = load_config("swinir_s")
    cfg["model"]["pretrained"] = None
    cfg["train"].update(steps=4, batch_size=2, lr_patch=16, val_every=2, ckpt_every=2)
    s02_train.seed_everything(s02_train.run_seed(0, 0))   # the run's own seeding: same init
    init = s02_train.build_model(cfg, pretrained=False, main=True).state_dict()
    result = s02_train.train(cfg, fold=0, seed=0, resume="never")
    assert result.steps_done == 4
    losses = [r["loss"] for r in result.log if r["loss"] is not None]
    assert len(losses) == 4 and all(0 < v < 2 for v in losses)               # 1 - SSIM
    assert [r["lr"] for r in result.log[1:]] == pytest.approx([2e-4, 2e-4, 1e-4, 2e-5])
    last = read_checkpoint(result.run / "last.pt")
    assert last["finished"] and last["net"]["name"] == "swinir_s" and last["step"] == 4
    assert (result.run / "best.pt").is_file() and (result.run / "log.csv").is_file()
    # every weight tensor moved a little from the same init: trained, not rebuilt
    diffs = [float((v - init[k]).abs().max()) for k, v in result.net.state_dict().items()
             if v.is_floating_point() and k in init]
    assert sum(d > 0 for d in diffs) > 0.9 * len(diffs) and max(diffs) < 0.01, (max(diffs), len(diffs))


# --- the benchmark competition ------------------------------------------------------------

def test_benchmark_build_from_real_tiles(shared, workdir, tmp_path, cli):
    """`demo-data --source` on 8 real tiles (as `make benchmark-aerial` runs it on 540)."""
    tiles = sorted((shared / "data" / "ucmerced_urban").glob("*/*.tif"))[::67][:8]
    assert len(tiles) == 8
    source = tmp_path / "tiles"
    for i, tile in enumerate(tiles):
        (source / tile.parent.name).mkdir(parents=True, exist_ok=True)
        (source / tile.parent.name / tile.name).symlink_to(tile)
    proc = cli("demo-data", "--source", source, "--exp", "aerial", "--n-train", 6, "--n-test", 2,
               "--seed", 0, "--workdir", workdir, check=True)
    assert "6 train + 2 test scenes from 8 source image(s), x4 pil-bicubic" in proc.stdout
    with zipfile.ZipFile(paths.TRAIN_ZIP) as zf:
        names = sorted(zf.namelist())
    assert names == sorted(f"train_{i}_{r}.tif" for i in range(6) for r in ("low", "high"))
    with zipfile.ZipFile(paths.EVAL_ZIP) as zf:
        assert sorted(zf.namelist()) == ["test_0_low.tif", "test_1_low.tif"]
    s00_unzip.extract(load_config("aerial")["data"])
    sources = {io.read_image(t).tobytes(): t for t in tiles}
    for i in range(2):
        high = io.read_image(paths.DEMO_ANSWERS / f"test_{i}_high.tif")
        low = io.read_image(paths.INTERIM / "evaluation" / f"test_{i}_low.tif")
        assert high.shape[0] // 4 * 4 == high.shape[0] and low.shape == (high.shape[0] // 4, high.shape[1] // 4, 3)
        # the low image is exactly Pillow's bicubic of the answer, the degradation the issue measured
        expected = np.asarray(Image.fromarray(high).resize(low.shape[1::-1], Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(low, expected)
        if high.shape[:2] == (256, 256):
            assert high.tobytes() in sources                              # a whole real tile, untouched
        up = np.asarray(Image.fromarray(low).resize(high.shape[1::-1], Image.Resampling.BICUBIC))
        assert 0.3 < competition_ssim(up, high) < 0.95                        # real detail, not flat
    again = cli("demo-data", "--source", source, "--exp", "aerial", "--n-train", 6, "--n-test", 2,
                "--seed", 0, "--workdir", workdir, check=True)
    assert "(unchanged)" in again.stdout                                       # seeded: same split, same bytes


def test_make_benchmark_aerial_says_when_the_tiles_are_absent(tmp_path):
    proc = subprocess.run(["make", "--no-print-directory", "benchmark-aerial",
                           f"AERIAL_SOURCE={tmp_path / 'absent'}", "SETUP="],
                          cwd=paths.ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"{tmp_path / 'absent'} not found" in proc.stderr and "../shared" in proc.stderr


# --- the ablation table ---------------------------------------------------------------------

def test_ablation_table_reads_scores_and_cv_from_files(workdir):
    rng = np.random.default_rng(0)
    highs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    for i, high in enumerate(highs):
        io.write_tif(paths.DEMO_ANSWERS / f"test_{i}_high.tif", high)

    def predictions(name: str, pattern: str, noise: int) -> float:
        """A prediction folder of the answers plus noise; returns its expected mean SSIM."""
        scores = []
        for i, high in enumerate(highs):
            pred = np.clip(high.astype(int) + rng.integers(-noise, noise + 1, high.shape), 0, 255).astype(np.uint8)
            io.write_tif(paths.PREDICTIONS / name / pattern.format(i=i), pred)
            scores.append(competition_ssim(pred, high))
        return float(np.mean(scores))

    expected = {"bicubic": predictions("bicubic", "test_{i}_low.tif", 90),            # as `predict` names them
                "pretrained-tta8": predictions("pretrained-tta8", "test_{i}_low.tif", 40),
                "aerial": predictions("aerial", "test_{i}_answer.tif", 20)}           # as stage 04 names them
    paths.oof_dir("aerial").mkdir(parents=True)
    (paths.oof_dir("aerial") / "summary.json").write_text(json.dumps({
        "folds": [0, 1], "seeds": [0], "cv": {"mean": 0.8123}, "bicubic": {"mean": 0.7011},
        "per_fold": {"0": {"mean": 0.8111}}, "seed_ensemble": None}))
    save_checkpoint(paths.run_dir("aerial", 0, 0) / "best.pt", net_name="bicubic", net_args={"scale": 4},
                    state_dict={}, val_ssim=0.8055)
    save_checkpoint(paths.run_dir("aerial_l1", 0, 0) / "best.pt", net_name="bicubic", net_args={"scale": 4},
                    state_dict={}, val_ssim=0.8001)
    paths.FOLDS.write_text("id,scene,fold,edge_density\n0,train_0,0,0.1\n1,train_1,0,0.1\n2,train_2,1,0.1\n")
    for fold, val in ((0, 0.80), (1, 0.83)):
        (paths.run_dir("aerial", 0, fold) / "log.csv").parent.mkdir(parents=True, exist_ok=True)
        (paths.run_dir("aerial", 0, fold) / "log.csv").write_text(f"step,loss,val_ssim\n0,,{val}\n1,0.2,\n")

    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table("aerial").splitlines()[2:]}
    assert rows["bicubic"][:3] == ["0.7011", f"{expected['bicubic']:.4f}",
                                   f"{expected['bicubic'] - expected['pretrained-tta8']:+.4f}"]
    assert rows["pretrained RLFN, no fine-tuning"][0] == f"{(0.80 * 2 + 0.83) / 3:.4f}"   # scene-weighted folds
    assert rows["pretrained RLFN + 8-way TTA"][1] == f"{expected['pretrained-tta8']:.4f}"
    assert rows["fine-tuned (`aerial`), fold 0"][:2] == ["0.8055", "—"]
    assert rows["fine-tuned, 2 folds + 8-way TTA (stage 04)"][:3] == ["0.8123", f"{expected['aerial']:.4f}",
                                                     f"{expected['aerial'] - expected['pretrained-tta8']:+.4f}"]
    l1 = [k for k in rows if "`aerial_l1`" in k]
    assert len(l1) == 1 and "L1 loss instead of SSIM" in l1[0] and rows[l1[0]][0] == "0.8001"
    assert not any("aerial_adam" in k for k in rows)                      # nothing on disk: no row


def test_ablation_table_with_seeds_has_the_first_seed_and_the_seed_ensemble(workdir):
    high = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    io.write_tif(paths.DEMO_ANSWERS / "test_0_high.tif", high)
    expected = {}
    for name, pattern, shift in (("aerial-seed0", "test_{i}_low.tif", 30), ("aerial", "test_{i}_answer.tif", 10)):
        pred = np.clip(high.astype(int) + shift, 0, 255).astype(np.uint8)
        io.write_tif(paths.PREDICTIONS / name / pattern.format(i=0), pred)
        expected[name] = competition_ssim(pred, high)
    paths.oof_dir("aerial").mkdir(parents=True)
    (paths.oof_dir("aerial") / "summary.json").write_text(json.dumps({
        "folds": [0, 1, 2], "seeds": [0, 1], "cv": {"mean": 0.81}, "bicubic": {"mean": 0.70},
        "per_fold": {}, "per_seed": {"0": {"mean": 0.8111}, "1": {"mean": 0.8099}},
        "seed_ensemble": {"seeds": [0, 1], "cv": {"mean": 0.8133}}}))
    pd.DataFrame({"id": [0, 1, 0, 1, 2], "fold": [0, 0, 0, 0, 1], "seed": [0, 0, 1, 1, 0],
                  "ssim": [0.80, 0.82, 0.70, 0.70, 0.5], "bicubic_ssim": 0.6}).to_csv(
        paths.oof_dir("aerial") / "oof.csv", index=False)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table("aerial").splitlines()[2:]}
    assert rows["fine-tuned, 3 folds, seed 0 + 8-way TTA"][:2] == ["0.8111", f"{expected['aerial-seed0']:.4f}"]
    assert rows["fine-tuned, 3 folds x seeds 0 1 + 8-way TTA (stage 04)"][:2] == ["0.8133", f"{expected['aerial']:.4f}"]
    assert rows["fine-tuned, fold 0 + 8-way TTA"][0] == "0.8100"         # seed 0's fold-0 checkpoint only
