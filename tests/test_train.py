"""Stage 02 (train) and its data stream: paired crops/augmentation, determinism,
kill-and-resume, DDP on 2 CPU processes, NaN guard, weights and config refusals."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import gaussian_filter

from pipeline.core import paths
from pipeline.core.checkpoints import read_checkpoint
from pipeline.core.config import DEFAULTS, load_config
from pipeline.core.errors import PipelineError
from pipeline.data import competition
from pipeline.data import patches as data
from pipeline.nets import net_from_checkpoint
from pipeline.stages import s00_unzip, s01_folds
from pipeline.tools import demo_data
from pipeline.train import loop, losses

STEPS = 8
# a tiny ESPCN on 8x8 -> 32x32 crops: every code path of a real run, in well under a second
TINY = {
    "model": {"name": "espcn", "args": {"channels": [8, 8]}},
    "data": {"n_folds": 3},
    "train": {"steps": STEPS, "batch_size": 4, "lr_patch": 8, "val_every": 4, "ckpt_every": 2,
              "lr": 1.0e-3, "ema": 0.9, "milestones": [0.5], "lr_factors": [1.0, 0.5],
              "augment": {"dihedral": True, "hue_saturation": 0.5, "brightness_contrast": 0.5,
                          "cutmix": 0.5}},
    "loss": {"ssim": 1.0, "l1": 0.5},
}


def kron4(low: np.ndarray) -> np.ndarray:
    """Nearest-neighbour x4: crops and dihedral/colour ops commute with it exactly."""
    return np.kron(low, np.ones((4, 4, 1), dtype=np.uint8))


def write_config(folder, name: str = "tiny", **sections) -> str:
    """A YAML experiment file: TINY with `sections` merged over it (one level deep)."""
    import yaml
    cfg = {k: dict(v) for k, v in TINY.items()}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def make_competition(n_train: int = 6, seed: int = 0) -> None:
    """Tiny competition in paths.WORKDIR (zips -> stage 00 -> stage 01, 3 folds)."""
    rng = np.random.default_rng(seed)
    members = []
    for i in range(n_train):
        noise = rng.uniform(0, 255, (64, 80, 3))
        high = np.clip(gaussian_filter(noise, (1.5, 1.5, 0)) * 3 - 255, 0, 255).astype(np.uint8)
        members += [(f"train_{i}_high.tif", competition.tif_bytes(high)),
                    (f"train_{i}_low.tif", competition.tif_bytes(demo_data.downscale(high, 4)))]
    paths.RAW.mkdir(parents=True, exist_ok=True)
    paths.TRAIN_ZIP.write_bytes(competition.zip_bytes(members))
    paths.EVAL_ZIP.write_bytes(competition.zip_bytes([("test_0_low.tif", members[1][1])]))
    s00_unzip.extract(DEFAULTS["data"])
    s01_folds.make_folds(3, 0).to_csv(paths.FOLDS, index=False)


@pytest.fixture
def tiny(workdir):
    """A tiny competition in the work folder and the path of the tiny experiment config."""
    make_competition()
    return write_config(workdir)


def run(cfg_path: str, **kwargs) -> loop.Result:
    return loop.train(load_config(cfg_path), fold=0, seed=kwargs.pop("seed", 0), **kwargs)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def log_table(result_or_rows) -> pd.DataFrame:
    rows = getattr(result_or_rows, "log", result_or_rows)
    return pd.DataFrame(rows)[["step", "loss", "lr", "val_ssim"]]


def read_board(folder):
    """The TensorBoard events of a run folder, read back as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    return board


