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


# --- every value checked where the config is read --------------------------------------------------

BAD_VALUES = [   # (override, the one line's message after "config 'comp': ")
    ("train.lr=-1", "train.lr must be a number > 0, got -1"),
    ("train.lr=0", "train.lr must be a number > 0, got 0"),
    ("train.steps=0", "train.steps must be a positive integer, got 0"),
    ("train.batch_size=2.5", "train.batch_size must be a positive integer, got 2.5"),
    ("train.lr_patch=-4", "train.lr_patch must be a positive integer, got -4"),
    ("train.val_every=0", "train.val_every must be a positive integer, got 0"),
    ("train.ckpt_every=true", "train.ckpt_every must be a positive integer, got True"),
    ("train.ema=1", "train.ema must be in [0, 1) (0 disables), got 1"),
    ("train.ema=-0.1", "train.ema must be in [0, 1) (0 disables), got -0.1"),
    ("train.milestones=[0.8, 0.6]", "train.milestones must be ascending fractions of the steps in (0, 1), got [0.8, 0.6]"),
    ("train.milestones=[0.5, 1.0]", "train.milestones must be ascending fractions of the steps in (0, 1), got [0.5, 1.0]"),
    ("train.lr_factors=[1.0, 0.5]", "train.lr_factors needs one factor more than milestones (3), got [1.0, 0.5]"),
    ("train.lr_factors=[1.0, 0.5, -0.1]", "train.lr_factors must be numbers > 0, got [1.0, 0.5, -0.1]"),
    ("train.grad_clip=-1", "train.grad_clip must be a number >= 0, got -1"),
    ("train.weight_decay=-0.01", "train.weight_decay must be a number >= 0, got -0.01"),
    ("train.val_tile=-8", "train.val_tile must be an integer >= 0, got -8"),
    ("train.cpu_shards=0", "train.cpu_shards must be 'auto' or an integer >= 1, got 0"),
    ("train.augment.cutmix=1.5", "train.augment.cutmix is a probability in [0, 1], got 1.5"),
    ("train.augment.dihedral=2", "train.augment.dihedral must be true or false, got 2"),
    ("train.optimizer=sgd", "train.optimizer 'sgd' unknown (madgrad, adam)"),
    ("loss.ssim=-1", "loss.ssim must be a number >= 0, got -1"),
    ("loss.ssim=0", "loss needs a term with a weight > 0, got {'ssim': 0, 'l1': 0.0, 'charbonnier': 0.0, 'sobel': 0.0}"),
    ("infer.tta=3", "infer.tta must be one of 1, 2, 4, 8 (dihedral views), got 3"),
    ("infer.tile=-1", "infer.tile must be an integer >= 0, got -1"),
    ("infer.tile=64", None),                                          # fine: overlap 16 <= 32
    ("infer.tile_overlap=40", None),                                  # fine while tile is 0
    ("infer.batch=0", "infer.batch must be a positive integer, got 0"),
    ("infer.seeds=[]", "infer.seeds must be a list of integers >= 0, got []"),
    ("infer.precision=fp8", "infer.precision 'fp8' unknown (auto, bf16, fp16, fp32)"),
    ("data.scale=0", "data.scale must be a positive integer, got 0"),
    ("data.n_folds=1", "data.n_folds must be an integer >= 2, got 1"),
    ("data.max_pixels=0", "data.max_pixels must be a positive integer, got 0"),
    ("data.extra_weight=2", "data.extra_weight must be a share between 0 and 1 (or null: in proportion to pixels), got 2"),
    ("device=gpu", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_every_value_is_checked_where_the_config_is_read(config_file, override, message):
    path = config_file()
    if message is None:
        load_config(path, [override])
        return
    with pytest.raises(PipelineError) as refused:
        load_config(path, [override])
    assert str(refused.value) == f"config 'comp': {message}"


def test_tile_overlap_beyond_half_the_tile_is_refused(config_file):
    with pytest.raises(PipelineError, match=r"infer.tile_overlap must be at most half the tile \(16\), got 9"):
        load_config(config_file(), ["infer.tile=16", "infer.tile_overlap=9"])


def test_a_bad_value_on_the_command_line_is_one_line_and_exit_1(workdir, cli):
    proc = cli("train", "--exp", "demo", "--fold", "0", "--set", "train.lr=-1")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: config 'demo': train.lr must be a number > 0, got -1"
