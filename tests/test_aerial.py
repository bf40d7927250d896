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
import yaml
from conftest import missing
from PIL import Image

from pipeline.__main__ import main as cli_main
from pipeline.core import io, paths
from pipeline.core.checkpoints import read_checkpoint, save_checkpoint
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import competition_ssim
from pipeline.stages import s00_unzip, s01_folds
from pipeline.tools import benchmark_aerial, demo_data
from pipeline.tools.ablation import table
from pipeline.train import loop, recipe, resume

# variants of the x4 recipe (aerial_x5*: another scale, another competition, not an ablation)
AERIAL_VARIANTS = sorted(p.stem for p in paths.CONFIGS.glob("aerial_*.yaml")
                         if load_config(p)["data"]["scale"] == load_config("aerial")["data"]["scale"])


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


CLASSIC_NETS = {"aerial_vdsr", "aerial_srcnn"}


def test_aerial_recipe_and_each_ablation_changes_one_thing():
    base = load_config("aerial")
    assert base["model"]["name"] == "rlfn" and base["model"]["pretrained"] == "rlfn_x4"
    assert base["loss"]["ssim"] == 1.0 and base["train"]["optimizer"] == "madgrad"
    assert base["train"]["ema"] > 0 and base["train"]["augment"]["dihedral"]
    assert len(AERIAL_VARIANTS) >= 6
    for variant in AERIAL_VARIANTS:
        # each variant changes one thing of the recipe it names as its base (aerial, or a variant of it)
        parent = yaml.safe_load((paths.CONFIGS / f"{variant}.yaml").read_text())["base"]
        assert parent == "aerial" or parent in AERIAL_VARIANTS, (variant, parent)
        changed = resume.config_diff(load_config(parent), load_config(variant))
        if variant in CLASSIC_NETS:   # another net from scratch: the net, no weights, its training schedule
            assert {"exp", "model.name", "model.pretrained"} <= set(changed), (variant, changed)
            assert all(k in ("exp", "model.name", "model.pretrained") or k.startswith("train.") for k in changed)
            continue
        assert "exp" in changed and 2 <= len(changed) <= 3, (variant, changed)  # exp + one setting (+ its pair)


