"""The metrics equal their references: skimage for the competition SSIM, BasicSR's protocol
for the paper metrics."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from conftest import missing
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_image
from pipeline.core.metrics import competition_ssim, rgb_to_y, ssim_torch, y_psnr, y_ssim


def degrade(high: np.ndarray, kind: int, rng: np.random.Generator) -> np.ndarray:
    """Realistic answers of varied quality: noise, a bicubic 4x round trip, posterised."""
    if kind == 0:
        return np.clip(high.astype(int) + rng.integers(-20, 21, high.shape), 0, 255).astype(np.uint8)
    if kind == 1:
        h, w = high.shape[:2]
        low = cv2.resize(high, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
        return cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    return (high // 16 * 16).astype(np.uint8)


@pytest.fixture(scope="module")
def tile_pairs():
    """(answer, high) pairs from real aerial tiles of several classes, 256x256."""
    root = paths.SHARED_DATA / "ucmerced_urban"
    if not root.is_dir():
        missing(f"{root} absent")
    files = sorted(root.glob("*/*.tif"))[::45][:9]
    rng = np.random.default_rng(0)
    highs = [read_image(f)[:248, :248] for f in files]  # 248: a few tiles are 247..256
    return [(degrade(h, i % 3, rng), h) for i, h in enumerate(highs)]


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def test_competition_ssim_is_skimage_as_called_by_the_scorer(tile_pairs):
    for answer, high in tile_pairs:
        expected = structural_similarity(high, answer, channel_axis=-1)
        assert competition_ssim(answer, high) == expected
    a, h = tile_pairs[0]
    assert competition_ssim(h, h) == 1.0
    assert 0.3 < competition_ssim(a, h) < 0.99


def test_competition_ssim_refuses_bad_input():
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(PipelineError, match="shape"):
        competition_ssim(a, np.zeros((16, 20, 3), np.uint8))
    with pytest.raises(PipelineError, match="uint8"):
        competition_ssim(a.astype(np.float32), a)


def test_ssim_torch_equals_competition_ssim_on_real_tiles(tile_pairs, shared):
    answers, highs = zip(*tile_pairs)
    expected = np.array([competition_ssim(a, h) for a, h in tile_pairs])
    got32 = ssim_torch(to_batch(list(answers)), to_batch(list(highs))).numpy()
    got64 = ssim_torch(to_batch(list(answers)).double(), to_batch(list(highs)).double()).numpy()
    assert got32.shape == (len(tile_pairs),)
    assert np.abs(got32 - expected).max() < 1e-5
    assert np.abs(got64 - expected).max() < 1e-7
    assert expected.std() > 0.05  # the pairs span a real range of qualities


def test_ssim_torch_non_square_and_symmetric(tile_pairs):
    a, h = tile_pairs[1]
    a, h = a[:100, :173], h[:100, :173]
    got = ssim_torch(to_batch([a]), to_batch([h])).item()
    assert got == pytest.approx(competition_ssim(a, h), abs=1e-5)
    assert ssim_torch(to_batch([h]), to_batch([a])).item() == pytest.approx(got, abs=1e-6)


def test_ssim_torch_is_differentiable_and_optimisable(tile_pairs):
    _, high = tile_pairs[2]
    target = to_batch([high[:64, :64]])
    x = torch.full_like(target, 0.5, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05)
    start = 1 - ssim_torch(x, target).item()
    for _ in range(30):
        loss = 1 - ssim_torch(x, target).mean()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        opt.step()
    assert loss.item() < start - 0.3


def test_ssim_loss_gradient_written_out_equals_autograd(tile_pairs):
    """With a fixed target (the loss), ssim_torch's backward is written out by hand; with a
    target that needs a gradient too, it is autograd through the same forward: the two
    gradients of x agree, and the written-out one is the one that ran."""
    answer, high = tile_pairs[0]
    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-13)):
        x0, y0 = to_batch([answer[:40, :53], high[40:80, :53]]).to(dtype), to_batch([high[:40, :53], answer[:40, :53]]).to(dtype)
        weights = torch.tensor([0.3, -1.7], dtype=dtype)     # per-image upstream gradient
        grads = []
        for target_needs_grad in (False, True):
            x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_(target_needs_grad)
            ssim = ssim_torch(x, y)
            assert (type(ssim.grad_fn).__name__ == "_SSIMAgainstTargetBackward") != target_needs_grad
            (ssim * weights).sum().backward()
            grads.append(x.grad)
        assert grads[0].abs().max() > 1e-4
        assert (grads[0] - grads[1]).abs().max() < tol * grads[0].abs().max()
        assert torch.equal(ssim_torch(x0, y0), ssim.detach())
    x = (x0[:1, :, :12, :15]).clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ssim_torch(a, y0[:1, :, :12, :15]), (x,))


def test_ssim_torch_refuses_small_or_mismatched():
    with pytest.raises(PipelineError, match="window"):
        ssim_torch(torch.zeros(1, 3, 6, 20), torch.zeros(1, 3, 6, 20))
    with pytest.raises(PipelineError, match="equal shape"):
        ssim_torch(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_rgb_to_y_is_matlab_bt601():
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [10, 200, 30]]], np.uint8)
    y = rgb_to_y(rgb)[0]
    assert y[0] == pytest.approx(16.0, abs=1e-4)
    assert y[1] == pytest.approx(235.0, abs=1e-4)
    assert y[2] == pytest.approx(16 + 65.481, abs=1e-4)
    assert y[3] == pytest.approx(16 + (65.481 * 10 + 128.553 * 200 + 24.966 * 30) / 255, abs=1e-4)


def test_paper_metrics_match_independent_references(tile_pairs):
    for answer, high in tile_pairs[:4]:
        b = 4
        ya, yh = rgb_to_y(answer[b:-b, b:-b]), rgb_to_y(high[b:-b, b:-b])
        assert y_psnr(answer, high, b) == pytest.approx(peak_signal_noise_ratio(yh, ya, data_range=255), abs=1e-9)
        # skimage with Wang et al.'s settings is the same 11x11 Gaussian, valid-window SSIM
        ref = structural_similarity(yh, ya, data_range=255, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert y_ssim(answer, high, b) == pytest.approx(ref, abs=1e-6)
    a, h = tile_pairs[0]
    assert y_psnr(h, h, 4) == float("inf")
    assert y_ssim(h, h, 4) == pytest.approx(1.0, abs=1e-12)
    # the border really is cropped: damage confined to it changes nothing
    damaged = h.copy()
    damaged[:4] = 0
    assert y_psnr(damaged, h, 4) == float("inf")
    assert y_psnr(damaged, h, 3) < 40
