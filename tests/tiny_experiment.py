"""Helpers for the stage 03-05 tests: a tiny competition, experiment config and checkpoints.

The competition is a real demo build (scikit-image photographs, 32x32 high-res tiles)
taken through the real stages 00 and 01, so the manifest and folds have their true format.
Checkpoints are randomly initialised small ESPCNs saved in the pipeline's format.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pipeline.core import paths
from pipeline.core.checkpoints import save_checkpoint
from pipeline.core.config import load_config
from pipeline.nets import build_net, net_from_checkpoint
from pipeline.stages import s00_unzip, s01_folds
from pipeline.tools import demo_data

NET_ARGS = {"scale": 4, "channels": [8, 6]}


def write_config(folder: Path, name: str = "tiny", tta: int = 8, n_folds: int = 2) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"data: {{n_folds: {n_folds}}}\n"
                    f"model: {{name: espcn, args: {{channels: [8, 6]}}}}\n"
                    f"infer: {{tta: {tta}, tile: 0, batch: 8, precision: fp32}}\n")
    return path


def build_competition(config: Path, n_train: int = 6, n_test: int = 2) -> dict:
    """Demo zips of 32x32 scenes -> data/interim + manifest -> data/folds.csv; returns the config."""
    demo_data.build_demo(exp=str(config), n_train=n_train, n_test=n_test, tile=32)
    cfg = load_config(config)
    s00_unzip.extract(cfg["data"])
    s01_folds.main(argparse.Namespace(exp=str(config), n_folds=None, seed=None))
    return cfg


def save_tiny_checkpoint(exp: str, seed: int, fold: int, step: int = 10) -> Path:
    """A random ESPCN whose output sits around mid-grey (so nothing clips to 0 everywhere)."""
    torch.manual_seed(1000 + 10 * seed + fold)
    net = build_net("espcn", **NET_ARGS)
    with torch.no_grad():
        net.to_subpixels.bias.add_(0.5)
    path = paths.run_dir(exp, seed, fold) / "best.pt"
    save_checkpoint(path, net_name="espcn", net_args=NET_ARGS, state_dict=net.state_dict(),
                    exp=exp, seed=seed, fold=fold, step=step, val_ssim=0.5 + 0.01 * fold)
    return path


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW [0, 1] (one image) -> uint8 HWC: clamp, scale, round half to even."""
    return (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def dihedral_views(image: np.ndarray):
    """The 8 flips/rotations of an HWC image with their inverses, written out with numpy."""
    for mirror in (False, True):
        for turns in range(4):
            def view(a, mirror=mirror, turns=turns):
                return np.rot90(a[:, ::-1] if mirror else a, turns, axes=(0, 1))

            def undo(a, mirror=mirror, turns=turns):
                a = np.rot90(a, -turns, axes=(0, 1))
                return a[:, ::-1] if mirror else a
            yield view, undo


def expected_float(ckpt_paths, low: np.ndarray) -> np.ndarray:
    """Every net on every view, undone, averaged in float64, clipped, in 0..255 units."""
    total = np.zeros((low.shape[0] * 4, low.shape[1] * 4, 3), np.float64)
    count = 0
    for path in ckpt_paths:
        net = net_from_checkpoint(path)
        for view, undo in dihedral_views(low):
            with torch.no_grad():
                out = net(to_tensor(np.ascontiguousarray(view(low))))[0].permute(1, 2, 0).numpy()
            total += undo(out.astype(np.float64))
            count += 1
    return np.clip(total / count, 0, 1) * 255


def assert_rounds_to(written: np.ndarray, expected: np.ndarray) -> None:
    """`written` is `expected` rounded once: exactly wherever float32 inference can tell
    which way to round (|x - k.5| > 1e-4; its error is ~2e-5 here); at the few values
    sitting on a rounding boundary (a share of ~2e-4 of them), either neighbour."""
    assert written.dtype == np.uint8 and written.shape == expected.shape
    undecidable = np.abs(expected - np.floor(expected) - 0.5) < 1e-4
    assert undecidable.mean() < 2e-3
    np.testing.assert_array_equal(written[~undecidable], np.round(expected[~undecidable]).astype(np.uint8))
    assert set(written[undecidable].astype(int) - np.floor(expected[undecidable]).astype(int)) <= {0, 1}


def wrap_step_gradients(monkeypatch, change) -> None:
    """Every training step of the next runs calls `change(n, loss, terms, params)` after its
    forward and backward (n: the step's number from 1, the gradients in the params' .grad,
    whether the batch ran in shards or not) and takes the (loss, terms) it returns; a second
    call replaces the first."""
    from pipeline import accel
    from pipeline.train import loop

    real = getattr(accel.training_gradients, "unwrapped", accel.training_gradients)
    count = {"n": 0}

    class Changed:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, lr, hr, scaler):
            loss, terms = self.inner(lr, hr, scaler)
            count["n"] += 1
            params = [p for p in self.inner.gradients.model.parameters() if p.requires_grad] \
                if hasattr(self.inner, "gradients") else list(self.inner.model.parameters())
            return change(count["n"], loss, terms, params)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    def wrapped(*args, **kwargs):
        gradients, how = real(*args, **kwargs)
        return Changed(gradients), how
    wrapped.unwrapped = real
    monkeypatch.setattr(loop.accel, "training_gradients", wrapped)