def test_swinir_s_recipe_is_the_public_solution():
    cfg = load_config("swinir_s")
    t = cfg["train"]
    assert cfg["model"]["name"] == "swinir_s" and cfg["model"]["pretrained"] == "swinir_s_x4"
    assert cfg["model"]["pretrained_required"] is True
    assert cfg["loss"] == {"ssim": 1.0, "l1": 0.0, "charbonnier": 0.0, "sobel": 0.0}
    assert (t["optimizer"], t["batch_size"], t["lr_patch"]) == ("madgrad", 24, 32)
    lrs = [t["lr"] * recipe.lr_factor_at(step, t) for step in (0, t["steps"] * 3 // 4, t["steps"] - 1)]
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
    resume.seed_everything(resume.run_seed(0, 0))   # the run's own seeding: same init
    init = recipe.build_model(cfg, pretrained=False, main=True).state_dict()
    result = loop.train(cfg, fold=0, seed=0, resume="never")
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


def test_hat_s_recipe_trains_a_few_steps_from_random_init(workdir):
    """The HAT-S GPU recipe, shrunk only in size (no weights, CPU, 2 of 6 groups): 3 steps
    on 8x8 crops (padded to one window) update the net; validation on whole scenes."""
    cfg = load_config("hat_s")
    assert cfg["model"]["pretrained"] == "hat_s_x4" and cfg["model"]["pretrained_required"] is True
    assert cfg["train"]["lr_patch"] % 16 == 0 and cfg["train"]["lr"] == 1e-4
    _tiny_competition("hat_s", tile=64)
    cfg["model"].update(pretrained=None, args={"depths": [2, 2], "num_heads": [6, 6]})
    cfg["train"].update(steps=3, batch_size=1, lr_patch=8, val_every=3, ckpt_every=3)
    resume.seed_everything(resume.run_seed(0, 0))
    init = recipe.build_model(cfg, pretrained=False, main=True).state_dict()
    result = loop.train(cfg, fold=0, seed=0, resume="never")
    assert result.steps_done == 3
    lrs = [r["lr"] for r in result.log[1:]]
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-5)
    last = read_checkpoint(result.run / "last.pt")
    assert last["finished"] and last["net"]["name"] == "hat_s"
    moved = [k for k, v in result.net.state_dict().items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert len(moved) > 0.9 * len(init)


def test_aerial_x5_carries_rlfn_x4_to_x5_with_a_fresh_upsampler():
    cfg = load_config("aerial_x5")
    assert cfg["data"]["scale"] == 5 and cfg["model"]["args"]["scale"] == 5
    assert cfg["model"]["pretrained"] == "rlfn_x4" and cfg["model"]["reinit"] == ["upsampler"]
    scratch = load_config("aerial_x5_scratch")
    assert resume.config_diff(cfg, scratch) == ["exp", "model.pretrained", "model.reinit"]
    assert "aerial_x5" not in AERIAL_VARIANTS and "aerial_x5_scratch" not in AERIAL_VARIANTS
    parser = argparse.ArgumentParser()
    benchmark_aerial.add_arguments(parser)
    ablations = benchmark_aerial.plan(parser.parse_args([]))["ablations"]    # the benchmark's fold-0 rows
    assert "aerial_ssim_l1" in ablations and not any(a.startswith("aerial_x5") for a in ablations)
    assert benchmark_aerial.plan(parser.parse_args(["--main-rows"])) == {
        "kfold": [], "blends": [], "ablations": [], "random_folds": False}


def _x5_competition(monkeypatch) -> dict:
    """A tiny x5 competition (`demo-data` at data.scale 5: 190 -> 38 scenes), 3 folds; the
    aerial_x5 config with rlfn_x4 from ../shared/weights."""
    weights_file = paths.SHARED_WEIGHTS / "rlfn_x4.pth"
    if not weights_file.is_file():
        missing("rlfn_x4.pth absent from ../shared/weights")
    monkeypatch.setenv("SR_WEIGHTS_DIR", str(paths.SHARED_WEIGHTS))
    assert demo_data.build_demo(exp="aerial_x5", n_train=6, n_test=1)["scale"] == 5
    cfg = load_config("aerial_x5")
    s00_unzip.extract(cfg["data"])
    s01_folds.main(argparse.Namespace(exp="aerial_x5", n_folds=3, seed=None))
    return cfg


@pytest.mark.shared
def test_aerial_x5_run_loads_rlfn_x4_but_its_upsampler_and_records_it(workdir, monkeypatch, capsys):
    cfg = _x5_competition(monkeypatch)
    cfg["train"].update(steps=2, batch_size=2, lr_patch=12, val_every=2, ckpt_every=2)
    capsys.readouterr()
    result = loop.train(cfg, fold=0, seed=0, resume="never")
    out = capsys.readouterr().out
    assert "train: pretrained rlfn_x4: 112 tensors loaded from rlfn_x4.pth; re-initialised: upsampler " \
           "(2 tensors of the file not used) (sha256 8c7edb57dfc89048...)" in out
    weights_file = paths.SHARED_WEIGHTS / "rlfn_x4.pth"
    record = yaml.safe_load((result.run / "config.yaml").read_text())["pretrained_loaded"]
    assert record == {"file": str(weights_file), "sha256": io.sha256_file(weights_file), "tensors_loaded": 112,
                      "reinitialised": ["upsampler"], "file_tensors_not_used": 2}
    assert load_config(result.run / "config.yaml")["model"]["reinit"] == ["upsampler"]   # reads back
    assert result.net.scale == 5 and result.steps_done == 2
    # a resumed or skipped run loads nothing: the record stays that of the start
    again = loop.train(cfg, fold=0, seed=0)
    assert again.steps_done == 0 and "pretrained_loaded" in (result.run / "config.yaml").read_text()


@pytest.mark.slow
@pytest.mark.shared
def test_aerial_x5_beats_bicubic_on_its_held_out_fold(workdir, monkeypatch):
    """200 steps on the tiny x5 competition (at a higher rate than the recipe's: fewer,
    smaller crops) take the transferred RLFN past bicubic x5 on the held-out fold
    (measured: 0.762 vs 0.742, ~45 s on one core)."""
    cfg = _x5_competition(monkeypatch)
    cfg["train"].update(steps=200, batch_size=8, lr_patch=16, val_every=50, ckpt_every=50, lr=2e-3)
    result = loop.train(cfg, fold=0, seed=0, resume="never")
    assert result.best_ssim > result.bicubic_ssim + 0.005, (result.best_ssim, result.bicubic_ssim)


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
        # the low image is exactly Pillow's bicubic of the answer, the degradation the benchmark uses
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
                           f"AERIAL_ARGS=--source {tmp_path / 'absent'}", "SETUP="],
                          cwd=paths.ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: benchmark-aerial: {tmp_path / 'absent'} not found: the real tiles live in "
                      "../shared/data/ucmerced_urban beside the checkout (not in the repository)"]


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
    steps = load_config("aerial_l1")["train"]["steps"]                   # a finished ablation run
    (paths.run_dir("aerial_l1", 0, 0) / "log.csv").write_text(f"step,loss,val_ssim\n0,,0.79\n{steps},0.2,0.8001\n")

    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table("aerial").splitlines()[2:]}
    assert rows["bicubic"][:3] == ["0.7011", f"{expected['bicubic']:.4f}",
                                   f"{expected['bicubic'] - expected['pretrained-tta8']:+.4f}"]
    assert rows["pretrained RLFN, no fine-tuning"][0] == f"{(0.80 * 2 + 0.83) / 3:.4f}"   # scene-weighted folds
    assert rows["pretrained RLFN + 8-way TTA"][1] == f"{expected['pretrained-tta8']:.4f}"
    assert rows["fine-tuned (`aerial`), fold 0"][:2] == ["0.8055", "—"]
    # a run that ended before its steps says so: its best.pt is only the best so far
    assert rows["fine-tuned (`aerial`), fold 0"][6] == "fold 0 validation, best.pt (stopped at step 1 of 500)"
    assert rows["fine-tuned, 2 folds + 8-way TTA (stage 04)"][:3] == ["0.8123", f"{expected['aerial']:.4f}",
                                                     f"{expected['aerial'] - expected['pretrained-tta8']:+.4f}"]
    l1 = [k for k in rows if "`aerial_l1`" in k]
    assert len(l1) == 1 and "L1 loss instead of SSIM" in l1[0] and rows[l1[0]][0] == "0.8001"
    assert rows[l1[0]][6] == "fold 0 validation, best.pt"
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