def assert_board_matches_log(folder) -> None:
    """Every figure of log.csv is in the event files at its step, each step once (a resumed
    run's purge marker drops what the killed run logged after its checkpoint)."""
    board, log = read_board(folder), pd.read_csv(folder / "log.csv")
    for tag, column in (("train/loss", "loss"), ("train/lr", "lr"), ("train/loss_l1", "loss_l1"),
                        ("val/ssim", "val_ssim"), ("val/bicubic_ssim", "bicubic_ssim")):
        rows = log[log[column].notna()]
        events = board.Scalars(tag)
        assert [e.step for e in events] == list(rows["step"]), tag
        np.testing.assert_allclose([e.value for e in events], rows[column], rtol=1e-6, err_msg=tag)  # float32
    assert [e.step for e in board.Images("val/crop")] == list(log.loc[log["val_ssim"].notna(), "step"])


# --- the data stream ---------------------------------------------------------------------

def fake_scenes(n: int = 3) -> list[data.Scene]:
    rng = np.random.default_rng(1)
    scenes = []
    for i in range(n):
        low = rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)
        scenes.append(data.Scene(i, low, kron4(low)))
    return scenes


AUG_ALL = {"dihedral": True, "hue_saturation": 1.0, "brightness_contrast": 1.0, "cutmix": 0.5}


