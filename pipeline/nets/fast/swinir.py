"""The optimised SwinIR path: same module, same weights, same outputs (within float rounding).

`make_fast(net)` switches a built (and usually already loaded) `SwinIR` to `FastSwinIR`,
a subclass that only replaces `forward_features`; `make_reference(net)` switches back.
Nothing else changes: the module tree, parameters and state_dict keys are the
reference's, so `load_weights`, checkpoints and the official fixture work unchanged
either way. The reference (`swinir.py`) stays the plain transcription of the paper and
the equivalence reference; tests/test_fast_paths.py holds this path to it (fp32 within
1e-4 on the official fixture).

What is faster, and why it computes the same thing:
- Tokens are kept in *window order* through the Swin blocks. LayerNorm, the MLP and the
  residual adds act per token, so the order of tokens does not matter to them; only
  attention needs the windows. The reference pays four copies per shifted block (roll,
  partition, reverse, roll back); here going from one block's windows to the next
  block's shifted windows is one gather through a precomputed permutation (the roll is
  folded into it; its gradient is the gather through the inverse), and convolutions see the
  tokens as a channels-last image (a view).
- Window attention (`windows.window_attention`): torch's fused attention wherever it serves,
  the position bias gathered once per weight version; interior windows of a shifted block
  run with the bias alone and only the few border windows (put last in the shifted order)
  carry the shifted-window mask.
- Permutations and masks depend only on (height, width, batch, device): computed once
  per input size and cached (a few sizes, tiles and TTA views reuse them).
- In training, each residual add takes its drop path in one addcmul.
It works under autocast (bf16) and with autograd (training), on CPU and CUDA.
"""
from __future__ import annotations

import torch

from pipeline.nets.drop_path import keep_mask
from pipeline.nets.fast.switch import cached_orders, reorder, to_fast, to_reference
from pipeline.nets.fast.windows import WindowOrders, in_jobs, position_bias, run_jobs, window_attention
from pipeline.nets.swinir import SwinIR, SwinTransformerBlock


def _block(blk: SwinTransformerBlock, z: torch.Tensor, orders: WindowOrders, b: int) -> torch.Tensor:
    """One Swin block on tokens `z` already in its window order ("S" if shifted, else "U")."""
    n = orders.cells
    bias = position_bias(blk.attn)
    segments = orders.segments(bool(blk.shift_size))
    if torch.is_grad_enabled() or blk.training:      # one call: the last run's mask covers the last windows
        z = add_drop_path(blk, z, window_attention(blk.attn, blk.norm1(z), n, bias, segments[-1][2]), b, n)
        return add_drop_path(blk, z, blk.mlp(blk.norm2(z)), b, n)

    # inference: jobs of windows, each updated in place (z is this path's own gather), so a
    # device that cuts them small keeps each job's intermediates in cache
    def run(job: tuple) -> None:
        a, e, first, mask = job
        chunk = z[a * n:e * n]
        chunk += window_attention(blk.attn, blk.norm1(chunk), n, bias, None if mask is None else mask[a - first:e - first])
        chunk += blk.mlp(blk.norm2(chunk))

    run_jobs(run, in_jobs(segments, n, z.device), z.device)
    return z


def add_drop_path(blk: SwinTransformerBlock, z: torch.Tensor, y: torch.Tensor, b: int, cells: int) -> torch.Tensor:
    """z + DropPath(y): stochastic depth per image, as the reference's DropPath on (B, H*W, C)
    draws it; here the tokens are laid out (window, image, cell), so the keep mask broadcasts
    over dim 1. One addcmul instead of a product and a sum (one pass over the tokens fewer)."""
    p = getattr(blk.drop_path, "drop_prob", 0.0)
    if not blk.training or not p:
        return z + y
    mask = keep_mask(y, (1, b, 1, 1), 1.0 - p, getattr(blk.drop_path, "scale_by_keep", True))
    shape = (-1, b, cells, y.shape[-1])
    return torch.addcmul(z.view(shape), y.view(shape), mask).view(z.shape)


class FastSwinIR(SwinIR):
    """SwinIR with the optimised `forward_features` (see the module docstring)."""

    def fast_path_applies(self) -> bool:
        """Every block uses the net's window and either no shift or the net's shift (true
        unless img_size <= window_size, where the official code shrinks the window)."""
        return all(blk.window_size == self.window_size and blk.shift_size in (0, self.shift_size)
                   for layer in self.layers for blk in layer.residual_group.blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast_path_applies() or any(layer.residual_group.use_checkpoint for layer in self.layers):
            return super().forward_features(x)
        b, c, h, w = x.shape
        orders = cached_orders(self, b, h, w, x.device, WindowOrders)
        t = x.permute(0, 2, 3, 1).reshape(b * h * w, c)        # tokens in image order
        if self.patch_embed.norm is not None:
            t = self.patch_embed.norm(t)
        if self.ape:
            t = (t.view(b, h * w, c) + self.absolute_pos_embed).view(b * h * w, c)
        t = self.pos_drop(t)
        for layer in self.layers:
            z, order = t, "img"
            for blk in layer.residual_group.blocks:
                wanted = "S" if blk.shift_size else "U"
                if order != wanted:
                    z, order = reorder(z, orders, order, wanted), wanted
                z = _block(blk, z, orders, b)
            z = reorder(z, orders, order, "img")
            image = z.view(b, h, w, c).permute(0, 3, 1, 2)      # channels-last view, no copy
            t = layer.conv(image).permute(0, 2, 3, 1).reshape(b * h * w, c) + t
        t = self.norm(t)
        return t.view(b, h, w, c).permute(0, 3, 1, 2)


def make_fast(net: SwinIR) -> SwinIR:
    """Switch `net` (a SwinIR, weights loaded or not) to the optimised path, in place."""
    return to_fast(net, FastSwinIR)


def make_reference(net: SwinIR) -> SwinIR:
    """Switch `net` back to the reference path, in place (caches dropped)."""
    return to_reference(net, FastSwinIR)
