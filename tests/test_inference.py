"""predict_scene: one rounding after the float mean of every net x view; devices; precision."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.device import pick_device
from pipeline.core.errors import PipelineError
from pipeline.infer.ensemble import autocast, predict_scene, tensor_to_image
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


def test_tta_and_tiles_change_nothing_for_a_symmetric_local_net_and_do_for_others():
    """Bicubic is mirror- and rotation-symmetric, so its 8 views agree, and tiles with an
    overlap wider than its 2-pixel reach blend seamlessly: with TTA, tiles or both its answer
    is the plain one up to a rounding step. A net that is neither (random ESPCN) changes under
    each: the settings reach the computation."""
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    bicubic, espcn = build_net("bicubic", scale=4), build_net("espcn", scale=4)
    plain, plain_espcn = predict_scene([bicubic], lr), predict_scene([espcn], lr)
    assert plain.shape == (92, 124, 3)
    for settings in ({"tta": 8}, {"tile": 12, "overlap": 4}, {"tta": 8, "tile": 12, "overlap": 4}):
        assert np.abs(predict_scene([bicubic], lr, **settings).astype(int) - plain).max() <= 1, settings
        assert not np.array_equal(predict_scene([espcn], lr, **settings), plain_espcn), settings


def test_bf16_autocast_runs_on_cpu_and_stays_close(torch_one_thread):
    torch.manual_seed(0)
    net = build_net("espcn", scale=4)
    lr = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    fp32 = predict_scene([net], lr, device="cpu")
    bf16 = predict_scene([net], lr, device="cpu", precision="bf16")
    assert np.abs(fp32.astype(int) - bf16).mean() < 2.0
    assert not np.array_equal(fp32, bf16)              # bf16 reached the computation
    with pytest.raises(PipelineError, match="precision"):
        predict_scene([net], lr, precision="fp8")
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")


def test_device_choice_and_mixed_scales_refused():
    assert pick_device("cpu").type == "cpu"
    lr = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(PipelineError, match="share one integer `scale`"):
        predict_scene([Constant(0, scale=2), Constant(0, scale=4)], lr)


@pytest.mark.parametrize("available", [True, False])
def test_pick_device_follows_what_torch_can_use(monkeypatch, available):
    """auto: a GPU when torch can use one, else the CPU (no GPU listed by nvidia-smi here)."""
    from pipeline.core import device

    monkeypatch.setattr(device, "listed_gpus", lambda: ())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert pick_device().type == pick_device("auto").type == ("cuda" if available else "cpu")
    assert pick_device("cpu").type == "cpu"