def test_crops_cutmix_and_augmentation_are_paired_and_scale_aware():
    stream = data.PairedPatches(fake_scenes(), scale=4, lr_patch=32, batch_size=8, steps=4,
                                augment=AUG_ALL, seed=3, fold=1)
    lr, hr = stream[2]
    assert lr.shape == (8, 3, 32, 32) and hr.shape == (8, 3, 128, 128) and lr.dtype == torch.uint8
    # HR is x4 nearest of LR in every scene, so a correctly paired pipeline keeps it so:
    # crop offsets, CutMix box, dihedral op and colour change all agree between LR and HR.
    # (OpenCV's HSV conversion may round one level differently at other widths; not here.)
    expected = torch.from_numpy(kron4(lr.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2)
    assert (hr.int() - expected.int()).abs().max() <= 1
    # the colour ops did act: no sample is an unchanged crop of its scene
    plain = data.PairedPatches(fake_scenes(), scale=4, lr_patch=32, batch_size=8, steps=4,
                               augment={**AUG_ALL, "hue_saturation": 0, "brightness_contrast": 0},
                               seed=3, fold=1)
    assert not torch.equal(plain[2][0], lr)


def test_stream_is_a_function_of_seed_fold_step_and_splits_across_ranks():
    def stream(**kw):
        args = dict(scale=4, lr_patch=16, batch_size=6, steps=10, augment=AUG_ALL, seed=0, fold=0)
        return data.PairedPatches(fake_scenes(), **{**args, **kw})

    whole = stream()
    assert torch.equal(whole[7][1], stream()[7][1])            # same (seed, fold, step)
    assert not torch.equal(whole[7][1], whole[6][1])           # steps differ
    assert not torch.equal(whole[7][1], stream(seed=1)[7][1])  # seeds differ
    assert not torch.equal(whole[7][1], stream(fold=1)[7][1])  # folds differ
    # 3 ranks each take their third of the same global batch
    shares = [stream(rank=r, world_size=3)[7] for r in range(3)]
    assert all(s[0].shape[0] == 2 for s in shares)
    assert torch.equal(torch.cat([s[1] for s in shares]), whole[7][1])
    # resuming at step 8 with DataLoader workers yields exactly steps 8 and 9
    resumed = list(data.batches(whole, 8, num_workers=2))
    assert len(resumed) == 2 and torch.equal(resumed[1][0], whole[9][0])
    with pytest.raises(PipelineError, match="not divisible"):
        stream(world_size=4)


# --- training -----------------------------------------------------------------------------

def test_run_writes_artifacts_and_is_deterministic_for_a_seed(tiny, workdir, capsys, monkeypatch):
    validated = []                     # the weights each validation scored, in order
    real_validate = loop.validate
    monkeypatch.setattr(loop, "validate", lambda net, *a: validated.append(copy.deepcopy(net.state_dict()))
                        or real_validate(net, *a))
    first = run(tiny)
    monkeypatch.setattr(loop, "validate", real_validate)
    folder = paths.run_dir("tiny", 0, 0)
    for name in ("best.pt", "last.pt", "log.csv", "curves.png", "config.yaml"):
        assert (folder / name).is_file(), name
    log = pd.read_csv(folder / "log.csv")
    assert list(log["step"]) == list(range(STEPS + 1))
    assert log["val_ssim"].notna().sum() == 3                 # steps 0, 4 and 8
    assert set(log["lr"].dropna()) == {1e-3, 5e-4}            # the step schedule
    assert {"loss_ssim", "loss_l1"} <= set(log.columns)
    best = read_checkpoint(folder / "best.pt")
    assert best["val_ssim"] == pytest.approx(log["val_ssim"].max())
    assert best["step"] == int(log.loc[log["val_ssim"].idxmax(), "step"])
    # best.pt holds the EMA weights of its step (the ones validated there) and rebuilds as the
    # net it was trained as; validations: bicubic and the start at step 0, then the EMA at 4, 8
    net = net_from_checkpoint(folder / "best.pt")
    scored_at = {0: validated[1], 4: validated[2], 8: validated[3]}
    assert len(validated) == 4 and best["step"] in scored_at
    assert states_equal(net.state_dict(), scored_at[best["step"]])
    assert states_equal(scored_at[8], first.ema.state_dict())
    assert not states_equal(scored_at[8], first.net.state_dict())       # the EMA, not the raw weights
    out = capsys.readouterr().out
    assert "best val SSIM" in out and "steps/s" in out
    # TensorBoard beside log.csv: the same figures, and the validation crop [bicubic | model | truth]
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    assert_board_matches_log(folder)
    from io import BytesIO

    from PIL import Image
    truth = data.load_fold(0, 4)[1][0].hr          # 64x80: the whole scene fits the crop
    crops = [np.asarray(Image.open(BytesIO(e.encoded_image_string)))[..., :3]
             for e in read_board(folder).Images("val/crop")]
    assert crops[0].shape == (64, 3 * 80, 3)
    assert all(np.array_equal(c[:, 160:], truth) for c in crops)
    assert np.array_equal(crops[0][:, :80], crops[-1][:, :80])      # bicubic: fixed
    assert not np.array_equal(crops[0][:, 80:160], crops[-1][:, 80:160])  # the model: trained

    second = run(tiny, force=True)
    assert log_table(second).equals(log_table(first))
    assert states_equal(second.net.state_dict(), first.net.state_dict())
    other_seed = run(tiny, seed=1)
    assert not np.allclose(log_table(other_seed)["loss"][1:], log_table(first)["loss"][1:])


# a tiny SwinIR with shifted windows and stochastic depth (drawn per shard)
TINY_SWINIR = {"name": "swinir_s", "args": {"depths": [2], "num_heads": [2], "embed_dim": 12, "window_size": 4,
                                            "img_size": 8, "drop_path_rate": 0.3}}


@pytest.mark.parametrize("model", [TINY["model"], TINY_SWINIR], ids=["espcn", "swinir"])
def test_killed_run_resumes_to_the_same_result(tiny, workdir, tmp_path_factory, model, capsys):
    """Killed and resumed with 2 DataLoader workers, equal to a run with none that never stopped
    (both with the batch in 2 shards on threads of their own; SwinIR's stochastic depth drawn
    from each shard's generator)."""
    steps = 24
    cfg = write_config(workdir, name="tiny", model=model, train={"steps": steps, "val_every": 8, "cpu_shards": 2})
    env = {**os.environ, "SR_WORKDIR": str(workdir)}
    workers = ["train.num_workers=2"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--exp", cfg, "--fold", "0",
                             "--set", workers[0]],
                            cwd=paths.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = paths.run_dir("tiny", 0, 0) / "last.pt"
    deadline = time.time() + 60
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    killed_at = read_checkpoint(last)["step"]
    assert 0 < killed_at < steps

    with pytest.warns(UserWarning, match="took over the lock of pid .* whose process is gone"):
        resumed = loop.train(load_config(cfg, workers), fold=0, seed=0)
    assert resumed.steps_done == steps - killed_at
    assert not list(last.parent.glob(".*.tmp*"))              # temporaries of the kill removed
    assert_board_matches_log(last.parent)

    # the same run, never interrupted, in another work folder
    paths.set_workdir(tmp_path_factory.mktemp("uninterrupted"))
    make_competition()
    straight = run(cfg)
    assert straight.steps_done == steps
    assert "2 shards of the batch on 2 threads" in capsys.readouterr().out
    assert states_equal(resumed.net.state_dict(), straight.net.state_dict())
    assert states_equal(resumed.ema.state_dict(), straight.ema.state_dict())
    assert log_table(resumed).equals(log_table(straight))
    assert (resumed.best_ssim, resumed.best_step) == (straight.best_ssim, straight.best_step)


def test_finished_run_is_not_retrained(tiny, workdir, capsys):
    run(tiny)
    best = paths.run_dir("tiny", 0, 0) / "best.pt"
    stamp = best.stat().st_mtime_ns
    again = run(tiny)
    assert again.steps_done == 0 and best.stat().st_mtime_ns == stamp
    assert "already trained" in capsys.readouterr().out
    # a changed config is not silently taken for the finished run
    changed = write_config(workdir, train={"lr": 5.0e-4})
    with pytest.raises(PipelineError, match=r"different config \(train\.lr\).*--force"):
        run(changed)
    assert run(changed, force=True).steps_done == STEPS


def test_run_on_a_re_split_fold_is_refused(tiny, workdir):
    """folds.csv re-split after training (same K, other scenes): the finished run is not
    taken for this fold's; --force retrains it."""
    run(tiny)
    s01_folds.make_folds(3, 1).to_csv(paths.FOLDS, index=False)          # another fold seed
    with pytest.raises(PipelineError, match=r"fold0: was trained on another split of .*folds.csv "
                                            r"\(fold 0 holds other validation scenes now\); --force"):
        run(tiny)
    assert run(tiny, force=True).steps_done == STEPS
    assert run(tiny).steps_done == 0                                     # the new split is recorded


@pytest.mark.parametrize("shards", [1, 2])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, workdir, monkeypatch, shards):
    """A NaN loss at step 5 (in one shard of the batch, when it is split) stops the run before
    the update; last.pt stays step 4's."""
    real_build = losses.build_loss

    def build_failing(weights):
        loss = real_build(weights)
        calls = {"n": 0}
        counting = threading.Lock()   # the shards' threads call it at once: one number each
        real_evaluate = loss.evaluate

        def evaluate(sr, hr):
            with counting:
                calls["n"] += 1       # one call per shard and step
                n = calls["n"]
            value, terms = real_evaluate(sr, hr)
            return (value * float("nan"), terms) if n == 4 * shards + 1 else (value, terms)
        loss.evaluate = evaluate
        return loss

    monkeypatch.setattr(losses, "build_loss", build_failing)
    cfg = write_config(workdir, train={"cpu_shards": shards})
    last = paths.run_dir("tiny", 0, 0) / "last.pt"
    with pytest.raises(PipelineError, match=r"loss is nan at step 5.*last good checkpoint .*last\.pt \(step 4\) was kept"):
        run(cfg)
    ckpt = read_checkpoint(last)
    assert ckpt["step"] == 4 and not ckpt["finished"]
    assert all(torch.isfinite(v).all() for v in ckpt["train_state"]["net"].values())


