"""benchmark-sr reproduces published figures (RLFN x4) under the paper protocol."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import y_psnr, y_ssim
from pipeline.infer.ensemble import predict_scene
from pipeline.nets import build_net
from pipeline.tools.benchmark_sr import build_benchmark_net, evaluate_set, read_benchmark_image

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# RLFN paper, Table 2 (x4): Y-PSNR / Y-SSIM
RLFN_PUBLISHED = {"Set5": (32.24, 0.8952), "Set14": (28.62, 0.7813)}


@pytest.fixture
def tiny_root(tmp_path):
    """A set in the standard layout: an RGB pair, and a greyscale pair whose HR side is
    not a multiple of the scale (it must be mod-cropped)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "bench"
    (root / "Tiny" / "HR").mkdir(parents=True)
    (root / "Tiny" / "LR_bicubic" / "X4").mkdir(parents=True)
    smooth = lambda h, w, c: np.kron(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, c)), np.ones((4, 4, 1)))[:h, :w]  # noqa: E731
    rgb = smooth(48, 40, 3).astype(np.uint8)
    grey = smooth(35, 34, 1)[..., 0].astype(np.uint8)
    for name, hr in (("colour", rgb), ("grey", grey)):
        Image.fromarray(hr).save(root / "Tiny" / "HR" / f"{name}.png")
        h, w = hr.shape[0] // 4, hr.shape[1] // 4
        Image.fromarray(hr).resize((w, h), Image.BICUBIC).save(root / "Tiny" / "LR_bicubic" / "X4" / f"{name}x4.png")
    return root


def test_evaluate_set_follows_the_protocol(tiny_root):
    net = build_net("bicubic", scale=4)
    table = evaluate_set(net, tiny_root, "Tiny", 4)
    assert list(table["image"]) == ["colour", "grey"]
    grey_hr = read_benchmark_image(tiny_root / "Tiny" / "HR" / "grey.png")
    assert grey_hr.shape == (35, 34, 3) and (grey_hr[..., 0] == grey_hr[..., 2]).all()
    sr = predict_scene([net], read_benchmark_image(tiny_root / "Tiny" / "LR_bicubic" / "X4" / "greyx4.png"))
    hr = grey_hr[:32, :32]  # mod-crop to a multiple of 4
    row = table.iloc[1]
    assert row["y_psnr"] == pytest.approx(y_psnr(sr, hr, 4), abs=1e-9)
    assert row["y_ssim"] == pytest.approx(y_ssim(sr, hr, 4), abs=1e-9)
    assert 10 < row["y_psnr"] < 40 and 0 < row["y_ssim"] < 1


def test_errors_name_the_problem(tiny_root):
    (tiny_root / "Tiny" / "LR_bicubic" / "X4" / "greyx4.png").unlink()
    with pytest.raises(PipelineError, match="greyx4.png: LR partner of grey.png missing"):
        evaluate_set(build_net("bicubic"), tiny_root, "Tiny", 4)
    with pytest.raises(PipelineError, match="Set99/HR: no such folder"):
        evaluate_set(build_net("bicubic"), tiny_root, "Set99", 4)
    with pytest.raises(PipelineError, match="has parameters; give its --weights"):
        build_benchmark_net("rlfn", None, 4)


def test_cli_writes_table_and_csvs(tiny_root, cli, workdir):
    out = workdir / "bench" / "tiny.csv"
    proc = cli("benchmark-sr", "--model", "bicubic", "--root", tiny_root, "--sets", "Tiny", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "| Tiny | 2 |" in proc.stdout
    summary = pd.read_csv(out)
    per_image = pd.read_csv(out.with_name("tiny_images.csv"))
    assert list(summary.columns) == ["model", "weights", "scale", "tta", "set", "images", "y_psnr", "y_ssim"]
    assert summary.loc[0, "y_psnr"] == pytest.approx(per_image["y_psnr"].mean(), abs=1e-5)


def test_a_pipeline_checkpoint_rebuilds_its_own_net(tiny_root, workdir):
    from pipeline.core.checkpoints import save_checkpoint

    trained = build_net("espcn", scale=4, activation="relu")
    path = workdir / "models" / "x" / "best.pt"
    save_checkpoint(path, net_name="espcn", net_args={"scale": 4, "activation": "relu"},
                    state_dict=trained.state_dict(), exp="x", seed=0, fold=0, step=1, val_ssim=None)
    net, name, label = build_benchmark_net(None, str(path), 4)
    assert name == "espcn" and label == str(path) and not net.training
    assert isinstance(net.features[1], torch.nn.ReLU)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), trained.state_dict().values()))
    assert len(evaluate_set(net, tiny_root, "Tiny", 4)) == 2


def _rlfn_on(set_name: str) -> pd.DataFrame:
    net, _, _ = build_benchmark_net(None, str(paths.SHARED_WEIGHTS / "rlfn_x4.pth"), 4)
    return evaluate_set(net, paths.SHARED_DATA / "sr_benchmarks", set_name, 4)


def _check_published(table: pd.DataFrame, set_name: str) -> None:
    psnr, ssim = RLFN_PUBLISHED[set_name]
    assert table["y_psnr"].mean() == pytest.approx(psnr, abs=0.01)
    assert table["y_ssim"].mean() == pytest.approx(ssim, abs=0.0005)


@pytest.mark.shared
def test_rlfn_set5_matches_the_paper(shared, cli, workdir):
    out = workdir / "rlfn.csv"
    proc = cli("benchmark-sr", "--weights", paths.SHARED_WEIGHTS / "rlfn_x4.pth", "--sets", "Set5", "--out", out,
               env={"OMP_NUM_THREADS": "1"})  # as torch_one_thread, for the child process
    assert proc.returncode == 0, proc.stderr
    summary = pd.read_csv(out)
    assert summary.loc[0, ["model", "weights", "set", "images"]].tolist() == ["rlfn", "rlfn_x4.pth", "Set5", 5]
    _check_published(pd.read_csv(out.with_name("rlfn_images.csv")), "Set5")


@pytest.mark.shared
@pytest.mark.slow
def test_rlfn_set14_matches_the_paper(shared):
    _check_published(_rlfn_on("Set14"), "Set14")


@pytest.mark.shared
@pytest.mark.parametrize("weights,psnr", [("RFDN_AIM.pth", 32.16), ("team15_SAFMN.pth", 32.16)])
def test_other_release_nets_match_their_measured_set5(shared, weights, psnr, torch_one_thread):
    """RFDN (half of the default submission) and SAFMN: the Set5 figures measured with the
    authors' code (../shared/README.md), as RLFN's is held to its paper's."""
    net, _, _ = build_benchmark_net(None, str(paths.SHARED_WEIGHTS / weights), 4)
    table = evaluate_set(net, paths.SHARED_DATA / "sr_benchmarks", "Set5", 4)
    assert table["y_psnr"].mean() == pytest.approx(psnr, abs=0.01)
