"""`--set KEY=VALUE` overrides: YAML values, nested keys, free-form model.args, refusals by
name exactly as in a file, the run's config.yaml, and a run with other overrides refused."""
from __future__ import annotations

import warnings

import pytest
import torch
import yaml
from test_train import STEPS, make_competition, write_config
from tiny_experiment import wrap_step_gradients

from pipeline.__main__ import main as cli_main
from pipeline.core import paths
from pipeline.core.checkpoints import read_checkpoint
from pipeline.core.config import DEFAULTS, apply_overrides, load_config
from pipeline.core.errors import PipelineError
from pipeline.train import loop


@pytest.fixture(autouse=True)
def keep_warning_format(monkeypatch):
    """The CLI's main() sets a one-line warning format; keep it to these tests."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)


def test_values_are_yaml_and_keys_nest(config_file):
    path = config_file(model={"name": "espcn", "args": {"channels": [8, 8], "scale": 4}},
                       train={"lr": 2.0e-4})
    cfg = load_config(path, ["train.steps=2000", "loss.sobel=0.1", "train.lr=1e-4",
                             "train.milestones=[0.5, 0.9]", "train.augment.cutmix=0.25",
                             "train.augment.dihedral=false", "model.pretrained=", "train.optimizer=adam",
                             "model.args.channels=[16, 8]", "train.steps=3000"])
    t = cfg["train"]
    assert t["steps"] == 3000                       # the later --set wins
    assert t["lr"] == 1.0e-4 and isinstance(t["lr"], float)   # YAML 1.2 float, not the string '1e-4'
    assert t["milestones"] == [0.5, 0.9] and t["optimizer"] == "adam"
    assert t["augment"] == {**DEFAULTS["train"]["augment"], "cutmix": 0.25, "dihedral": False}
    assert cfg["loss"] == {**DEFAULTS["loss"], "sobel": 0.1}
    assert cfg["model"]["pretrained"] is None       # an empty value is null
    # model.args is free-form: one argument set, the file's others kept
    assert cfg["model"]["args"] == {"channels": [16, 8], "scale": 4}
    assert cfg["exp"] == "comp" and cfg["train"]["batch_size"] == DEFAULTS["train"]["batch_size"]
    # a whole mapping replaces model.args, as in a file; a new argument name is accepted
    assert load_config(path, ["model.args={channels: [4]}"])["model"]["args"] == {"channels": [4]}
    assert load_config(path, ["model.args.upscale=2"])["model"]["args"] == {"channels": [8, 8], "scale": 4,
                                                                           "upscale": 2}
    # overrides never change what a later load of the file gives
    assert load_config(path)["train"]["steps"] == DEFAULTS["train"]["steps"]


@pytest.mark.parametrize("item, message", [
    ("train.stpes=3", r"^--set train.stpes=3: unknown config key 'train.stpes'$"),
    ("trian.steps=3", r"^--set trian.steps=3: unknown config key 'trian'$"),
    ("exp=other", r"unknown config key 'exp'"),
    ("train.steps", r"^--set train.steps: expected KEY=VALUE with a dotted key, e\.g\. train.steps=2000$"),
    ("x", r"^--set x: expected KEY=VALUE"),
    ("=3", r"^--set =3: expected KEY=VALUE"),
    ("train..steps=3", r"expected KEY=VALUE with a dotted key"),
    ("train=3", r"^--set train=3: config key 'train' must be a mapping$"),
    ("train.steps.x=1", r"^--set train.steps.x=1: config key 'train.steps' is a value, not a mapping$"),
    ("train.milestones=[0.5", r"^--set train.milestones=\[0.5: invalid YAML value"),
])
def test_bad_overrides_are_refused_by_name(config_file, item, message):
    with pytest.raises(PipelineError, match=message):
        load_config(config_file(), [item])


def test_unknown_key_message_is_the_files(config_file):
    """The same refusal, word for word, as the misspelt key in a file; only the source differs."""
    with pytest.raises(PipelineError) as in_file:
        load_config(config_file(train={"stpes": 3}))
    with pytest.raises(PipelineError) as on_cli:
        apply_overrides(load_config(config_file()), ["train.stpes=3"])
    assert str(in_file.value).split(": ", 1)[1] == str(on_cli.value).split(": ", 1)[1] \
        == "unknown config key 'train.stpes'"


@pytest.mark.parametrize("command", ["train", "oof", "ensemble"])
def test_every_config_command_takes_set(command, config_file, workdir, capsys):
    """train, oof and ensemble read --set through the CLI; a bad key is one error line, exit 1,
    before any work (no artifact is looked for)."""
    extra = ["--fold", "0"] if command == "train" else []
    code = cli_main([command, "--exp", str(config_file()), *extra, "--set", "infer.tta=1",
                     "--set", "infer.ttta=1"])
    assert code == 1
    assert capsys.readouterr().err.strip() == "error: --set infer.ttta=1: unknown config key 'infer.ttta'"


def test_train_records_overrides_and_refuses_a_run_with_other_ones(workdir, capsys):
    make_competition()
    cfg_path = write_config(workdir)
    argv = ["train", "--exp", cfg_path, "--fold", "0"]
    assert cli_main(argv + ["--set", "train.lr=5e-4", "--set", "model.args.channels=[8, 4]"]) == 0
    folder = paths.run_dir("tiny", 0, 0)
    recorded = yaml.safe_load((folder / "config.yaml").read_text())
    assert recorded["train"]["lr"] == 5.0e-4 and recorded["model"]["args"]["channels"] == [8, 4]
    assert read_checkpoint(folder / "last.pt")["config"]["train"]["lr"] == 5.0e-4
    capsys.readouterr()
    # the same overrides: the finished run is found; other ones (or none): refused by key
    assert cli_main(argv + ["--set", "train.lr=5e-4", "--set", "model.args.channels=[8, 4]"]) == 0
    assert "already trained" in capsys.readouterr().out
    assert cli_main(argv + ["--set", "train.lr=5e-4"]) == 1
    assert capsys.readouterr().err.strip().endswith(
        "was trained with a different config (model.args); --force retrains from scratch")
    # workers change the speed, not the run: not refused
    assert cli_main(argv + ["--set", "train.lr=5e-4", "--set", "model.args.channels=[8, 4]",
                            "--set", "train.num_workers=1"]) == 0
    assert "already trained" in capsys.readouterr().out


def test_unfinished_run_is_not_resumed_with_other_overrides(workdir, monkeypatch):
    """A run stopped at step 4 (its last.pt unfinished) resumes with the same overrides only."""
    make_competition()
    cfg_path = write_config(workdir)
    with pytest.MonkeyPatch.context() as mp:
        wrap_step_gradients(mp, lambda n, loss, terms, params: (loss * (float("nan") if n == 5 else 1.0), terms))
        with pytest.raises(PipelineError, match="loss is nan at step 5"):
            loop.train(load_config(cfg_path, ["train.lr=5e-4"]), fold=0, seed=0)
    last = paths.run_dir("tiny", 0, 0) / "last.pt"
    assert read_checkpoint(last)["step"] == 4
    with pytest.raises(PipelineError, match=r"was started with a different config \(train\.lr\); --force"):
        loop.train(load_config(cfg_path, ["train.lr=1e-3"]), fold=0, seed=0)
    with pytest.raises(PipelineError, match=r"was started with a different config \(train\.lr\)"):
        loop.train(load_config(cfg_path), fold=0, seed=0)
    resumed = loop.train(load_config(cfg_path, ["train.lr=5e-4"]), fold=0, seed=0)
    assert resumed.steps_done == STEPS - 4
    assert all(torch.isfinite(v).all() for v in resumed.net.state_dict().values())


def test_oof_and_ensemble_run_with_the_overridden_settings(workdir, capsys):
    """`--set infer.tta=1` over a file that says 8: both stages record TTA 1."""
    import json

    from tiny_experiment import build_competition, save_tiny_checkpoint
    from tiny_experiment import write_config as write_tiny

    cfg = build_competition(write_tiny(workdir, tta=8), n_train=4, n_test=1)
    for fold in (0, 1):
        save_tiny_checkpoint(cfg["exp"], 0, fold)
    exp = str(workdir / "tiny.yaml")
    assert cli_main(["oof", "--exp", exp, "--set", "infer.tta=1"]) == 0
    assert json.loads((paths.oof_dir("tiny") / "summary.json").read_text())["inference"]["tta"] == 1
    assert cli_main(["ensemble", "--exp", exp, "--set", "infer.tta=1"]) == 0
    assert json.loads((paths.predictions_dir("tiny") / "ensemble.json").read_text())["tta"] == 1
    assert "x 1 TTA views" in capsys.readouterr().out
