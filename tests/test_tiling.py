"""Tiled inference: blend weights sum to one, no seams, tiled == whole for local nets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import missing
from PIL import Image

from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_image
from pipeline.core.metrics import competition_ssim
from pipeline.infer.ensemble import image_to_tensor, tensor_to_image
from pipeline.infer.tiling import tile_starts, tiled_forward
from pipeline.nets import build_net


def local_net(scale: int = 4) -> nn.Module:
    """Three 3x3 convs + pixel shuffle: receptive field radius 3 LR px, below the margin
    (overlap/4 = 4 px for overlap 16), so tiling must reproduce it exactly."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(16, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
    net.scale = scale
    return net.eval()


def test_tile_starts_cover_the_image_with_the_overlap():
    assert tile_starts(100, 40, 10) == [0, 30, 60]
    assert tile_starts(95, 40, 10) == [0, 30, 55]  # last tile flush with the end
    assert tile_starts(40, 40, 10) == [0]
    assert tile_starts(25, 40, 10) == [0]          # smaller than a tile: one tile
    for length in range(33, 300, 7):
        starts = tile_starts(length, 32, 8)
        assert starts[0] == 0 and starts[-1] + 32 == length
        assert all(b - a <= 24 for a, b in zip(starts, starts[1:]))  # overlap >= 8 everywhere


def test_blend_weights_sum_to_one():
    x = torch.rand(1, 3, 70, 45)
    ones = tiled_forward(lambda t: torch.ones(t.shape[0], 3, t.shape[2] * 2, t.shape[3] * 2),
                         x, scale=2, tile=24, overlap=8, batch=5)
    assert torch.allclose(ones, torch.ones_like(ones), atol=1e-6)


@pytest.mark.parametrize("shape, tile, overlap, batch", [
    ((1, 3, 64, 64), 32, 16, 8),
    ((1, 3, 37, 53), 24, 12, 1),    # odd sizes, one tile per pass
    ((2, 3, 20, 100), 32, 16, 3),   # two images; height smaller than the tile
    ((1, 3, 30, 30), 64, 16, 8),    # image smaller than one tile
])
def test_tiled_equals_whole_for_a_net_with_a_small_receptive_field(shape, tile, overlap, batch):
    net = local_net()
    x = torch.rand(shape)
    with torch.no_grad():
        whole = net(x)
        tiled = tiled_forward(net, x, 4, tile, overlap, batch)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max() < 1e-5


def test_bad_tiling_settings_are_refused():
    net = local_net()
    with pytest.raises(PipelineError, match="at most half the tile"):
        tiled_forward(net, torch.rand(1, 3, 40, 40), 4, tile=20, overlap=12)
    with pytest.raises(PipelineError, match=r"gave \(80, 80\), expected 40x40"):
        tiled_forward(net, torch.rand(1, 3, 40, 40), 2, tile=20, overlap=4)  # net is x4, said x2


@pytest.fixture(scope="module")
def aerial_lr_hr():
    """HR: 2x2 mosaics of real 256 px aerial tiles (512x512); LR: antialiased bicubic / 4."""
    root = paths.SHARED_DATA / "ucmerced_urban"
    if not root.is_dir():
        missing(f"{root} absent")
    pairs = []
    for cls in ("denseresidential", "buildings", "parkinglot"):
        t = [read_image(root / cls / f"{cls}{i:02d}.tif")[:256, :256] for i in (10, 11, 12, 13)]
        hr = np.concatenate([np.concatenate(t[:2], 1), np.concatenate(t[2:], 1)], 0)
        lr = np.array(Image.fromarray(hr).resize((128, 128), Image.BICUBIC))
        pairs.append((lr, hr))
    return pairs


def test_tiled_real_net_on_real_tiles_no_seams(aerial_lr_hr, torch_one_thread):
    """ESPCN (the competition baseline; receptive field radius 4 = the margin at overlap 16):
    tiled and whole outputs agree within 2/255 and their competition SSIM within 1e-4."""
    torch.manual_seed(0)
    net = build_net("espcn", scale=4).eval()
    for lr, hr in aerial_lr_hr:
        x = image_to_tensor(lr)
        with torch.no_grad():
            whole = tensor_to_image(net(x))
            tiled = tensor_to_image(tiled_forward(net, x, 4, tile=48, overlap=16, batch=4))
        assert np.abs(whole.astype(int) - tiled).max() <= 2
        assert abs(competition_ssim(tiled, hr) - competition_ssim(whole, hr)) <= 1e-4


def test_tiled_rlfn_on_real_tiles(aerial_lr_hr, shared, torch_one_thread):
    """RLFN cannot be tiled exactly: its ESA attention max-pools the whole input and resizes
    back to the input's size, so any crop changes its output far inside (measured: a 48 px
    crop of a 64 px LR image moves interior pixels by up to 8/255; tiles of a 300x375 scene
    score within 2e-4 of the whole). Tiling must still leave no seam: along every tile edge
    the difference from the whole is no larger than inside the tiles (a 2-pixel band 30 levels
    off, added by hand, is caught), a small mean difference, and the score within 1e-3."""
    if not (shared / "weights" / "rlfn_x4.pth").is_file():
        missing("rlfn_x4.pth absent")
    from pipeline.core.weights import load_weights
    net = load_weights(build_net("rlfn"), shared / "weights" / "rlfn_x4.pth").eval()
    for lr, hr in aerial_lr_hr[:2]:
        x = image_to_tensor(lr)
        with torch.no_grad():
            whole = tensor_to_image(net(x))
            tiled = tensor_to_image(tiled_forward(net, x, 4, tile=64, overlap=16, batch=4))
        diff = np.abs(whole.astype(int) - tiled)
        assert diff.mean() < 1.0
        assert abs(competition_ssim(tiled, hr) - competition_ssim(whole, hr)) <= 1e-3
        edges = [4 * e for s in tile_starts(lr.shape[0], 64, 16) for e in (s, s + 64) if 0 < e < lr.shape[0]]
        assert edges and not seam_excess(whole, tiled, edges)
        banded = tiled.astype(int)
        banded[:, edges[0]:edges[0] + 2] += 30                  # a 2-pixel seam, 30 levels off
        assert seam_excess(whole, np.clip(banded, 0, 255), edges)


def seam_excess(whole: np.ndarray, tiled: np.ndarray, edges: list[int], band: int = 4, away: int = 12) -> bool:
    """Whether, along any tile edge, the mean |tiled - whole| of the columns (or rows) within
    `band` pixels of it exceeds twice that of the columns `away` to `away` + 8 pixels on either
    side of it, + 1 level: a seam stands out of its neighbourhood."""
    diff = np.abs(whole.astype(int) - tiled.astype(int)).mean(axis=2)
    for profile in (diff.mean(axis=0), diff.mean(axis=1)):          # per column, per row
        for e in edges:
            near = profile[max(e - band, 0):e + band]
            beside = np.concatenate([profile[max(e - away - 8, 0):max(e - away, 0)], profile[e + away:e + away + 8]])
            if near.max() > 2 * beside.mean() + 1.0:
                return True
    return False
