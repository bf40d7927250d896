"""Blends: the greedy weight fit, its nested CV, blend.json, and stages 04/05 and predict from a blend."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from tiny_experiment import assert_rounds_to, build_competition, expected_float, save_tiny_checkpoint, write_config

from pipeline.core import artifacts, io, paths
from pipeline.core.artifacts import load_manifest
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import competition_ssim
from pipeline.infer import blend
from pipeline.stages import s03_oof, s04_ensemble, s05_submission

# --- the fit on synthetic per-scene scores --------------------------------------------------

def quadratic_scores(best: np.ndarray, noise: np.ndarray):
    """A score function whose scene s peaks at weights `best` (+ per-scene jitter)."""
    def score(counts, scenes):
        w = blend.weights_of(counts)
        return np.asarray([1 - ((w - best - noise[s]) ** 2).sum() for s in scenes])
    return score


def test_greedy_weights_are_non_negative_sum_to_one_and_find_the_optimum():
    rng = np.random.default_rng(0)
    target = np.array([0.6, 0.3, 0.1, 0.0])
    score = quadratic_scores(target, rng.normal(0, 0.01, (50, 4)))
    counts = blend.greedy_selection(score, 4, np.arange(50))
    weights = blend.weights_of(counts)
    assert all(isinstance(c, int) and c >= 0 for c in counts) and sum(counts) <= blend.MAX_STEPS
    assert (weights >= 0).all() and weights.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(weights, target, atol=0.06)
    assert weights[3] == 0                          # a member that does not help never enters
    # one member better everywhere: it alone
    assert blend.greedy_selection(quadratic_scores(np.array([1.0, 0, 0]), np.zeros((5, 3))), 3,
                                  np.arange(5)) == (1, 0, 0)


def test_nested_cv_never_sees_the_scored_fold():
    rng = np.random.default_rng(1)
    folds = np.repeat([0, 1, 2, 3], 6)
    base = quadratic_scores(np.array([0.5, 0.5]), rng.normal(0, 0.2, (24, 2)))
    asked = []

    def spy(counts, scenes):
        asked.append(set(map(int, scenes)))
        return base(counts, scenes)

    fitted_on = {}

    def fit(score, n, scenes):
        start = len(asked)
        counts = blend.greedy_selection(score, n, scenes)
        fitted_on[len(fitted_on)] = set().union(*asked[start:])
        return counts

    result = blend.nested_cv(spy, 2, folds, fit=fit)
    for k in range(4):
        held_out = set(np.flatnonzero(folds == k).tolist())
        assert fitted_on[k] and not fitted_on[k] & held_out          # the fit never looked at fold k
        assert fitted_on[k] == set(range(24)) - held_out
        detail = result["per_fold"][str(k)]
        assert detail["n"] == 6 and sum(detail["weights"]) == pytest.approx(1)
        assert detail["fitted"] == pytest.approx(np.mean(base(tuple(detail["counts"]), sorted(held_out))))
    assert result["cv"] == pytest.approx(result["per_scene"].mean())


# --- end to end on a tiny competition ------------------------------------------------------

@pytest.fixture(scope="module")
def two_exps(tmp_path_factory):
    """A tiny competition (8 train scenes in 2 folds, 2 test) and two experiments of random
    ESPCNs with their stage 03 run; `b` has two seeds."""
    folder = tmp_path_factory.mktemp("blend")
    previous = paths.WORKDIR
    paths.set_workdir(folder)
    try:
        cfg_a = build_competition(write_config(folder, "a"), n_train=8)
        write_config(folder, "b")
        for fold in (0, 1):
            save_tiny_checkpoint("a", 0, fold)
            save_tiny_checkpoint("b", 0, fold, step=5 + fold)
            save_tiny_checkpoint("b", 1, fold, step=7)
        # b's checkpoints must differ from a's: save_tiny_checkpoint seeds by (seed, fold)
        from pipeline.core.checkpoints import read_checkpoint, save_checkpoint
        for path in sorted((folder / "models" / "b").glob("seed*/fold*/best.pt")):
            ckpt = read_checkpoint(path)
            state = {k: v + 0.05 * (1 + int(path.parent.name[4:])) for k, v in ckpt["state_dict"].items()}
            save_checkpoint(path, net_name="espcn", net_args=ckpt["net"]["args"], state_dict=state,
                            exp="b", seed=ckpt["seed"], fold=ckpt["fold"], step=ckpt["step"], val_ssim=0.5)
        from pipeline.core.config import load_config
        for exp in ("a", "b"):
            s03_oof.run_oof(load_config(folder / f"{exp}.yaml"))
    finally:
        paths.set_workdir(previous)
    return folder, cfg_a


@pytest.fixture
def blend_dir(two_exps, monkeypatch):
    folder, cfg = two_exps
    previous = paths.WORKDIR
    paths.set_workdir(folder)
    monkeypatch.setattr(paths, "CONFIGS", folder)   # experiments by name: the tiny configs
    yield folder
    paths.set_workdir(previous)


def test_blend_json_figures_are_honest(blend_dir, capsys):
    record = blend.fit_blend(["a", "b"], "ab")
    on_disk = json.loads((paths.blend_dir("ab") / "blend.json").read_text())
    assert on_disk == record and record["format"] == artifacts.BLEND_FORMAT
    weights = [m["weight"] for m in record["members"]]
    assert min(weights) >= 0 and sum(weights) == pytest.approx(1.0, abs=1e-12)
    assert [m["exp"] for m in record["members"]] == ["a", "b"]
    assert record["members"][1]["seeds"] == [0, 1] and record["tta"] == 8 and record["n_scenes"] == 8
    # each member's CV recomputed from its kept floats is its stage-03 CV (to the encoding's rounding)
    for member in record["members"]:
        assert member["cv"] == pytest.approx(member["oof_cv"], abs=2e-4)
    # the equal-weight CV by hand: mean of the two members' floats, rounded once, competition SSIM
    train = load_manifest("train").set_index("id")
    by_hand = []
    for scene_id, row in train.iterrows():
        floats = [io.read_float_prediction(paths.oof_predictions_dir(e) / f"{scene_id}.npy") for e in "ab"]
        mean = (np.clip(0.5 * floats[0] + 0.5 * floats[1], 0, 1) * 255).round().astype(np.uint8)
        by_hand.append(competition_ssim(mean.transpose(1, 2, 0), io.read_image(row.high_path)))
    assert record["cv"]["equal"] == pytest.approx(np.mean(by_hand), abs=1e-9)
    # out-of-fold: each fold scored with weights fitted without it
    assert set(record["per_fold"]) == {"0", "1"}
    n = sum(d["n"] for d in record["per_fold"].values())
    assert record["cv"]["fitted_out_of_fold"] == pytest.approx(
        sum(d["fitted"] * d["n"] for d in record["per_fold"].values()) / n)
    kept_fit = record["cv"]["fitted_out_of_fold"] > record["cv"]["equal"]
    assert record["kept"] == ("fitted" if kept_fit else "equal")
    if not kept_fit:
        assert weights == [0.5, 0.5] and "too few scenes" in record["verdict"]
    else:
        assert record["fitted_weights"] == {m["exp"]: pytest.approx(m["weight"]) for m in record["members"]}


def test_blend_keeps_equal_weights_when_the_fit_does_not_pay_off(blend_dir):
    """Two members that predict alike: no weights beat equal ones out of fold, so the blend
    says so and keeps equal weights (the fit itself stops at the first member)."""
    import shutil

    shutil.copytree(paths.MODELS / "a", paths.MODELS / "a_copy", dirs_exist_ok=True)
    shutil.copy(blend_dir / "a.yaml", blend_dir / "a_copy.yaml")
    record = blend.fit_blend(["a", "a_copy"], "same")
    assert record["cv"]["fitted_out_of_fold"] == record["cv"]["equal"] == record["cv"]["members"]["a"]
    assert record["kept"] == "equal" and [m["weight"] for m in record["members"]] == [0.5, 0.5]
    assert record["verdict"] == ("too few scenes for a weight fit to beat equal weights out of fold "
                                 f"(8 scenes: fitted {record['cv']['equal']:.4f} vs equal "
                                 f"{record['cv']['equal']:.4f}); keeping equal weights")
    assert record["fitted_weights"] == {"a": 1.0, "a_copy": 0.0}


def test_blended_stage_04_equals_a_hand_computation(blend_dir):
    path, record = artifacts.read_blend("ab")
    record["members"][0]["weight"], record["members"][1]["weight"] = 0.7, 0.3  # unequal, to see them
    path.write_text(json.dumps(record))
    cfg, path, rec = artifacts.blend_config("ab")
    out = s04_ensemble.run_ensemble(cfg, blend=(path, rec))
    assert cfg["exp"] == "ab" and out["blend"]["name"] == "ab" and out["tta"] == 8
    assert [(m["exp"], m["weight"]) for m in out["members"]] == [("a", 0.7), ("b", 0.3)]
    ckpts_a = sorted((paths.MODELS / "a").glob("seed*/fold*/best.pt"))
    ckpts_b = sorted((paths.MODELS / "b").glob("seed*/fold*/best.pt"))
    assert len(ckpts_a) == 2 and len(ckpts_b) == 4
    assert [c["weight"] for c in out["checkpoints"]] == pytest.approx([0.35] * 2 + [0.075] * 4)
    for row in load_manifest("test").itertuples():
        low = io.read_image(row.low_path)
        # by hand: each experiment's nets x 8 views averaged, then 0.7 / 0.3, clipped, rounded once
        mean_a = expected_float(ckpts_a, low) / 255   # clipped means: undo only where in range
        raw_a = _unclipped_mean(ckpts_a, low)
        raw_b = _unclipped_mean(ckpts_b, low)
        expected = np.clip(0.7 * raw_a + 0.3 * raw_b, 0, 1) * 255
        written = tifffile.imread(paths.predictions_dir("ab") / f"test_{row.id}_answer.tif")
        assert_rounds_to(written, expected)
        assert np.abs(written - np.round(mean_a * 255)).max() > 5          # b's share is in it
    zip_path = s05_submission.build_submission(cfg)
    assert zip_path.name.startswith("ab-")
    # a changed blend makes the predictions stale
    record["members"][0]["weight"], record["members"][1]["weight"] = 0.6, 0.4
    path.write_text(json.dumps(record))
    with pytest.raises(PipelineError, match=r"blend.json: blend changed .* rerun `python -m pipeline ensemble --blend ab`"):
        s05_submission.build_submission(cfg)


def _unclipped_mean(ckpt_paths, low):
    import torch
    from tiny_experiment import dihedral_views, to_tensor

    from pipeline.nets import net_from_checkpoint

    total, count = 0.0, 0
    for p in ckpt_paths:
        net = net_from_checkpoint(p)
        for view, undo in dihedral_views(low):
            with torch.no_grad():
                out = net(to_tensor(np.ascontiguousarray(view(low))))[0].permute(1, 2, 0).numpy()
            total = total + undo(out.astype(np.float64))
            count += 1
    return total / count


def test_predict_with_a_blend_file_equals_stage_04(blend_dir, cli):
    blend.fit_blend(["a", "b"], "ab_predict")
    cfg, path, rec = artifacts.blend_config("ab_predict")
    s04_ensemble.run_ensemble(cfg, blend=(path, rec))
    out = blend_dir / "predicted"
    proc = cli("predict", "--checkpoint", path, "--input", paths.INTERIM / "evaluation", "--output", out,
               env={"SR_WORKDIR": str(blend_dir)}, check=True)
    assert "6 net(s), tta 8" in proc.stdout
    for row in load_manifest("test").itertuples():
        np.testing.assert_array_equal(tifffile.imread(out / f"test_{row.id}_low.tif"),
                                      tifffile.imread(paths.predictions_dir("ab_predict") / f"test_{row.id}_answer.tif"))


def test_equal_weights_on_request_keep_the_fit_figures(blend_dir):
    fitted = blend.fit_blend(["a", "b"], "ab_fit")
    equal = blend.fit_blend(["a", "b"], "ab_equal", weighting="equal")
    assert [m["weight"] for m in equal["members"]] == [0.5, 0.5] and equal["kept"] == "equal"
    assert equal["weighting"] == "equal" and equal["verdict"].startswith("equal weights, as asked")
    assert equal["cv"] == fitted["cv"] and equal["cv"]["blend"] == equal["cv"]["equal"]
    with pytest.raises(PipelineError, match="blend --weights best: one of fit, equal expected"):
        blend.fit_blend(["a", "b"], "x", weighting="best")


def test_predict_finds_a_blends_members_beside_the_blend_file(blend_dir, cli, tmp_path):
    """A blend of a benchmark's work folder predicted from the project root (no SR_WORKDIR):
    the members are the experiments beside the blend's models/ folder."""
    blend.fit_blend(["a", "b"], "ab_elsewhere")
    cfg, path, rec = artifacts.blend_config("ab_elsewhere")
    s04_ensemble.run_ensemble(cfg, blend=(path, rec))
    out = tmp_path / "predicted"
    cli("predict", "--checkpoint", path, "--input", paths.INTERIM / "evaluation", "--output", out,
        env={"SR_WORKDIR": str(tmp_path)}, check=True)
    for row in load_manifest("test").itertuples():
        np.testing.assert_array_equal(tifffile.imread(out / f"test_{row.id}_low.tif"),
                                      tifffile.imread(paths.predictions_dir("ab_elsewhere") / f"test_{row.id}_answer.tif"))


