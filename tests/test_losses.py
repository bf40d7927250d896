"""Losses: composition by config weights, and each term's behaviour on real numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.config import DEFAULTS
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import competition_ssim
from pipeline.train.losses import CHARBONNIER_EPS, build_loss


def smooth_images(seed: int = 0, n: int = 2, size: int = 32) -> torch.Tensor:
    """Images with structure (blurred noise), in [0, 1], on the uint8 grid."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round() / 255


def test_default_config_builds_and_zero_weights_are_skipped():
    loss = build_loss(DEFAULTS["loss"])
    assert list(loss.terms) == ["ssim"]
    loss = build_loss({"ssim": 1.0, "l1": 0, "charbonnier": 0.5, "sobel": 0.1})
    assert list(loss.terms) == ["ssim", "charbonnier", "sobel"]


@pytest.mark.parametrize("weights, message", [
    ({"ssim": 1.0, "perceptual": 1.0}, "unknown term.*perceptual"),
    ({"ssim": -1.0}, "must be a number >= 0"),
    ({"ssim": "1"}, "must be a number >= 0"),
    ({"ssim": 0, "l1": 0}, "every term has weight 0"),
    ([("ssim", 1.0)], "mapping"),
])
def test_bad_loss_sections_are_refused(weights, message):
    with pytest.raises(PipelineError, match=message):
        build_loss(weights)


def test_weighted_sum_of_terms():
    hr = smooth_images(0)
    sr = (hr + 0.05 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    weights = {"ssim": 1.0, "l1": 2.0, "charbonnier": 0.5, "sobel": 0.25}
    loss = build_loss(weights)
    total = loss(sr, hr)
    parts = {name: build_loss({name: 1.0})(sr, hr).item() for name in weights}
    assert total.item() == pytest.approx(sum(weights[n] * parts[n] for n in weights), rel=1e-6)
    assert loss.last_terms == pytest.approx(parts, rel=1e-6)
    assert all(v > 0 for v in parts.values())


def test_ssim_term_is_one_minus_the_competition_score():
    hr = smooth_images(0, n=1, size=48)
    sr = smooth_images(5, n=1, size=48) * 0.3 + hr * 0.7
    sr = (sr * 255).round() / 255
    to_uint8 = lambda t: (t[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    expected = 1 - competition_ssim(to_uint8(sr), to_uint8(hr))
    assert build_loss({"ssim": 1})(sr, hr).item() == pytest.approx(expected, abs=1e-5)


def test_identical_images_give_the_floor_of_each_term():
    hr = smooth_images(0)
    for name, floor in [("ssim", 0.0), ("l1", 0.0), ("charbonnier", CHARBONNIER_EPS), ("sobel", 0.0)]:
        assert build_loss({name: 1})(hr, hr).item() == pytest.approx(floor, abs=1e-6), name


def test_charbonnier_is_l1_for_large_errors():
    hr = smooth_images(0)
    sr = (hr + 0.2).clamp(max=1.2)  # every pixel off by 0.2 >> eps
    assert build_loss({"charbonnier": 1})(sr, hr).item() == pytest.approx(0.2, rel=1e-4)


def test_sobel_term_sees_edges_not_brightness():
    hr = smooth_images(0)
    brighter = hr + 0.1
    assert build_loss({"sobel": 1})(brighter, hr).item() == pytest.approx(0.0, abs=1e-6)
    assert build_loss({"l1": 1})(brighter, hr).item() == pytest.approx(0.1, rel=1e-4)
    shifted = torch.roll(hr, shifts=1, dims=-1)  # edges moved by one pixel
    assert build_loss({"sobel": 1})(shifted, hr).item() > 1e-3


def test_gradients_flow_and_bf16_autocast_computes_in_float32():
    hr = smooth_images(0)
    sr = (hr * 0.8 + 0.1).requires_grad_()
    loss = build_loss({"ssim": 1, "l1": 1, "charbonnier": 1, "sobel": 1})
    plain = loss(sr, hr)
    plain.backward()
    assert torch.isfinite(sr.grad).all() and sr.grad.abs().sum() > 0
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        auto = loss(sr, hr)
    assert auto.dtype == torch.float32
    assert auto.item() == pytest.approx(plain.item(), rel=1e-6)
    with pytest.raises(PipelineError, match="shape"):
        loss(sr, hr[..., :-1])
