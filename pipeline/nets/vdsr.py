"""VDSR (Kim, Lee and Lee, CVPR 2016): 20 3x3 layers learning the residual over the bicubic upscale.

The input is upscaled bicubically (PyTorch's, as the `bicubic` net) to the output size;
a first 3x3 convolution to 64 channels, 18 more 3x3 convolutions of 64 channels, each
followed by ReLU, and a last 3x3 convolution back to RGB give the residual, which is added
to the upscaled input. So the net is the bicubic upscale when its last layer is zero, and
any scale is one net (the paper trains x2, x3 and x4 together). Zero 'same' padding keeps
every map the size of the upscaled input; weights start as in the paper (He's normal
initialisation for the ReLU layers). The output is not clamped (see espcn.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.nets import register


@register("vdsr")
class VDSR(nn.Module):
    def __init__(self, scale: int = 4, in_chans: int = 3, depth: int = 20, channels: int = 64):
        super().__init__()
        if depth < 2:
            raise ValueError(f"VDSR needs a depth of at least 2 layers, got {depth}")
        self.scale = int(scale)
        layers = [nn.Conv2d(in_chans, channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(channels, in_chans, 3, padding=1))
        self.body = nn.Sequential(*layers)
        for m in self.body:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return up + self.body(up)
