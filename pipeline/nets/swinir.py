"""SwinIR for super-resolution (Liang et al., "SwinIR: Image Restoration Using Swin
Transformer", ICCVW 2021), written to load the authors' release files strictly.

`build_net("swinir", **kwargs)` takes the official constructor arguments (upscale,
in_chans, img_size, patch_size, window_size, img_range, depths, embed_dim, num_heads,
mlp_ratio, qkv_bias, qk_scale, drop rates, ape, patch_norm, use_checkpoint, upsampler,
resi_connection) with the official defaults. Upsamplers: 'pixelshuffle' (classical SR,
x2/x3/x4/x8), 'pixelshuffledirect' (lightweight SR, any integer scale), 'nearest+conv'
(real-world SR, x2/x4) and '' (same-size restoration). `swinir_s` is the lightweight x4
preset (SwinIR-S; the public competition solution's model).

Any input size works: the image is reflect-padded to a multiple of the window and the
output cropped back, as the official `check_image_size` does. The module tree, and so
the state_dict keys, are the official ones. The release files also carry two buffers
derived from the configuration, not learnt: every attention's `relative_position_index`
and every shifted block's `attn_mask` (for an img_size x img_size input). Here they are
not saved (non-persistent; masks are computed for each input size and cached); when a
release file is loaded they are checked against what this configuration computes and
consumed, so a file built for another window or img_size is refused, never half-used.

This is the plain reference implementation, kept close to the paper's equations.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import trunc_normal_

from pipeline.core.errors import PipelineError
from pipeline.nets import register
from pipeline.nets.drop_path import DropPath  # timm's, with a random source per thread (sharded training)

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)  # subtracted from RGB inputs, as in the release


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws*ws, C)"""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B * H/ws * W/ws, ws*ws, C) -> (B, H, W, C)"""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) index into the (2ws-1)^2 bias table for every pair of window cells."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, ws*ws, ws*ws) additive mask: -100 between cells that the cyclic shift brought
    together from different image regions, 0 elsewhere (the official values)."""
    region = torch.zeros(1, h, w, 1)
    bands = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, (hs, wsl) in enumerate((a, b) for a in bands for b in bands):
        region[:, hs, wsl, :] = i
    cells = window_partition(region, ws).squeeze(-1)  # nW, ws*ws
    diff = cells.unsqueeze(1) - cells.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learnt relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B*nW, N, C); mask: (nW, N, N) or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(x))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the release files carry this derived buffer: check it, then consume it
        key = prefix + "relative_position_index"
        if key in state_dict:
            saved = state_dict.pop(key)
            if not torch.equal(saved.to(self.relative_position_index), self.relative_position_index):
                error_msgs.append(f"{key}: built for another window size than {self.window_size}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class SwinTransformerBlock(nn.Module):
    """LayerNorm -> (shifted) window attention -> residual; LayerNorm -> MLP -> residual."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int,
                 shift_size: int, mlp_ratio: float, qkv_bias: bool, qk_scale: float | None,
                 drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.input_resolution = input_resolution
        if min(input_resolution) <= window_size:
            # the official rule: a window as large as the training patch, and no shift
            shift_size, window_size = 0, min(input_resolution)
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, H*W, C); mask: the shifted-window mask for this size (unused unshifted)."""
        h, w = x_size
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        y = self.norm1(x).view(b, h, w, c)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = self.attn(window_partition(y, ws), mask=mask if shift else None)
        y = window_reverse(y, ws, h, w)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the release files carry the mask for an img_size x img_size input: check, consume
        key = prefix + "attn_mask"
        if key in state_dict:
            saved = state_dict.pop(key)
            expected = (shifted_window_mask(*self.input_resolution, self.window_size, self.shift_size)
                        if self.shift_size else None)
            if expected is None or saved.shape != expected.shape or not torch.equal(saved.cpu(), expected):
                error_msgs.append(f"{key}: attention mask built for another img_size, window or shift "
                                  f"than img_size {self.input_resolution}, window {self.window_size}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class BasicLayer(nn.Module):
    """`depth` Swin blocks, every other one with windows shifted by half a window."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio, qkv_bias,
                 qk_scale, drop, attn_drop, drop_path: list[float], use_checkpoint: bool):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size,
                                 0 if i % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias,
                                 qk_scale, drop, attn_drop, drop_path[i])
            for i in range(depth)])

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, x_size, mask, use_reentrant=False)
            else:
                x = blk(x, x_size, mask)
        return x


def _resi_conv(dim: int, kind: str) -> nn.Module:
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if kind == "3conv":  # fewer parameters: squeeze to dim/4 and back
        return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
                             nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
                             nn.Conv2d(dim // 4, dim, 3, 1, 1))
    raise PipelineError(f"swinir: resi_connection '{kind}' unknown (1conv or 3conv)")


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)"""
    return x.flatten(2).transpose(1, 2)


def tokens_to_image(x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)"""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *x_size)


class RSTB(nn.Module):
    """Residual Swin Transformer block: Swin layers, a conv, and a skip around both."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio, qkv_bias,
                 qk_scale, drop, attn_drop, drop_path, use_checkpoint, resi_connection):
        super().__init__()
        self.residual_group = BasicLayer(dim, input_resolution, depth, num_heads, window_size, mlp_ratio,
                                         qkv_bias, qk_scale, drop, attn_drop, drop_path, use_checkpoint)
        self.conv = _resi_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        return image_to_tokens(self.conv(tokens_to_image(self.residual_group(x, x_size, mask), x_size))) + x


class PatchEmbed(nn.Module):
    """Feature map to tokens, with the optional LayerNorm (`patch_embed.norm` in the files)."""

    def __init__(self, dim: int, patch_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = image_to_tokens(x)
        return self.norm(x) if self.norm is not None else x


class Upsample(nn.Sequential):
    """conv + pixel shuffle by 2, log2(scale) times, or once by 3."""

    def __init__(self, scale: int, num_feat: int):
        layers: list[nn.Module] = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise PipelineError(f"swinir: upsampler 'pixelshuffle' supports scales 2^n and 3, not {scale}")
        super().__init__(*layers)


class SwinIR(nn.Module):
    def __init__(self, img_size: int | tuple[int, int] = 64, patch_size: int = 1, in_chans: int = 3,
                 embed_dim: int = 96, depths: list[int] = (6, 6, 6, 6), num_heads: list[int] = (6, 6, 6, 6),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, upscale: int | None = None, img_range: float = 1.0,
                 upsampler: str = "", resi_connection: str = "1conv", scale: int | None = None):
        super().__init__()
        # `scale` is the pipeline's name for `upscale`, accepted so every net takes it
        if scale is not None and upscale is not None and scale != upscale:
            raise PipelineError(f"swinir: scale={scale} and upscale={upscale} disagree")
        upscale = upscale or scale or 2  # the official default is 2
        if patch_size != 1:
            raise PipelineError(f"swinir: patch_size {patch_size} unsupported (SwinIR for SR uses 1)")
        if len(depths) != len(num_heads):
            raise PipelineError(f"swinir: depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        upsampler = upsampler or ""
        if upsampler not in ("pixelshuffle", "pixelshuffledirect", "nearest+conv", ""):
            raise PipelineError(f"swinir: upsampler '{upsampler}' unknown "
                                "(pixelshuffle, pixelshuffledirect, nearest+conv or '')")
        if upsampler == "nearest+conv" and upscale not in (2, 4):
            raise PipelineError(f"swinir: upsampler 'nearest+conv' supports x2 and x4, not x{upscale}")
        self.upscale = int(upscale)
        self.scale = self.upscale if upsampler else 1  # '' restores at the same size
        self.upsampler = upsampler
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.img_range = img_range
        mean = DIV2K_RGB_MEAN if in_chans == 3 else (0.0,) * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        num_feat = 64
        resolution = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)

        # 1. shallow features
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self._masks: dict[tuple, torch.Tensor] = {}  # (H, W, device) -> shifted-window mask
        # 2. deep features: residual Swin Transformer blocks
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
            self.layers.append(RSTB(embed_dim, resolution, depth, heads, window_size, mlp_ratio, qkv_bias,
                                    qk_scale, drop_rate, attn_drop_rate, dpr[start:start + depth],
                                    use_checkpoint, resi_connection))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _resi_conv(embed_dim, resi_connection)
        # 3. reconstruction
        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
            self.upsample = Upsample(self.upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, in_chans * self.upscale ** 2, 3, 1, 1),
                                          nn.PixelShuffle(self.upscale))
        elif upsampler == "nearest+conv":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            if self.upscale == 4:
                self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        else:
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table", "absolute_pos_embed"}

    def edge_convs(self) -> list[nn.Conv2d]:
        """The convolutions that read the image or write it: shallow features, the conv after
        the body and the image's conv (kept float32 under bf16 autocast, `pipeline.nets.fast`)."""
        last = self.upsample if self.upsampler == "pixelshuffledirect" else getattr(self, "conv_last", None)
        return [m for part in (self.conv_first, self.conv_after_body, last) if part is not None
                for m in part.modules() if isinstance(m, nn.Conv2d)]

    def pad_to_window(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pad bottom/right to a multiple of the window (repeated when the image
        is smaller than the padding, where a single reflection cannot reach)."""
        ws = self.window_size
        while x.shape[-2] % ws or x.shape[-1] % ws:
            pad_h = min((-x.shape[-2]) % ws, x.shape[-2] - 1)
            pad_w = min((-x.shape[-1]) % ws, x.shape[-1] - 1)
            if pad_h == pad_w == 0:  # a 1-pixel side cannot reflect
                x = F.pad(x, (0, (-x.shape[-1]) % ws, 0, (-x.shape[-2]) % ws), mode="replicate")
            else:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        return x

    def attn_mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """The shifted-window mask for an h x w feature map, shared by every shifted block
        and cached for the last few sizes (it is large: nW x N x N floats)."""
        key = (h, w, str(device))
        if key not in self._masks:
            if len(self._masks) >= 4:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = shifted_window_mask(h, w, self.window_size, self.shift_size).to(device)
        return self._masks[key]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x_size = (x.shape[2], x.shape[3])
        mask = self.attn_mask(*x_size, x.device)
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x, x_size, mask)
        return tokens_to_image(self.norm(x), x_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = (self.pad_to_window(x) - self.mean) * self.img_range
        if self.upsampler == "":  # restoration at the same size: the net predicts a residual
            feat = self.conv_first(x)
            x = x + self.conv_last(self.conv_after_body(self.forward_features(feat)) + feat)
        else:
            feat = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(feat)) + feat
            if self.upsampler == "pixelshuffle":
                x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
            elif self.upsampler == "pixelshuffledirect":
                x = self.upsample(x)
            else:  # nearest+conv
                x = self.conv_before_upsample(x)
                x = self.lrelu(self.conv_up1(F.interpolate(x, scale_factor=2, mode="nearest")))
                if self.upscale == 4:
                    x = self.lrelu(self.conv_up2(F.interpolate(x, scale_factor=2, mode="nearest")))
                x = self.conv_last(self.lrelu(self.conv_hr(x)))
        x = x / self.img_range + self.mean
        return x[..., : h * self.scale, : w * self.scale]


register("swinir")(SwinIR)


@register("swinir_s")
def swinir_s(upscale: int | None = None, scale: int | None = None, **overrides) -> SwinIR:
    """SwinIR-S, the lightweight preset (002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4.pth)."""
    if upscale is None and scale is None:
        upscale = 4
    args = dict(upscale=upscale, scale=scale, in_chans=3, img_size=64, window_size=8, img_range=1.0,
                depths=[6, 6, 6, 6], embed_dim=60, num_heads=[6, 6, 6, 6], mlp_ratio=2,
                upsampler="pixelshuffledirect", resi_connection="1conv")
    return SwinIR(**{**args, **overrides})