def test_missing_required_weights_stop_with_the_weights_message(tiny, workdir, cli):
    cfg = write_config(workdir, model={"pretrained": "no_such_file_x4.pth"})
    proc = cli("train", "--exp", cfg, "--fold", "0", env={"SR_WORKDIR": str(workdir)})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no_such_file_x4.pth: unknown weights")
    assert "Traceback" not in proc.stderr
    assert not (paths.run_dir("tiny", 0, 0) / "last.pt").exists()
    # optional: a warning, then training from scratch
    optional = write_config(workdir, model={"pretrained": "no_such_file_x4.pth", "pretrained_required": False})
    with pytest.warns(UserWarning, match="trains from scratch"):
        assert run(optional).steps_done == STEPS


def test_config_refusals_name_the_key(tiny, workdir):
    with pytest.raises(PipelineError, match="unknown config key 'train.stpes'"):
        run(write_config(workdir, train={"stpes": 3}))
    with pytest.raises(PipelineError, match="train.lr_factors needs one factor more"):
        run(write_config(workdir, train={"milestones": [0.3, 0.6]}))
    with pytest.raises(PipelineError, match="train.optimizer 'sgd' unknown"):
        run(write_config(workdir, train={"optimizer": "sgd"}))


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from pipeline.core.config import load_config
    from pipeline.train.loop import train
    result = train(load_config(sys.argv[1]), fold=0, seed=0)
    torch.save({"net": result.net.state_dict(), "ema": result.ema.state_dict()},
               os.path.join(sys.argv[2], "rank%s.pt" % os.environ["RANK"]))
