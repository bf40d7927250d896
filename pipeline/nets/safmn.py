"""SAFMN (Sun et al., "Spatially-Adaptive Feature Modulation for Efficient Image
Super-Resolution", ICCV 2023), the NTIRE 2023 efficient-SR entry (team 15,
sunny2109/SAFMN NTIRE2023_ESR), written to load team15_SAFMN.pth strictly.

dim 36, 8 blocks: each modulates features by a multi-scale depthwise map (SAFM) and
mixes channels with a conv (CCM); a GRN normalises the shallow features, and the output
is added to a bilinear upsampling of the input. Trained on [0, 1]: no range wrapping.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.nets import register

_N_LEVELS = 4
_MIN_SIDE = 2 ** _N_LEVELS  # the coarsest SAFM level pools to side // 16


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt V2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(2, 3), keepdim=True)
        nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class SAFM(nn.Module):
    """Channel chunks seen at full, 1/4, 1/8, 1/16 size by depthwise 3x3 convs, then a
    1x1 aggregation whose GELU modulates the input."""

    def __init__(self, dim: int):
        super().__init__()
        chunk = dim // _N_LEVELS
        self.mfr = nn.ModuleList([nn.Conv2d(chunk, chunk, 3, 1, 1, groups=chunk, bias=False)
                                  for _ in range(_N_LEVELS)])
        self.aggr = nn.Conv2d(dim, dim, 1, 1, 0, bias=False)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = []
        for i, chunk in enumerate(x.chunk(_N_LEVELS, dim=1)):
            if i == 0:
                out.append(self.mfr[0](chunk))
            else:
                pooled = F.adaptive_max_pool2d(chunk, (h // 2 ** (i + 1), w // 2 ** (i + 1)))
                out.append(F.interpolate(self.mfr[i](pooled), size=(h, w), mode="nearest"))
        return self.act(self.aggr(torch.cat(out, dim=1))) * x


class CCM(nn.Module):
    def __init__(self, dim: int, growth: float):
        super().__init__()
        hidden = int(dim * growth)
        self.ccm = nn.Sequential(nn.Conv2d(dim, hidden, 3, 1, 1, bias=False), nn.GELU(),
                                 nn.Conv2d(hidden, dim, 1, 1, 0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ccm(x)


class AttBlock(nn.Module):
    def __init__(self, dim: int, ffn_scale: float):
        super().__init__()
        self.safm = SAFM(dim)
        self.ccm = CCM(dim, ffn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.safm(x) + x
        return self.ccm(x) + x


@register("safmn")
class SAFMN(nn.Module):
    def __init__(self, scale: int = 4, dim: int = 36, n_blocks: int = 8, ffn_scale: float = 2.0):
        super().__init__()
        self.scale = int(scale)
        self.norm = GRN(dim)
        self.to_feat = nn.Conv2d(3, dim, 3, 1, 1)
        self.feats = nn.Sequential(*[AttBlock(dim, ffn_scale) for _ in range(n_blocks)])
        self.to_img = nn.Sequential(nn.Conv2d(dim, 3 * self.scale ** 2, 3, 1, 1), nn.PixelShuffle(self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < _MIN_SIDE or w < _MIN_SIDE:  # the authors' code fails there; pad, then crop
            x = F.pad(x, (0, max(0, _MIN_SIDE - w), 0, max(0, _MIN_SIDE - h)), mode="replicate")
        base = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        out = self.to_img(self.feats(self.norm(self.to_feat(x)))) + base
        return out[..., : h * self.scale, : w * self.scale]
