"""Bicubic upsampling as a net with no parameters: the floor every model must beat."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.nets import register


@register("bicubic")
class Bicubic(nn.Module):
    """PyTorch bicubic interpolation (a=-0.75, half-pixel centres), clamped to [0, 1].

    The clamp keeps the contract's output range: cubic kernels overshoot at edges.
    """

    def __init__(self, scale: int = 4):
        super().__init__()
        self.scale = int(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return up.clamp(0.0, 1.0)