""")


def train_in_two_processes(cfg: str, workdir, out) -> tuple[subprocess.CompletedProcess, dict, dict]:
    """Stage 02 of `cfg` under torchrun on 2 CPU processes: the run, and each rank's weights
    (asserted identical)."""
    script = out / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "SR_WORKDIR": str(workdir), "PYTHONPATH": str(paths.ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), cfg, str(out)], cwd=paths.ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert states_equal(rank0["net"], rank1["net"]) and states_equal(rank0["ema"], rank1["ema"])
    return proc, rank0, rank1


def test_ddp_trains_a_transformer_on_its_fast_path(workdir, tmp_path_factory):
    """DDP broadcasts the nets' buffers every step: SwinIR's (1, 3, 1, 1) `mean`, made
    channels-last with the convolutions by the fast path, failed that broadcast (torch refused
    to copy it onto itself) until buffers kept their plain strides."""
    make_competition()
    swinir = write_config(workdir, name="tiny_swinir", model=TINY_SWINIR,
                          train={"steps": 2, "val_every": 2, "ckpt_every": 2})
    train_in_two_processes(swinir, workdir, tmp_path_factory.mktemp("ranks"))
    assert list(pd.read_csv(paths.run_dir("tiny_swinir", 0, 0) / "log.csv")["step"]) == [0, 1, 2]


def test_ddp_two_cpu_processes_hold_identical_weights(tiny, workdir, tmp_path_factory):
    proc, rank0, _ = train_in_two_processes(tiny, workdir, tmp_path_factory.mktemp("ranks"))
    # rank 0 alone wrote the log, once per step
    folder = paths.run_dir("tiny", 0, 0)
    assert list(pd.read_csv(folder / "log.csv")["step"]) == list(range(STEPS + 1))
    assert proc.stdout.count("best val SSIM") == 1
    # each rank trained on its half of the global batch: the same run as one process
    ddp_log = pd.read_csv(folder / "log.csv")
    single = run(tiny, force=True)
    for key, value in single.net.state_dict().items():
        assert torch.allclose(rank0["net"][key], value, atol=1e-4), key
    assert np.allclose(ddp_log["loss"][1:], log_table(single)["loss"][1:].astype(float), atol=1e-4)


def test_training_improves_the_validation_score(tiny, workdir):
    """A seconds-long run from a random init: the best validation SSIM beats the start (step 0)
    by far more than noise, and the loss falls; an update in the wrong direction would not."""
    result = run(write_config(workdir, train={"steps": 40, "val_every": 10, "ckpt_every": 40}))
    log = pd.DataFrame(result.log)
    start = float(log.loc[log["step"] == 0, "val_ssim"].iloc[0])
    assert result.best_ssim >= start + 0.03, (start, result.best_ssim)        # 0.009 -> 0.061 here
    losses = log["loss"].dropna().to_numpy()
    assert losses[-10:].mean() < 0.95 * losses[:10].mean()                     # 1.23 -> 1.06 here
