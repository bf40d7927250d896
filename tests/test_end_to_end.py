"""One real run of every stage through the CLI, as a user runs them, on a tiny competition."""
from __future__ import annotations

import json
import zipfile
from io import BytesIO

import numpy as np
import tifffile

from pipeline.core import io
from pipeline.core.metrics import competition_ssim


def test_end_to_end_every_stage_through_the_cli(workdir, cli):
    """demo-data -> unzip -> folds -> train (2 folds, a few steps) -> oof -> ensemble ->
    submission -> score, each as a user runs it; the score is the zip's recomputed SSIM."""
    config = workdir / "e2e.yaml"
    config.write_text("data: {n_folds: 2}\n"
                      "model: {name: espcn, args: {channels: [16, 8]}}\n"
                      "train: {steps: 4, batch_size: 4, lr_patch: 8, val_every: 2, ckpt_every: 2,\n"
                      "        optimizer: adam, lr: 1.0e-3, precision: fp32}\n"
                      "infer: {tta: 8, tile: 0}\n")
    env = {"SR_WORKDIR": str(workdir), "OMP_NUM_THREADS": "1"}  # one thread: cores are shared

    def run(*args):
        proc = cli(*args, env=env)
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
        return proc.stdout.strip().splitlines()

    run("demo-data", "--exp", config, "--n-train", 4, "--n-test", 2, "--tile", 32)
    run("unzip", "--exp", config)
    run("folds", "--exp", config)
    for fold in (0, 1):
        run("train", "--exp", config, "--fold", fold, "--seed", 0)
    assert len(list((workdir / "models/e2e").glob("seed0/fold*/best.pt"))) == 2
    oof_line = run("oof", "--exp", config)[-1]
    summary = json.loads((workdir / "models/e2e/oof/summary.json").read_text())
    assert oof_line.startswith(f"oof e2e: CV {summary['cv']['mean']:.4f}") and summary["n_scenes"] == 4
    run("ensemble", "--exp", config)
    zip_path = run("submission", "--exp", config)[-1]
    assert zip_path == str(workdir / "submissions" / (workdir / "submissions/e2e-latest.txt").read_text().strip())
    score_line = run("score", "--submission", zip_path, "--answers", workdir / "data/demo/answers")[-1]
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == ["test_0_answer.tif", "test_1_answer.tif"]
        expected = np.mean([competition_ssim(tifffile.imread(BytesIO(zf.read(f"test_{i}_answer.tif"))),
                                             io.read_image(workdir / f"data/demo/answers/test_{i}_high.tif"))
                            for i in (0, 1)])
    assert score_line.startswith(f"mean SSIM {expected:.5f} over 2 images")
