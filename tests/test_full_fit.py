"""The full-data fit (`train --fold all`) and stage 04 from it (`infer.models: full | both`).

A full fit trains on every training scene (never a test scene), has no validation, writes the
fold runs' artifacts under models/<exp>/seed<s>/full/ (best.pt: the last checkpoint's
weights), resumes exactly and is refused on a changed config; stage 04 ensembles the full
fits (or both) as it does the folds; a blend applies its out-of-fold weights to its members'
full fits; the ledger says which models made a zip.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import tifffile
import torch
from test_train import STEPS, make_competition, states_equal, write_config
from tiny_experiment import (
    NET_ARGS,
    assert_rounds_to,
    build_competition,
    expected_float,
    save_tiny_checkpoint,
    wrap_step_gradients,
)
from tiny_experiment import write_config as write_tiny_config

from pipeline.core import io, ledger, paths
from pipeline.core.artifacts import BLEND_FORMAT, load_folds, load_manifest
from pipeline.core.checkpoints import read_checkpoint, save_checkpoint
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.data import patches
from pipeline.infer.ensemble import predict_float
from pipeline.infer.load import checkpoint_paths
from pipeline.nets import build_net, net_from_checkpoint
from pipeline.stages import s04_ensemble, s05_submission
from pipeline.train import loop


def test_a_full_fit_trains_on_every_training_scene_and_never_a_test_scene(workdir, monkeypatch, capsys):
    make_competition()
    cfg = load_config(write_config(workdir))
    seen = []
    real = patches.PairedPatches

    def recording(scenes, **kwargs):
        seen.append(([s.id for s in scenes], kwargs["fold"]))
        return real(scenes, **kwargs)
    monkeypatch.setattr(loop.data, "PairedPatches", recording)
    validated, read = [], []
    monkeypatch.setattr(loop, "validate", lambda *a, **k: validated.append(1) or 0.5)
    real_read = patches.read_image
    monkeypatch.setattr(patches, "read_image", lambda path: read.append(path) or real_read(path))
    result = loop.train(cfg, fold=paths.FULL, seed=0)
    train_ids = sorted(load_manifest("train")["id"])
    assert sorted(seen[0][0]) == train_ids == sorted(load_folds()["id"])     # every training scene
    assert seen[0][1] == paths.FULL and not validated                        # no validation at all
    assert len(read) == 2 * len(train_ids)                                   # its LR and HR, nothing else
    assert all(path.parent == paths.INTERIM / "train" for path in read)      # never a test scene
    run = workdir / "models" / "tiny" / "seed0" / "full"
    assert result.run == run and result.steps_done == STEPS and result.best_ssim is None
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events")) == [
        "best.pt", "config.yaml", "curves.png", "last.pt", "log.csv"]
    best, last = read_checkpoint(run / "best.pt"), read_checkpoint(run / "last.pt")
    assert best["step"] == last["step"] == STEPS and best["fold"] == paths.FULL and last["finished"]
    assert states_equal(best["state_dict"], result.ema.state_dict())   # the last EMA weights
    assert best["val_split"] == patches.split_digest(train_ids)
    assert all(r["val_ssim"] is None for r in result.log)
    assert "full-data fit on 6 scenes" in capsys.readouterr().out


def test_a_full_fit_resumes_exactly_and_refuses_a_changed_config(workdir, monkeypatch, tmp_path_factory):
    make_competition()
    cfg_path = write_config(workdir)
    with pytest.MonkeyPatch.context() as mp:
        def stop_at_5(n, loss, terms, params):
            if n == 5:
                raise KeyboardInterrupt
            return loss, terms
        wrap_step_gradients(mp, stop_at_5)
        with pytest.raises(KeyboardInterrupt):
            loop.train(load_config(cfg_path), fold=paths.FULL, seed=0)
    last = workdir / "models" / "tiny" / "seed0" / "full" / "last.pt"
    assert read_checkpoint(last)["step"] == 4 and not read_checkpoint(last)["finished"]
    with pytest.raises(PipelineError, match=r"full: was started with a different config \(train\.lr\)"):
        loop.train(load_config(cfg_path, ["train.lr=5e-4"]), fold=paths.FULL, seed=0)
    resumed = loop.train(load_config(cfg_path, ["infer.models=full"]), fold=paths.FULL, seed=0)
    assert resumed.steps_done == STEPS - 4          # which runs stage 04 uses is no training change
    paths.set_workdir(tmp_path_factory.mktemp("straight"))
    make_competition()
    straight = loop.train(load_config(cfg_path), fold=paths.FULL, seed=0)
    assert states_equal(resumed.net.state_dict(), straight.net.state_dict())
    assert states_equal(resumed.ema.state_dict(), straight.ema.state_dict())
    # and it is not a fold's run: fold 0 of the same seed starts elsewhere, from another stream
    fold0 = loop.train(load_config(cfg_path), fold=0, seed=0)
    assert fold0.run.name == "fold0" and not states_equal(fold0.net.state_dict(), straight.net.state_dict())


def _save_full_fit(exp: str, seed: int, offset: float) -> None:
    torch.manual_seed(2000 + seed)
    net = build_net("espcn", **NET_ARGS)
    with torch.no_grad():
        net.to_subpixels.bias.add_(offset)
    save_checkpoint(paths.run_dir(exp, seed, paths.FULL) / "best.pt", net_name="espcn", net_args=NET_ARGS,
                    state_dict=net.state_dict(), exp=exp, seed=seed, fold=paths.FULL, step=10, val_ssim=None)


@pytest.fixture
def tiny_with_full_fits(workdir):
    cfg = build_competition(write_tiny_config(workdir))
    folds = [save_tiny_checkpoint("tiny", 0, f) for f in range(2)]
    for seed in (0, 1):
        _save_full_fit("tiny", seed, 0.5)
    return cfg, folds, [paths.run_dir("tiny", s, paths.FULL) / "best.pt" for s in (0, 1)]


def test_stage_04_from_the_full_fits_or_both_equals_the_hand_computation(tiny_with_full_fits, capsys):
    cfg, folds, full = tiny_with_full_fits
    for models, ckpts in (("full", full), ("both", folds + full), ("folds", folds)):
        record = s04_ensemble.run_ensemble(cfg, models=models)
        assert record["models"] == models
        assert sorted(c["path"] for c in record["checkpoints"]) == sorted(
            str(p.relative_to(paths.WORKDIR)) for p in ckpts)
        for row in load_manifest("test").itertuples():
            written = tifffile.imread(paths.predictions_dir("tiny") / f"test_{row.id}_answer.tif")
            assert_rounds_to(written, expected_float(ckpts, io.read_image(row.low_path)))
    # infer.models in the config, --models on the command line; the zip's ledger row says which
    assert s04_ensemble.main(argparse.Namespace(exp=str(paths.WORKDIR / "tiny.yaml"), blend=None, seeds=None,
                                                tta=None, tile=None, models="full", overrides=[])) == 0
    assert "checkpoint(s) of the full" in capsys.readouterr().out
    s05_submission.build_submission(cfg)
    assert list(ledger.read_ledger()["models"]) == ["full"]
    # predict takes a full fit's folder, or an experiment's full fits
    assert checkpoint_paths(full[0].parent) == ([full[0]], None)
    assert checkpoint_paths(paths.experiment_dir("tiny"), "full") == (full, None)
    with pytest.raises(PipelineError, match=r"no checkpoint seed\*/full/best.pt; run `make train FOLD=all EXP=other`"):
        from pipeline.infer.load import experiment_checkpoints
        experiment_checkpoints("other", None, "full")


def test_a_blend_of_full_fits_uses_the_weights_fitted_out_of_fold(workdir):
    """Blend weights come from the members' out-of-fold predictions (of their folds); with
    `--models full` stage 04 applies them to the members' full fits."""
    cfg = build_competition(write_tiny_config(workdir))
    for exp, offset in (("a", 0.3), ("b", 0.7)):
        for seed in (0,):
            _save_full_fit(exp, seed, offset)
        save_tiny_checkpoint(exp, 0, 0)
    blend = paths.blend_dir("ab") / "blend.json"
    blend.parent.mkdir(parents=True)
    blend.write_text(json.dumps({"format": BLEND_FORMAT, "name": "ab", "tta": 8,
                                 "members": [{"exp": "a", "seeds": [0], "weight": 0.25},
                                             {"exp": "b", "seeds": [0], "weight": 0.75}]}))
    blend_cfg = {**cfg, "exp": "ab"}               # a blend's stage 04 takes its first member's data settings
    result = s04_ensemble.run_ensemble(blend_cfg, blend=(blend, json.loads(blend.read_text())), models="full")
    used = {c["path"]: c["weight"] for c in result["checkpoints"]}
    assert used == {"models/a/seed0/full/best.pt": 0.25, "models/b/seed0/full/best.pt": 0.75}
    nets = [net_from_checkpoint(paths.run_dir(e, 0, paths.FULL) / "best.pt") for e in ("a", "b")]
    for row in load_manifest("test").itertuples():
        low = io.read_image(row.low_path)
        x = torch.from_numpy(low).permute(2, 0, 1)[None].float() / 255
        want = predict_float(nets, x, tta=8, weights=[0.25, 0.75])[0].permute(1, 2, 0).numpy()
        written = tifffile.imread(paths.predictions_dir("ab") / f"test_{row.id}_answer.tif")
        assert np.abs(written.astype(float) - np.clip(want, 0, 1) * 255).max() <= 0.5 + 1e-3
        equal_weights = predict_float(nets, x, tta=8)[0].permute(1, 2, 0).numpy()
        assert np.abs(written.astype(float) - np.clip(equal_weights, 0, 1) * 255).max() > 2   # the weights count