def test_blend_refuses_bad_members(blend_dir):
    with pytest.raises(PipelineError, match="at least two experiments"):
        blend.fit_blend(["a"], "x")
    with pytest.raises(PipelineError, match=r"models/c/oof/summary.json: missing; run stage 03 first"):
        blend.fit_blend(["a", "c"], "x")
    with pytest.raises(PipelineError, match=r"--name a: an experiment of that name exists"):
        blend.fit_blend(["a", "b"], "a")
    bad = paths.blend_dir("bad") / "blend.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"format": artifacts.BLEND_FORMAT, "members": [{"exp": "a", "weight": 0.8},
                                                                   {"exp": "b", "weight": 0.8}]}))
    with pytest.raises(PipelineError, match=r"weights \[0.8, 0.8\] must be non-negative and sum to 1"):
        artifacts.read_blend("bad")


def test_make_default_trains_every_member_on_every_fold_then_submits_their_blend(make_dry_run):
    lines = make_dry_run("default", "DEFAULT_EXPS=aerial aerial_rfdn", "DEFAULT_BLEND=pair")
    pipe = [line.split("-m pipeline ", 1)[1] for line in lines if "-m pipeline " in line]
    trains = [cmd for cmd in pipe if cmd.startswith("train ")]
    assert trains == [f"train --exp {exp} --fold {f} --seed 0 " for exp in ("aerial", "aerial_rfdn") for f in range(5)]
    order = [cmd.split()[0] for cmd in pipe if cmd.split()[0] in ("train", "oof", "blend", "ensemble", "submission")]
    assert order == ["train"] * 5 + ["oof"] + ["train"] * 5 + ["oof", "blend", "ensemble", "submission"]
    assert pipe[0].startswith("unzip ") and pipe.index("folds --exp aerial") < pipe.index(trains[0])
    assert "blend --exps aerial aerial_rfdn --name pair" in pipe
    assert "ensemble --blend pair" in pipe and "submission --blend pair" in pipe
    # one member: the ordinary stages 00-05 of that experiment, no blend
    single = make_dry_run("default", "DEFAULT_EXPS=aerial")
    assert not any("-m pipeline blend" in line for line in single)
    assert any("-m pipeline submission --exp aerial" in line for line in single)
    # the shipped default names experiments that exist
    default = [line for line in make_dry_run("default") if "-m pipeline blend " in line]
    members = default[0].split("--exps ", 1)[1].split(" --name")[0].split() if default else []
    assert all((paths.CONFIGS / f"{exp}.yaml").is_file() for exp in members)