def test_ablation_table_gains_blends_random_folds_and_the_default_submission(workdir):
    """CV gains against stage 03's pretrained + TTA figure beside the test gains, the gap
    between them, every experiment on all folds, blends, the random-folds sibling work folder,
    and the default chosen by grouped CV within the training budget (never by the test)."""
    import os

    from pipeline.tools import ablation

    rng = np.random.default_rng(2)
    highs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    for i, high in enumerate(highs):
        io.write_tif(paths.DEMO_ANSWERS / f"test_{i}_high.tif", high)

    per_scene = {}

    def predictions(folder, noise: int, stage04: bool) -> float:
        scores = []
        for i, high in enumerate(highs):
            pred = np.clip(high.astype(int) + np.random.default_rng(noise + i).integers(-noise, noise + 1, high.shape),
                           0, 255).astype(np.uint8)
            io.write_tif(folder / (f"test_{i}_answer.tif" if stage04 else f"test_{i}_low.tif"), pred)
            scores.append(competition_ssim(pred, high))
        per_scene[folder.name] = np.array(scores)
        if stage04:
            (folder / "ensemble.json").write_text(json.dumps({"tta": 8, "precision": "bf16", "threads": 2}))
        return float(np.mean(scores))

    def oof(models, exp: str, cv: float, start: float, weights: str) -> None:
        (models / exp / "oof").mkdir(parents=True)
        (models / exp / "oof" / "summary.json").write_text(json.dumps({
            "folds": [0, 1], "seeds": [0], "cv": {"mean": cv}, "bicubic": {"mean": 0.70}, "per_fold": {},
            "seed_ensemble": None, "start": {"mean": start}, "start_weights": weights, "inference": {"tta": 8}}))

    def runs(models, exp: str, seconds: float) -> None:
        for fold in (0, 1):
            run = models / exp / "seed0" / f"fold{fold}"
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.yaml").write_text("{}\n")
            (run / "last.pt").write_bytes(b"")
            os.utime(run / "config.yaml", (1e9, 1e9))
            os.utime(run / "last.pt", (1e9 + seconds, 1e9 + seconds))

    ref = predictions(paths.PREDICTIONS / "pretrained-tta8", 40, stage04=False)
    test = {"aerial": predictions(paths.PREDICTIONS / "aerial", 20, True),
            "aerial_rfdn": predictions(paths.PREDICTIONS / "aerial_rfdn", 15, True),
            "mix": predictions(paths.PREDICTIONS / "mix", 10, True)}
    oof(paths.MODELS, "aerial", 0.8123, 0.8000, "rlfn_x4")
    oof(paths.MODELS, "aerial_rfdn", 0.8130, 0.8010, "rfdn_x4")   # its own start; gains still vs RLFN's
    runs(paths.MODELS, "aerial", 1000)
    runs(paths.MODELS, "aerial_rfdn", 6000)
    blend_file = paths.blend_dir("mix") / "blend.json"
    blend_file.parent.mkdir(parents=True)
    blend_file.write_text(json.dumps({"name": "mix", "kept": "fitted", "cv": {"blend": 0.8140},
                                      "members": [{"exp": "aerial", "weight": 0.4}, {"exp": "aerial_rfdn", "weight": 0.6}]}))
    solo = paths.blend_dir("solo") / "blend.json"   # a fit that gave one member nothing
    solo.parent.mkdir(parents=True)
    solo.write_text(json.dumps({"name": "solo", "kept": "fitted", "cv": {"blend": 0.8100},
                                "members": [{"exp": "aerial", "weight": 0.0}, {"exp": "aerial_rfdn", "weight": 1.0}]}))
    random = ablation.random_folds_workdir(paths.WORKDIR)
    assert random.name == f"{paths.WORKDIR.name}-random-folds"
    oof(random / "models", "aerial", 0.8250, 0.8000, "rlfn_x4")
    runs(random / "models", "aerial", 1100)
    random_test = predictions(random / "data" / "predictions" / "aerial", 20, True)

    scored = ablation.scored_rows("aerial")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table("aerial", scored).splitlines()[2:]}
    assert rows["pretrained RLFN + 8-way TTA"][:3] == ["0.8000", f"{ref:.4f}", ""]
    kfold = rows["fine-tuned, 2 folds + 8-way TTA (stage 04)"]
    assert kfold[:5] == ["0.8123", f"{test['aerial']:.4f}", f"{test['aerial'] - ref:+.4f}", "+0.0123",
                         f"{0.0123 - (test['aerial'] - ref):+.4f}"]
    assert kfold[5] == f"{1000 / 3600:.2f} h"                   # 2 folds of 1000 s, side by side
    rfdn = next(v for k, v in rows.items() if k.startswith("`aerial_rfdn`: RFDN"))
    assert rfdn[:4] == ["0.8130", f"{test['aerial_rfdn']:.4f}", f"{test['aerial_rfdn'] - ref:+.4f}", "+0.0130"]
    mix = rows["blend `mix` (fitted weights): 0.40 `aerial` + 0.60 `aerial_rfdn`"]
    assert mix[:4] == ["0.8140", f"{test['mix']:.4f}", f"{test['mix'] - ref:+.4f}", "+0.0140"]
    assert mix[5] == f"{7000 / 3600:.2f} h"                     # every member's training
    assert rows["blend `solo` (fitted weights): 1.00 `aerial_rfdn`"][5] == f"{7000 / 3600:.2f} h"  # zero weight too
    # each gain as a share of the reference's error (1 - its SSIM), and the test gain's 95 %
    # interval paired per scene (Student's t on 2 scenes' differences, by hand here)
    assert rfdn[8] == f"{(test['aerial_rfdn'] - ref) / (1 - ref):+.1%}"
    assert rfdn[9].rstrip(" |") == f"{0.0130 / (1 - 0.8000):+.1%}"
    diff = per_scene["aerial_rfdn"] - per_scene["pretrained-tta8"]
    half = 12.706204736 * diff.std(ddof=1) / np.sqrt(2)            # t(0.975, 1 degree of freedom)
    assert rfdn[7] == f"{diff.mean() - half:+.4f} to {diff.mean() + half:+.4f}"
    assert rows["pretrained RLFN + 8-way TTA"][7:9] == ["", ""]
    # the rank agreement of CV and test over the candidates on every fold (both figures known)
    spearman = [line for line in table("aerial", scored).splitlines() if line.startswith("Rank agreement")]
    assert spearman == ["Rank agreement of the grouped CV with the test over the 3 candidates trained on every "
                        "fold: Spearman +1.00."]
    shuffled = rows["fine-tuned (`aerial`), 2 **random** folds + 8-way TTA"]
    assert shuffled[:5] == ["0.8250", f"{random_test:.4f}", f"{random_test - ref:+.4f}", "+0.0250",
                            f"{0.0250 - (random_test - ref):+.4f}"]

    # the default: best grouped CV within 2.5 h of training -> the blend (1.94 h)
    chosen = ablation.choose_default([row for row, _ in scored])
    assert chosen.label.startswith("blend `mix`")
    assert cli_main(["ablation", "--workdir", str(paths.WORKDIR), "--write-default"]) == 0
    line = (paths.WORKDIR / "default-submission.txt").read_text()
    assert line == f"--checkpoint {blend_file.resolve()} --tta 8 --precision bf16\n"
    # RFDN's folds now take 3 h each side by side: the blend and RFDN no longer fit, RLFN does
    runs(paths.MODELS, "aerial_rfdn", 3 * 3600)
    chosen = ablation.choose_default(ablation.collect_rows("aerial"))
    assert chosen.label == "fine-tuned, 2 folds + 8-way TTA (stage 04)"
    assert ablation.predict_arguments(chosen) == f"--checkpoint {paths.experiment_dir('aerial').resolve()} --tta 8 --precision bf16"
    # --check-default: predict's folder against stage 04's files of the default
    assert cli_main(["ablation", "--workdir", str(paths.WORKDIR), "--write-default"]) == 0
    check = paths.PREDICTIONS / "default-submission"
    for i in range(2):
        io.write_tif(check / f"test_{i}_low.tif", io.read_image(paths.PREDICTIONS / "aerial" / f"test_{i}_answer.tif"))
    assert "reproduced" in ablation.check_default(check, ablation.collect_rows("aerial"))
    io.write_tif(check / "test_1_low.tif", highs[1])
    with pytest.raises(PipelineError, match=r"test_1_low.tif: differs from stage 04's .*test_1_answer.tif "
                                            r"\(1 of 2 scenes, \d+ values, by at most \d+; stage 04 ran on 2 thread"):
        ablation.check_default(check, ablation.collect_rows("aerial"))


def test_the_classic_nets_train_from_scratch_in_aerials_time():
    """VDSR and SRCNN from scratch on fold 0: the steps that take aerial's training time (their
    step measured against aerial's), the net the tutorials train, no pretrained weights."""
    aerial = load_config("aerial")["train"]
    for exp, name, ratio in (("aerial_vdsr", "vdsr", 1.70), ("aerial_srcnn", "srcnn", 0.87)):
        cfg = load_config(exp)
        assert cfg["model"]["name"] == name and cfg["model"]["pretrained"] is None
        assert abs(cfg["train"]["steps"] * ratio - aerial["steps"]) < 0.02 * aerial["steps"]
    assert load_config("aerial_vdsr")["train"]["lr_patch"] == 10       # the paper's 40x40 crops
