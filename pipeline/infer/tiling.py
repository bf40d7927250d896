"""Tiled inference: run a net on overlapping LR tiles and blend the outputs without seams.

Tiles are `tile` x `tile` LR pixels (the whole side where the image is smaller), placed
every `tile - overlap` pixels, the last one moved back to end exactly at the border so
every tile has the same shape and tiles batch together. In the output, each tile is
weighted by a raised-cosine ramp across the overlap on the sides it shares with a
neighbour (weight 1 elsewhere, also along the image border); the blend divides by the
summed weights, so the weights sum to one everywhere, whatever the overlap.
The tile border, where the net sees zero padding instead of the image, gets almost no
weight: with an overlap wider than the net's receptive field the seams vanish.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from pipeline.core.errors import PipelineError

MARGIN_FRACTION = 0.25


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, length): stride tile - overlap, last flush to the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(n: int, margin: int, device: torch.device) -> torch.Tensor:
    """Weights across an overlap of n output pixels, from the tile's edge inwards: 0 over the
    first `margin` (where the net saw padding, not the image), then a raised cosine up to 1
    over the middle, then 1. A tile's ramp plus its neighbour's mirrored ramp sum to 1."""
    w = torch.zeros(n, device=device)
    rise = n - 2 * margin
    t = (torch.arange(rise, device=device, dtype=torch.float32) + 0.5) / rise
    w[margin:n - margin] = 0.5 - 0.5 * torch.cos(math.pi * t)
    w[n - margin:] = 1.0
    return w


def _axis_weights(size: int, ramp: int, margin: int, rise: bool, fall: bool,
                  device: torch.device) -> torch.Tensor:
    w = torch.ones(size, device=device)
    if ramp > 0:
        r = _ramp(ramp, margin, device)
        if rise:
            w[:ramp] = r
        if fall:
            w[size - ramp:] = torch.minimum(w[size - ramp:], r.flip(0))
    return w


def tiled_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int,
                  tile: int, overlap: int = 16, batch: int = 8) -> torch.Tensor:
    """fn(x) for an NCHW batch x, computed on overlapping tiles; float32 result.

    `fn` maps (B, C, h, w) to (B, C', h*scale, w*scale). `tile` <= 0 runs the whole image.
    At most `batch` tiles go through `fn` at once.
    """
    if tile <= 0:
        return fn(x).float()
    if overlap < 0 or 2 * overlap > tile:
        raise PipelineError(f"tiling: overlap {overlap} must be >= 0 and at most half the tile ({tile})")
    if batch < 1:
        raise PipelineError(f"tiling: batch must be >= 1, got {batch}")
    n, _, h, w = x.shape
    th, tw = min(tile, h), min(tile, w)
    boxes = [(y0, x0) for y0 in tile_starts(h, tile, overlap) for x0 in tile_starts(w, tile, overlap)]
    ramp = overlap * scale
    margin = int(MARGIN_FRACTION * overlap) * scale
    out = weight = None
    for first in range(0, len(boxes), batch):
        chunk = boxes[first:first + batch]
        tiles = torch.cat([x[:, :, y0:y0 + th, x0:x0 + tw] for y0, x0 in chunk])
        pred = fn(tiles).float()
        if pred.shape[-2:] != (th * scale, tw * scale):
            raise PipelineError(f"tiling: a {th}x{tw} tile gave {tuple(pred.shape[-2:])}, "
                                f"expected {th * scale}x{tw * scale} at scale {scale}")
        if out is None:
            out = pred.new_zeros((n, pred.shape[1], h * scale, w * scale))
            weight = pred.new_zeros((1, 1, h * scale, w * scale))
        for i, (y0, x0) in enumerate(chunk):
            wy = _axis_weights(th * scale, ramp, margin, rise=y0 > 0, fall=y0 + th < h, device=pred.device)
            wx = _axis_weights(tw * scale, ramp, margin, rise=x0 > 0, fall=x0 + tw < w, device=pred.device)
            wt = wy[:, None] * wx[None, :]
            ys, xs = slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale)
            out[:, :, ys, xs] += pred[i * n:(i + 1) * n] * wt
            weight[:, :, ys, xs] += wt
    return out / weight
