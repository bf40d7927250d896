"""The predict and score commands, as a user runs them."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from pipeline.__main__ import main as cli_main
from pipeline.core import io
from pipeline.core.checkpoints import save_checkpoint
from pipeline.core.metrics import competition_ssim
from pipeline.infer.ensemble import predict_scene
from pipeline.nets import build_net


def random_image(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def run(capsys, *argv):
    """The CLI in this process (fast); returns (exit code, stdout, stderr)."""
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def mixed_inputs(workdir):
    """A folder of tif and png images of odd, non-square sizes."""
    folder = workdir / "inputs"
    images = {"a.tif": random_image((13, 17, 3), 0), "b.png": random_image((20, 9, 3), 1),
              "c.tif": random_image((8, 8, 3), 2)}
    for name, img in images.items():
        io.write_image(folder / name, img)
    return folder, images


def test_predict_folder_gives_same_names_uint8_4x(mixed_inputs, workdir, capsys):
    folder, images = mixed_inputs
    out = workdir / "out"
    code, stdout, _ = run(capsys, "predict", "--model", "bicubic", "--input", folder, "--output", out)
    assert code == 0 and "3 image(s)" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(images)
    for name, lr in images.items():
        sr = io.read_image(out / name)
        assert sr.dtype == np.uint8 and sr.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
        assert np.array_equal(sr, predict_scene([build_net("bicubic")], lr))


def test_predict_one_file_with_tta_and_tiles(mixed_inputs, workdir, capsys):
    """A net whose views and tiles give other pixels (random ESPCN weights): the command's
    output is exactly predict_scene with the same TTA, tile and overlap, and dropping any of
    the three would show."""
    folder, images = mixed_inputs
    torch.manual_seed(3)
    net = build_net("espcn", scale=4).eval()
    torch.save({"params": net.state_dict()}, workdir / "espcn.pth")
    out = workdir / "out"
    code, _, _ = run(capsys, "predict", "--model", "espcn", "--weights", workdir / "espcn.pth", "--input",
                     folder / "a.tif", "--output", out, "--tta", 8, "--tile", 8, "--overlap", 4, "--scale", 4)
    assert code == 0
    written = io.read_image(out / "a.tif")
    settings = {"tta": 8, "tile": 8, "overlap": 4}
    assert np.array_equal(written, predict_scene([net], images["a.tif"], **settings))
    for other in ({"tta": 1}, {"tile": 0}, {"overlap": 2}):       # each setting changes the answer
        assert not np.array_equal(written, predict_scene([net], images["a.tif"], **{**settings, **other})), other


def test_predict_with_weights_file_and_checkpoint_ensemble(mixed_inputs, workdir, capsys):
    folder, images = mixed_inputs
    nets = []
    for fold in (0, 1):
        torch.manual_seed(fold)
        net = build_net("espcn", scale=4).eval()
        save_checkpoint(workdir / "models" / "exp" / "seed0" / f"fold{fold}" / "best.pt",
                        net_name="espcn", net_args={"scale": 4}, state_dict=net.state_dict(),
                        exp="exp", seed=0, fold=fold, step=1, val_ssim=None)
        nets.append(net)
    torch.save({"params": nets[0].state_dict()}, workdir / "espcn_fold0.pth")

    code, _, _ = run(capsys, "predict", "--model", "espcn", "--weights", workdir / "espcn_fold0.pth",
                     "--input", folder, "--output", workdir / "single")
    assert code == 0
    assert np.array_equal(io.read_image(workdir / "single" / "b.png"), predict_scene(nets[:1], images["b.png"]))

    code, stdout, _ = run(capsys, "predict", "--checkpoint", workdir / "models" / "exp",
                          "--input", folder, "--output", workdir / "ens")
    assert code == 0 and "2 net(s)" in stdout
    ensemble = predict_scene(nets, images["b.png"])
    assert np.array_equal(io.read_image(workdir / "ens" / "b.png"), ensemble)
    assert not np.array_equal(ensemble, predict_scene(nets[:1], images["b.png"]))

    # one seed's folder: its folds only (a second seed's checkpoint is left out)
    torch.manual_seed(7)
    save_checkpoint(workdir / "models" / "exp" / "seed1" / "fold0" / "best.pt", net_name="espcn",
                    net_args={"scale": 4}, state_dict=build_net("espcn", scale=4).state_dict(),
                    exp="exp", seed=1, fold=0, step=1, val_ssim=None)
    code, stdout, _ = run(capsys, "predict", "--checkpoint", workdir / "models" / "exp" / "seed0",
                          "--input", folder, "--output", workdir / "seed0")
    assert code == 0 and "2 net(s)" in stdout
    assert np.array_equal(io.read_image(workdir / "seed0" / "b.png"), ensemble)
    code, _, err = run(capsys, "predict", "--checkpoint", workdir / "models", "--input", folder,
                       "--output", workdir / "none")
    assert code == 1 and "no seed*/fold*/best.pt or fold*/best.pt checkpoint" in err


@pytest.mark.parametrize("argv, message", [
    (["--model", "espcn"], "has trainable parameters: give --weights"),
    (["--model", "nosuchnet"], "unknown net 'nosuchnet'"),
    (["--model", "bicubic", "--weights", "nosuchweights"], "nosuchweights: unknown weights"),
    (["--model", "bicubic", "--weights", "x.pth", "--checkpoint", "y.pt"], "exclude each other"),
    (["--model", "rlfn", "--scale", "3", "--checkpoint", "nowhere"], "checkpoint not found"),
    (["--checkpoint", "nowhere/best.pt"], "checkpoint not found"),
    ([], "give --model NAME"),
])
def test_predict_errors_are_one_line(mixed_inputs, workdir, capsys, argv, message):
    folder, _ = mixed_inputs
    code, _, err = run(capsys, "predict", *argv, "--input", folder, "--output", workdir / "o")
    assert code == 1
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_predict_refuses_to_overwrite_its_inputs(mixed_inputs, capsys):
    folder, _ = mixed_inputs
    code, _, err = run(capsys, "predict", "--model", "bicubic", "--input", folder, "--output", folder)
    assert code == 1 and "would overwrite" in err


# ---------------------------------------------------------------------------------- score

@pytest.fixture
def answers(workdir):
    folder = workdir / "data" / "demo" / "answers"
    highs = {i: random_image((24, 32, 3), 10 + i) for i in range(3)}
    for i, high in highs.items():
        io.write_tif(folder / f"test_{i}_high.tif", high)
    return folder, highs


def noisy(high, seed):
    noise = np.random.default_rng(seed).integers(-30, 31, high.shape)
    return np.clip(high.astype(int) + noise, 0, 255).astype(np.uint8)


def write_submission(folder, images: dict, as_zip: bool):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in images.items():
        io.write_tif(folder / f"test_{i}_answer.tif", img)
    if not as_zip:
        return folder
    zpath = folder.with_suffix(".zip")
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, p.name)
    return zpath


@pytest.mark.parametrize("as_zip", [False, True])
def test_perfect_submission_scores_one(answers, workdir, capsys, as_zip):
    folder, highs = answers
    sub = write_submission(workdir / "perfect", highs, as_zip)
    code, out, _ = run(capsys, "score", "--submission", sub, "--answers", folder)
    assert code == 0 and "mean SSIM 1.00000 over 3 images" in out


def test_score_is_the_mean_competition_ssim_with_csv(answers, workdir, capsys):
    folder, highs = answers
    preds = {i: noisy(h, i) for i, h in highs.items()}
    sub = write_submission(workdir / "noisy", preds, as_zip=True)
    csv = workdir / "scores.csv"
    code, out, _ = run(capsys, "score", "--submission", sub, "--answers", folder, "--csv", csv)
    assert code == 0
    expected = [competition_ssim(preds[i], highs[i]) for i in range(3)]
    assert f"mean SSIM {np.mean(expected):.5f}" in out
    import pandas as pd
    table = pd.read_csv(csv)
    assert table["id"].tolist() == [0, 1, 2]
    assert table["ssim"].to_numpy() == pytest.approx(expected, abs=1e-6)


def test_score_errors_missing_extra_wrong_size(answers, workdir, capsys):
    folder, highs = answers
    cases = {
        "missing": ({0: highs[0], 1: highs[1]}, "1 answer(s) missing: test_2_answer.tif"),
        "extra": ({**highs, 7: highs[0]}, "no high-res image"),
        "size": ({**highs, 1: highs[1][:20]}, "test_1_answer.tif: shape (20, 32, 3), but test_1_high.tif is (24, 32, 3)"),
    }
    for name, (images, message) in cases.items():
        for as_zip in (False, True):
            sub = write_submission(workdir / f"{name}{as_zip}", images, as_zip)
            code, _, err = run(capsys, "score", "--submission", sub, "--answers", folder)
            assert code == 1 and message in err and err.count("\n") == 1, (name, as_zip, err)
    code, _, err = run(capsys, "score", "--submission", workdir / "nothing.zip", "--answers", folder)
    assert code == 1 and "submission not found" in err


def test_score_in_parallel_workers_gives_the_same_and_reports_errors(workdir, capsys):
    folder = workdir / "answers8"
    highs = {i: random_image((16, 16, 3), 100 + i) for i in range(8)}  # 8: the parallel path
    for i, high in highs.items():
        io.write_tif(folder / f"test_{i}_high.tif", high)
    preds = {i: noisy(h, i) for i, h in highs.items()}
    sub = write_submission(workdir / "sub8", preds, as_zip=True)
    code, out, _ = run(capsys, "score", "--submission", sub, "--answers", folder, "--jobs", "2")
    assert code == 0
    assert f"mean SSIM {np.mean([competition_ssim(preds[i], highs[i]) for i in range(8)]):.5f}" in out
    preds[5] = preds[5][:, :12]
    sub = write_submission(workdir / "bad8", preds, as_zip=False)
    code, _, err = run(capsys, "score", "--submission", sub, "--answers", folder, "--jobs", "2")
    assert code == 1 and "test_5_answer.tif: shape (16, 12, 3)" in err
