"""HAT for super-resolution (Chen et al., "Activating More Pixels in Image Super-Resolution
Transformer", CVPR 2023; XPixelGroup/HAT), written to load the authors' release files
strictly.

HAT is SwinIR with two additions: every Swin block (a "hybrid attention block", HAB) adds a
small convolutional channel-attention branch (CAB, scaled by `conv_scale`) beside its window
attention, and every residual group ends with an overlapping cross-attention block (OCAB):
queries from each window, keys and values from a larger window around it
(`window * (1 + overlap_ratio)`, zero-padded at the image border). The pieces that are
the same as SwinIR's (window partition, shifted-window mask, window attention, MLP, patch
embedding, upsampler, padding to the window) are imported from `swinir.py`.

Presets from the official option files, x4 unless a scale is given: `hat_s` (HAT-S),
`hat` (HAT) and `hat_l` (HAT-L). Each takes every official constructor argument (upscale,
in_chans, img_size, window_size, compress_ratio, squeeze_factor, conv_scale,
overlap_ratio, img_range, depths, embed_dim, num_heads, mlp_ratio, upsampler,
resi_connection, and the drop rates, qkv_bias, qk_scale, ape, patch_norm,
use_checkpoint) over its settings, so `build_net("hat", **official_args)` builds exactly
the official configuration given (the fixture's, for one).

Any input size works: the image is reflect-padded on the right and bottom to a multiple
of the window and the output cropped back, as the official `HATModel.test` does. The
release files (`{'params_ema': ...}`) carry two buffers derived from the configuration:
`relative_position_index_SA` and `relative_position_index_OCA`. Here they are not saved
(non-persistent); when a file is loaded they are checked against what this configuration
computes and consumed, so a file for another window or overlap is refused by name.

This is the plain reference implementation; `fast/hat.py` is the optimised path.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import trunc_normal_

from pipeline.core.errors import PipelineError
from pipeline.nets import register
from pipeline.nets.drop_path import DropPath  # timm's, with a random source per thread (sharded training)
from pipeline.nets.swinir import (
    DIV2K_RGB_MEAN,
    Mlp,
    PatchEmbed,
    SwinIR,
    Upsample,
    WindowAttention,
    image_to_tokens,
    relative_position_index,
    tokens_to_image,
    window_partition,
    window_reverse,
)


def overlap_window_size(window_size: int, overlap_ratio: float) -> int:
    """Side of the key/value window of the overlapping cross-attention (the official rule)."""
    return int(window_size * overlap_ratio) + window_size


def relative_position_index_oca(ws: int, ows: int) -> torch.Tensor:
    """(ws*ws, ows*ows) index into the (ws+ows-1)^2 bias table for every (query cell of a
    window, key cell of its overlapping window) pair; the overlapping window is centred."""
    def cells(n: int) -> torch.Tensor:
        return torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")).flatten(1)

    rel = (cells(ows)[:, None, :] - cells(ws)[:, :, None]).permute(1, 2, 0) + (ws - ows + 1)
    return rel[..., 0] * (ws + ows - 1) + rel[..., 1]


class ChannelAttention(nn.Module):
    """RCAN's channel attention: global average -> squeeze -> ReLU -> excite -> sigmoid gate."""

    def __init__(self, num_feat: int, squeeze_factor: int):
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(num_feat, num_feat // squeeze_factor, 1),
            nn.ReLU(inplace=True), nn.Conv2d(num_feat // squeeze_factor, num_feat, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CAB(nn.Module):
    """Channel-attention block: conv to dim/compress_ratio, GELU, conv back, channel attention."""

    def __init__(self, num_feat: int, compress_ratio: int, squeeze_factor: int):
        super().__init__()
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // compress_ratio, 3, 1, 1), nn.GELU(),
            nn.Conv2d(num_feat // compress_ratio, num_feat, 3, 1, 1),
            ChannelAttention(num_feat, squeeze_factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cab(x)


class HAB(nn.Module):
    """Hybrid attention block: LayerNorm -> (shifted) window attention + conv_scale * CAB ->
    residual; LayerNorm -> MLP -> residual."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, compress_ratio: int,
                 squeeze_factor: int, conv_scale: float, mlp_ratio: float, qkv_bias: bool,
                 qk_scale: float | None, drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.conv_scale = conv_scale
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.conv_block = CAB(dim, compress_ratio, squeeze_factor)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], mask: torch.Tensor) -> torch.Tensor:
        """x: (B, H*W, C); mask: the shifted-window mask for this size (unused unshifted)."""
        h, w = x_size
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        y = self.norm1(x).view(b, h, w, c)
        conv_x = image_to_tokens(self.conv_block(y.permute(0, 3, 1, 2)))
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, ws), mask=mask if shift else None), ws, h, w)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(b, h * w, c)) + conv_x * self.conv_scale
        return x + self.drop_path(self.mlp(self.norm2(x)))


class OCAB(nn.Module):
    """Overlapping cross-attention: each window's queries attend to the keys and values of
    a larger window centred on it (zero-padded beyond the image), with a learnt
    relative-position bias; then an MLP. Residual around both."""

    def __init__(self, dim: int, window_size: int, overlap_ratio: float, num_heads: int, qkv_bias: bool,
                 qk_scale: float | None, mlp_ratio: float):
        super().__init__()
        self.window_size = window_size
        self.overlap_win_size = ows = overlap_window_size(window_size, overlap_ratio)
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((window_size + ows - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def overlapping_windows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B * nW, ows*ows, C): the overlapping window around every window,
        zeros beyond the border (nn.Unfold, as the official code)."""
        ws, ows = self.window_size, self.overlap_win_size
        b, c = x.shape[:2]
        cols = F.unfold(x, ows, stride=ws, padding=(ows - ws) // 2)        # B, C*ows*ows, nW
        return cols.view(b, c, ows * ows, -1).permute(0, 3, 2, 1).reshape(-1, ows * ows, c)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], rpi: torch.Tensor) -> torch.Tensor:
        h, w = x_size
        b, _, c = x.shape
        ws, ows, heads = self.window_size, self.overlap_win_size, self.num_heads
        d = c // heads
        shortcut = x
        q, k, v = self.qkv(self.norm1(x)).view(b, h, w, 3 * c).chunk(3, dim=-1)
        q = window_partition(q, ws)                                           # B*nW, ws*ws, C
        k = self.overlapping_windows(k.permute(0, 3, 1, 2))                  # B*nW, ows*ows, C
        v = self.overlapping_windows(v.permute(0, 3, 1, 2))
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[rpi.view(-1)].view(ws * ws, ows * ows, -1)
        attn = (attn + bias.permute(2, 0, 1).unsqueeze(0)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(-1, ws * ws, c)
        y = window_reverse(y, ws, h, w).reshape(b, h * w, c)
        x = self.proj(y) + shortcut
        return x + self.mlp(self.norm2(x))


class AttenBlocks(nn.Module):
    """`depth` hybrid attention blocks (every other one shifted) and one OCAB."""

    def __init__(self, dim, depth, num_heads, window_size, compress_ratio, squeeze_factor, conv_scale,
                 overlap_ratio, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path: list[float],
                 use_checkpoint: bool):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            HAB(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, compress_ratio,
                squeeze_factor, conv_scale, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path[i])
            for i in range(depth)])
        self.overlap_attn = OCAB(dim, window_size, overlap_ratio, num_heads, qkv_bias, qk_scale, mlp_ratio)

    def forward(self, x, x_size, mask, rpi_oca):
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, x_size, mask, use_reentrant=False)
            else:
                x = blk(x, x_size, mask)
        return self.overlap_attn(x, x_size, rpi_oca)


class RHAG(nn.Module):
    """Residual hybrid attention group: attention blocks, a conv, and a skip around both."""

    def __init__(self, dim, depth, num_heads, window_size, compress_ratio, squeeze_factor, conv_scale,
                 overlap_ratio, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path, use_checkpoint,
                 resi_connection):
        super().__init__()
        self.residual_group = AttenBlocks(dim, depth, num_heads, window_size, compress_ratio, squeeze_factor,
                                          conv_scale, overlap_ratio, mlp_ratio, qkv_bias, qk_scale, drop,
                                          attn_drop, drop_path, use_checkpoint)
        self.conv = _resi_conv(dim, resi_connection)

    def forward(self, x, x_size, mask, rpi_oca):
        return image_to_tokens(self.conv(tokens_to_image(self.residual_group(x, x_size, mask, rpi_oca), x_size))) + x


def _resi_conv(dim: int, kind: str) -> nn.Module:
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if kind == "identity":
        return nn.Identity()
    raise PipelineError(f"hat: resi_connection '{kind}' unknown (1conv or identity)")


class HAT(nn.Module):
    # the same padding and shifted-window mask cache as SwinIR (they read only
    # window_size, shift_size and _masks)
    pad_to_window = SwinIR.pad_to_window
    attn_mask = SwinIR.attn_mask

    def __init__(self, img_size: int | tuple[int, int] = 64, patch_size: int = 1, in_chans: int = 3,
                 embed_dim: int = 96, depths: list[int] = (6, 6, 6, 6), num_heads: list[int] = (6, 6, 6, 6),
                 window_size: int = 7, compress_ratio: int = 3, squeeze_factor: int = 30,
                 conv_scale: float = 0.01, overlap_ratio: float = 0.5, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, ape: bool = False,
                 patch_norm: bool = True, use_checkpoint: bool = False, upscale: int | None = None,
                 img_range: float = 1.0, upsampler: str = "pixelshuffle", resi_connection: str = "1conv",
                 scale: int | None = None):
        super().__init__()
        # `scale` is the pipeline's name for `upscale`, accepted so every net takes it
        if scale is not None and upscale is not None and scale != upscale:
            raise PipelineError(f"hat: scale={scale} and upscale={upscale} disagree")
        upscale = int(upscale or scale or 2)  # the official default is 2
        if patch_size != 1:
            raise PipelineError(f"hat: patch_size {patch_size} unsupported (HAT for SR uses 1)")
        if len(depths) != len(num_heads):
            raise PipelineError(f"hat: depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        if upsampler != "pixelshuffle":  # the only reconstruction the official HAT implements
            raise PipelineError(f"hat: upsampler '{upsampler}' unsupported (the official HAT has 'pixelshuffle')")
        if upscale & (upscale - 1) and upscale != 3:
            raise PipelineError(f"hat: upsampler 'pixelshuffle' supports scales 2^n and 3, not {upscale}")
        resolution = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if min(resolution) <= window_size:
            # the official blocks would shrink their window to img_size while the net's
            # relative-position indices stay those of window_size: it cannot run
            raise PipelineError(f"hat: img_size {img_size} must exceed window_size {window_size}")
        ows = overlap_window_size(window_size, overlap_ratio)
        if (ows - window_size) % 2:
            raise PipelineError(f"hat: overlap_ratio {overlap_ratio} gives an overlapping window of {ows} for "
                                f"window {window_size}; the difference must be even (centred)")
        self.upscale = self.scale = upscale
        self.upsampler = upsampler
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.overlap_ratio = overlap_ratio
        self.img_range = img_range
        mean = DIV2K_RGB_MEAN if in_chans == 3 else (0.0,) * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        # derived from the configuration; the release files carry them (checked on load)
        self.register_buffer("relative_position_index_SA", relative_position_index(window_size), persistent=False)
        self.register_buffer("relative_position_index_OCA", relative_position_index_oca(window_size, ows),
                             persistent=False)
        self._masks: dict[tuple, torch.Tensor] = {}  # (H, W, device) -> shifted-window mask
        num_feat = 64

        # 1. shallow features
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        # 2. deep features: residual hybrid attention groups
        self.patch_embed = PatchEmbed(embed_dim, patch_norm)
        self.ape = ape
        if ape:  # absolute position embedding: fixes the input size to img_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, resolution[0] * resolution[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth, rising
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.layers.append(RHAG(embed_dim, depth, heads, window_size, compress_ratio, squeeze_factor,
                                    conv_scale, overlap_ratio, mlp_ratio, qkv_bias, qk_scale, drop_rate,
                                    attn_drop_rate, dpr[start:start + depth], use_checkpoint, resi_connection))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _resi_conv(embed_dim, resi_connection)
        # 3. reconstruction
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.upsample = Upsample(upscale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        self.apply(SwinIR._init_weights)

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table", "absolute_pos_embed"}

    def edge_convs(self) -> list[nn.Conv2d]:
        """The convolutions that read the image or write it (as SwinIR's `edge_convs`)."""
        return [m for part in (self.conv_first, self.conv_after_body, self.conv_last)
                for m in part.modules() if isinstance(m, nn.Conv2d)]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the release files carry the two derived index buffers: check them, then consume them
        for name in ("relative_position_index_SA", "relative_position_index_OCA"):
            key = prefix + name
            if key in state_dict:
                saved, expected = state_dict.pop(key), getattr(self, name)
                if saved.shape != expected.shape or not torch.equal(saved.to(expected), expected):
                    error_msgs.append(f"{key}: built for another window_size or overlap_ratio than "
                                      f"window {self.window_size}, overlap {self.overlap_ratio}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x_size = (x.shape[2], x.shape[3])
        mask = self.attn_mask(*x_size, x.device)
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x, x_size, mask, self.relative_position_index_OCA)
        return tokens_to_image(self.norm(x), x_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = (self.pad_to_window(x) - self.mean) * self.img_range
        feat = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(feat)) + feat
        x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        x = x / self.img_range + self.mean
        return x[..., : h * self.scale, : w * self.scale]


# the official option files' settings (options/test/HAT-S_SRx4.yml, HAT_SRx4.yml, HAT-L_SRx4_*.yml)
_HAT_COMMON = dict(in_chans=3, img_size=64, window_size=16, conv_scale=0.01, overlap_ratio=0.5,
                   img_range=1.0, mlp_ratio=2, upsampler="pixelshuffle", resi_connection="1conv")
PRESETS = {
    "hat_s": dict(_HAT_COMMON, embed_dim=144, depths=[6] * 6, num_heads=[6] * 6, compress_ratio=24,
                  squeeze_factor=24),
    "hat": dict(_HAT_COMMON, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, compress_ratio=3,
                squeeze_factor=30),
    "hat_l": dict(_HAT_COMMON, embed_dim=180, depths=[6] * 12, num_heads=[6] * 12, compress_ratio=3,
                  squeeze_factor=30),
}


def _preset(name: str):
    def build(upscale: int | None = None, scale: int | None = None, **overrides) -> HAT:
        if upscale is None and scale is None:
            upscale = 4
        return HAT(**{**PRESETS[name], "upscale": upscale, "scale": scale, **overrides})
    build.__doc__ = f"The official '{name}' settings (x4 unless a scale is given); any argument overridable."
    return register(name)(build)


for _name in PRESETS:
    _preset(_name)
