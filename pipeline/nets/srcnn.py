"""SRCNN (Dong et al., ECCV 2014 / TPAMI 2016): the 9-1-5 net on a bicubic-upsampled input.

Patch extraction 9x9 to 64, non-linear mapping 1x1 to 32, reconstruction 5x5 back to
RGB, ReLU between. Zero 'same' padding keeps the output the size of the upsampled input
(the paper's valid convolutions shrink it by 12 pixels, which tiled inference cannot use).
The output is not clamped (see espcn.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.nets import register


@register("srcnn")
class SRCNN(nn.Module):
    def __init__(self, scale: int = 4, in_chans: int = 3, channels: tuple[int, int] = (64, 32),
                 kernels: tuple[int, int, int] = (9, 1, 5)):
        super().__init__()
        self.scale = int(scale)
        c1, c2 = channels
        k1, k2, k3 = kernels
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, c1, k1, padding=k1 // 2), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, k2, padding=k2 // 2), nn.ReLU(inplace=True),
            nn.Conv2d(c2, in_chans, k3, padding=k3 // 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return self.body(up)
