"""RFDN (Liu et al., "Residual Feature Distillation Network for Lightweight Image
Super-Resolution", ECCVW 2020 / AIM 2020 efficient-SR winner; njulj/RFDN), written to
load the authors' RFDN_AIM.pth strictly.

Four residual feature distillation blocks (nf 50), each distilling half the channels at
three steps, fused by a 1x1 conv and an enhanced spatial attention (ESA). The release
weights expect 0..255 images: the net scales its [0, 1] input and output by `img_range`
so callers never see that range; module names are the authors' (B1..B4, c.0, LR_conv).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.nets import register

_MIN_SIDE = 15  # ESA's stride-2 conv and 7x7 max-pool need 15 pixels per side


def _conv(in_ch: int, out_ch: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, k, padding=(k - 1) // 2)


class ESA(nn.Module):
    """Enhanced spatial attention, the full RFANet form (with conv_max and conv3_)."""

    def __init__(self, n_feats: int):
        super().__init__()
        f = n_feats // 4
        self.conv1 = nn.Conv2d(n_feats, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv_max = nn.Conv2d(f, f, 3, padding=1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)
        self.conv3_ = nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = nn.Conv2d(f, n_feats, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.conv1(x)
        pooled = F.max_pool2d(self.conv2(reduced), kernel_size=7, stride=3)
        coarse = self.conv3_(F.relu(self.conv3(F.relu(self.conv_max(pooled)))))
        coarse = F.interpolate(coarse, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.conv4(coarse + self.conv_f(reduced)))


class RFDB(nn.Module):
    """Three distillation steps (1x1 'd' branch kept, 3x3 'r' branch refined with a
    skip), a last 3x3, concatenation, 1x1 fusion and ESA."""

    def __init__(self, channels: int):
        super().__init__()
        dc = channels // 2
        self.c1_d, self.c1_r = _conv(channels, dc, 1), _conv(channels, channels, 3)
        self.c2_d, self.c2_r = _conv(channels, dc, 1), _conv(channels, channels, 3)
        self.c3_d, self.c3_r = _conv(channels, dc, 1), _conv(channels, channels, 3)
        self.c4 = _conv(channels, dc, 3)
        self.act = nn.LeakyReLU(0.05)
        self.c5 = _conv(dc * 4, channels, 1)
        self.esa = ESA(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distilled = []
        r = x
        for c_d, c_r in ((self.c1_d, self.c1_r), (self.c2_d, self.c2_r), (self.c3_d, self.c3_r)):
            distilled.append(self.act(c_d(r)))
            r = self.act(c_r(r) + r)
        distilled.append(self.act(self.c4(r)))
        return self.esa(self.c5(torch.cat(distilled, dim=1)))


@register("rfdn")
class RFDN(nn.Module):
    def __init__(self, scale: int = 4, in_chans: int = 3, nf: int = 50, num_modules: int = 4,
                 img_range: float = 255.0):
        super().__init__()
        self.scale = int(scale)
        self.img_range = float(img_range)
        self.num_modules = num_modules
        self.fea_conv = _conv(in_chans, nf, 3)
        for i in range(1, num_modules + 1):  # B1..BN: the release file's key names
            setattr(self, f"B{i}", RFDB(nf))
        self.c = nn.Sequential(nn.Conv2d(nf * num_modules, nf, 1), nn.LeakyReLU(0.05))
        self.LR_conv = _conv(nf, nf, 3)
        self.upsampler = nn.Sequential(_conv(nf, in_chans * self.scale ** 2, 3), nn.PixelShuffle(self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < _MIN_SIDE or w < _MIN_SIDE:  # the authors' code fails there; pad, then crop
            x = F.pad(x, (0, max(0, _MIN_SIDE - w), 0, max(0, _MIN_SIDE - h)), mode="replicate")
        shallow = self.fea_conv(x * self.img_range)
        outs, out = [], shallow
        for i in range(1, self.num_modules + 1):
            out = getattr(self, f"B{i}")(out)
            outs.append(out)
        out = self.LR_conv(self.c(torch.cat(outs, dim=1))) + shallow
        return (self.upsampler(out) / self.img_range)[..., : h * self.scale, : w * self.scale]
