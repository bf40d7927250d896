"""RLFN (Kong et al., "Residual Local Feature Network for Efficient Super-Resolution",
CVPRW 2022; bytedance/RLFN), written to load the authors' release files strictly.

`rlfn` is the 52-channel model (rlfn_x4.pth), `rlfn_s` the 48-channel RLFN-S
(rlfn_s_x4.pth); both have six residual local feature blocks. The release weights were
trained on 0..255 images: the net scales its [0, 1] input by `img_range` on the way in
and back on the way out, so callers never see that range, while the module tree (and so
the state_dict keys) stays exactly the authors' one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.nets import register

# ESA's stride-2 3x3 conv followed by a 7x7 max-pool needs at least 15 pixels per side.
_MIN_SIDE = 15


def _conv(in_ch: int, out_ch: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, k, padding=(k - 1) // 2)


class ESA(nn.Module):
    """Enhanced spatial attention, RLFN's light variant (no conv_max / conv3_)."""

    def __init__(self, esa_channels: int, n_feats: int):
        super().__init__()
        f = esa_channels
        self.conv1 = nn.Conv2d(n_feats, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = nn.Conv2d(f, n_feats, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.conv1(x)
        pooled = F.max_pool2d(self.conv2(reduced), kernel_size=7, stride=3)
        coarse = F.interpolate(self.conv3(pooled), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        mask = torch.sigmoid(self.conv4(coarse + self.conv_f(reduced)))
        return x * mask


class RLFB(nn.Module):
    """Residual local feature block: three 3x3 conv + LeakyReLU(0.05), skip, 1x1, ESA."""

    def __init__(self, channels: int, esa_channels: int = 16):
        super().__init__()
        self.c1_r = _conv(channels, channels, 3)
        self.c2_r = _conv(channels, channels, 3)
        self.c3_r = _conv(channels, channels, 3)
        self.c5 = _conv(channels, channels, 1)
        self.esa = ESA(esa_channels, channels)
        self.act = nn.LeakyReLU(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.c1_r(x))
        out = self.act(self.c2_r(out))
        out = self.act(self.c3_r(out))
        return self.esa(self.c5(out + x))


class RLFN(nn.Module):
    def __init__(self, scale: int = 4, in_chans: int = 3, feature_channels: int = 52,
                 n_blocks: int = 6, esa_channels: int = 16, img_range: float = 255.0):
        super().__init__()
        self.scale = int(scale)
        self.img_range = float(img_range)
        self.n_blocks = n_blocks
        self.conv_1 = _conv(in_chans, feature_channels, 3)
        for i in range(1, n_blocks + 1):  # block_1..block_N: the release files' key names
            setattr(self, f"block_{i}", RLFB(feature_channels, esa_channels))
        self.conv_2 = _conv(feature_channels, feature_channels, 3)
        self.upsampler = nn.Sequential(_conv(feature_channels, in_chans * self.scale ** 2, 3),
                                       nn.PixelShuffle(self.scale))

    def edge_convs(self) -> list[nn.Conv2d]:
        """The convolutions that read the image or write it: shallow features, the skip's conv
        and the upsampler (kept float32 under bf16 autocast, `pipeline.nets.fast`)."""
        return [m for part in (self.conv_1, self.conv_2, self.upsampler) for m in part.modules()
                if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < _MIN_SIDE or w < _MIN_SIDE:  # the authors' code fails there; pad, then crop
            x = F.pad(x, (0, max(0, _MIN_SIDE - w), 0, max(0, _MIN_SIDE - h)), mode="replicate")
        shallow = self.conv_1(x * self.img_range)
        out = shallow
        for i in range(1, self.n_blocks + 1):
            out = getattr(self, f"block_{i}")(out)
        out = self.upsampler(self.conv_2(out) + shallow) / self.img_range
        return out[..., : h * self.scale, : w * self.scale]


@register("rlfn")
def rlfn(scale: int = 4, feature_channels: int = 52, **kwargs) -> RLFN:
    """RLFN (52 channels): loads rlfn_x4.pth."""
    return RLFN(scale=scale, feature_channels=feature_channels, **kwargs)


@register("rlfn_s")
def rlfn_s(scale: int = 4, feature_channels: int = 48, **kwargs) -> RLFN:
    """RLFN-S (48 channels): loads rlfn_s_x4.pth."""
    return RLFN(scale=scale, feature_channels=feature_channels, **kwargs)
