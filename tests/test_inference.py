"""predict_scene: one rounding after the float mean of every net x view; devices; precision."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.errors import PipelineError
from pipeline.infer.ensemble import autocast, pick_device, predict_scene, tensor_to_image
from pipeline.nets import build_net


class Constant(nn.Module):
    """Upsamples by nearest neighbour and adds a fixed offset (in grey levels)."""

    def __init__(self, offset: float, scale: int = 2):
        super().__init__()
        self.offset, self.scale = offset / 255, scale
        self.weight = nn.Parameter(torch.ones(1))  # so .to(device) has something to move

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale, mode="nearest") * self.weight + self.offset


def test_ensemble_is_averaged_in_float_before_one_rounding():
    lr = np.full((4, 5, 3), 100, np.uint8)
    # 100.4 and 101.4 grey: the float mean 100.9 rounds to 101; rounding each first would
    # give (100 + 101) / 2 = 100.5, i.e. 100 after round-half-to-even
    out = predict_scene([Constant(0.4), Constant(1.4)], lr)
    assert out.dtype == np.uint8 and out.shape == (8, 10, 3)
    assert (out == 101).all()


def test_rounding_is_half_to_even_and_clipped():
    t = torch.tensor([[[[-0.2, 0.5 / 255, 1.5 / 255, 2.5 / 255, 1.3]]]]).expand(1, 3, 1, 5)
    assert tensor_to_image(t)[0, :, 0].tolist() == [0, 0, 2, 2, 255]


def test_tta_and_tiles_on_bicubic_equal_plain():
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    net = build_net("bicubic", scale=4)
    plain = predict_scene([net], lr)
    assert plain.shape == (92, 124, 3)
    assert np.abs(predict_scene([net], lr, tta=8).astype(int) - plain).max() <= 1


def test_bf16_autocast_runs_on_cpu_and_stays_close(torch_one_thread):
    torch.manual_seed(0)
    net = build_net("espcn", scale=4)
    lr = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    fp32 = predict_scene([net], lr, device="cpu")
    bf16 = predict_scene([net], lr, device="cpu", precision="bf16")
    assert np.abs(fp32.astype(int) - bf16).mean() < 2.0
    with pytest.raises(PipelineError, match="precision"):
        predict_scene([net], lr, precision="fp8")
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")


def test_device_choice_and_mixed_scales_refused():
    assert pick_device("cpu").type == "cpu"
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    lr = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(PipelineError, match="share one integer `scale`"):
        predict_scene([Constant(0, scale=2), Constant(0, scale=4)], lr)
