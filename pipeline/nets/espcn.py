"""ESPCN (Shi et al., CVPR 2016), the competition's public baseline.

Three convolutions on the low-resolution image (5x5 to 64, 3x3 to 32, 3x3 to 3*s*s)
and a pixel shuffle. The paper uses tanh after the first two layers (the default here);
`activation="relu"` gives the variant many re-implementations use. The output is not
clamped so training keeps its gradients; inference clamps when it converts to uint8.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.core.errors import PipelineError
from pipeline.nets import register

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


@register("espcn")
class ESPCN(nn.Module):
    def __init__(self, scale: int = 4, in_chans: int = 3, channels: tuple[int, int] = (64, 32),
                 activation: str = "tanh"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise PipelineError(f"espcn: activation '{activation}' unknown (tanh or relu)")
        self.scale = int(scale)
        c1, c2 = channels
        act = _ACTIVATIONS[activation]
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 5, padding=2), act(),
            nn.Conv2d(c1, c2, 3, padding=1), act(),
        )
        self.to_subpixels = nn.Conv2d(c2, in_chans * self.scale ** 2, 3, padding=1)
        self.shuffle = nn.PixelShuffle(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.to_subpixels(self.features(x)))
