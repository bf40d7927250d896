"""The optimised HAT path: same module, same weights, same outputs (within float rounding).

`make_fast(net)` switches a built (and usually already loaded) `HAT` to `FastHAT`, a
subclass that only replaces `forward_features`; `make_reference(net)` switches back. The
module tree, parameters and state_dict keys stay the reference's (`hat.py`), so
`load_weights`, checkpoints and the official fixture work unchanged either way;
tests/test_fast_paths.py holds this path to the reference (fp32 within 1e-4, the same
gradients). Inference uses it by default, as SwinIR's.

What is faster, and why it computes the same thing (the pieces shared with SwinIR's fast
path are in `windows.py`):
- Tokens stay one (B*H*W, C) matrix in image order; convolutions (each block's CAB, each
  group's conv) see it as a channels-last image, a view. Window attention gathers its
  windows with one precomputed permutation (the cyclic shift folded in) and scatters the
  result back with its inverse: two copies per block where the reference makes six
  (roll, partition, reverse, roll back, and the contiguous copies around them).
- Window attention is `scaled_dot_product_attention` (fused: the (windows x heads x 256 x
  256) score tensor of a 16x16 window is never written to memory), with the position bias
  gathered once per weight version; interior windows of a shifted block run with the
  bias alone, only the border windows carry the shifted-window mask (as SwinIR's).
- The overlapping cross-attention gathers every window's 24x24 keys and values straight
  from the token matrix through a precomputed index (a zero row stands for the zero
  padding beyond the border, exactly what the reference's nn.Unfold pads with) instead of
  unfold + rearrange of the whole (2C, H, W) map, and attends with the fused kernel.
- Inference runs attention in jobs of windows (`windows.in_jobs`; on the CPU, a few dozen
  windows a job on worker threads), so there the 24x24 key windows of a whole scene (2.25x
  the map) never exist at once.
- Permutations, gather indices and masks depend only on (batch, H, W, device): built once
  per input size and cached for a few sizes (tiles and TTA views reuse them).
With autograd (training) every step is differentiable: caches that depend on weights are
rebuilt inside the graph when gradients are needed, attention takes SwinIR's training path
(window attention and the cross-attention: `windows.attend`, the fused kernel on CUDA and
spelt out on the CPU), and
stochastic depth drops whole images as the reference's DropPath does.
"""
from __future__ import annotations

import torch

from pipeline.nets.drop_path import keep_mask
from pipeline.nets.fast.switch import cached_orders, reorder, to_fast, to_reference
from pipeline.nets.fast.windows import WindowOrders, attend, cached, in_jobs, position_bias, run_jobs, window_attention
from pipeline.nets.hat import HAB, HAT, OCAB, overlap_window_size


class _HatOrders(WindowOrders):
    """SwinIR's window orders of one (batch, H, W) map ("img", "U", "S": see WindowOrders) and,
    for the overlapping cross-attention, `kv_index`: for every window of "U" (laid out
    (window, image)), the token index of each cell of the ows x ows window around it, or
    B*H*W (a zero row appended to the tokens) where that cell lies beyond the border."""

    def __init__(self, net: HAT, b: int, h: int, w: int, device: torch.device):
        super().__init__(net, b, h, w, device)
        ws = net.window_size
        ows = overlap_window_size(ws, net.overlap_ratio)
        pad = (ows - ws) // 2
        self.kv_cells = ows * ows
        rows = torch.arange(h // ws)[:, None] * ws - pad + torch.arange(ows)   # (windows down, ows)
        cols = torch.arange(w // ws)[:, None] * ws - pad + torch.arange(ows)   # (windows across, ows)
        y = rows[:, None, :, None].expand(-1, cols.shape[0], -1, ows)
        x = cols[None, :, None, :].expand(rows.shape[0], -1, ows, -1)
        inside = ((y >= 0) & (y < h) & (x >= 0) & (x < w)).reshape(-1, 1, ows * ows)
        cell = (y.clamp(0, h - 1) * w + x.clamp(0, w - 1)).reshape(-1, 1, ows * ows)
        index = cell + (torch.arange(b) * h * w)[None, :, None]                # (window, image, cell)
        self.kv_index = torch.where(inside, index, b * h * w).reshape(-1).to(device)


def _oca_bias(oca: OCAB, rpi: torch.Tensor) -> torch.Tensor:
    """(1, heads, ws*ws, ows*ows) relative-position bias of the cross-attention."""
    table = oca.relative_position_bias_table
    nq, n = oca.window_size ** 2, oca.overlap_win_size ** 2

    def build() -> torch.Tensor:
        return table[rpi.view(-1)].view(nq, n, -1).permute(2, 0, 1).unsqueeze(0).contiguous()
    return cached(oca, "_fast_bias", [table], build)


def drop_path(blk: HAB, y: torch.Tensor, b: int) -> torch.Tensor:
    """Stochastic depth per image on image-ordered tokens (B*H*W, C), as the reference's."""
    p = getattr(blk.drop_path, "drop_prob", 0.0)
    if not blk.training or not p:
        return y
    mask = keep_mask(y, (b, 1, 1), 1.0 - p, getattr(blk.drop_path, "scale_by_keep", True))
    return (y.view(b, -1, y.shape[-1]) * mask).view(y.shape)


def _in_jobs(out: torch.Tensor, cells: int, attend, device: torch.device,
             segments: list[tuple[int, int, torch.Tensor | None]]) -> torch.Tensor:
    """out[window rows] = attend(first, stop, mask) for runs of windows: in one call where
    gradients flow (training), else in jobs (inference: `windows.in_jobs`). `mask` is None or
    one row per window of its segment; the segments run from window 0 in order, so the last
    one's mask is that of the last windows, as `attend` takes it in one call."""
    if torch.is_grad_enabled():
        return attend(0, segments[-1][1], segments[-1][2])

    def run(job: tuple) -> None:
        a, e, first, m = job
        out[a * cells:e * cells] = attend(a, e, None if m is None else m[a - first:e - first])

    run_jobs(run, in_jobs(segments, cells, device), device)
    return out


def _hab(blk: HAB, t: torch.Tensor, orders: _HatOrders, b: int, h: int, w: int) -> torch.Tensor:
    """One hybrid attention block on image-ordered tokens t (B*H*W, C)."""
    c, n = t.shape[1], orders.cells
    y = blk.norm1(t)
    conv_x = blk.conv_block(y.view(b, h, w, c).permute(0, 3, 1, 2))   # channels-last in and out
    conv_x = conv_x.permute(0, 2, 3, 1).reshape(-1, c)
    order = "S" if blk.shift_size else "U"
    windows = reorder(y, orders, "img", order)
    bias = position_bias(blk.attn)
    segments = orders.segments(bool(blk.shift_size))

    def attend_windows(a: int, e: int, mask: torch.Tensor | None) -> torch.Tensor:
        return window_attention(blk.attn, windows[a * n:e * n], n, bias, mask)

    y = _in_jobs(torch.empty_like(windows), n, attend_windows, t.device, segments)
    t = t + drop_path(blk, reorder(y, orders, order, "img"), b) + conv_x * blk.conv_scale
    return t + drop_path(blk, blk.mlp(blk.norm2(t)), b)


def _ocab(oca: OCAB, t: torch.Tensor, orders: _HatOrders, rpi: torch.Tensor) -> torch.Tensor:
    """The overlapping cross-attention block on image-ordered tokens t (B*H*W, C)."""
    c, heads = t.shape[1], oca.num_heads
    d, nq, n = c // heads, orders.cells, orders.kv_cells
    qkv = oca.qkv(oca.norm1(t))
    q = reorder(qkv[:, :c], orders, "img", "U")                    # windows of queries
    kv = torch.cat([qkv[:, c:], qkv.new_zeros(1, 2 * c)])                       # + the zero padding row
    bias = _oca_bias(oca, rpi)

    def attend_windows(a: int, e: int, _no_window_mask: None) -> torch.Tensor:   # the bias alone
        qw = q[a * nq:e * nq].view(e - a, nq, heads, d).transpose(1, 2)
        kvw = kv.index_select(0, orders.kv_index[a * n:e * n]).view(e - a, n, 2, heads, d)
        k, v = kvw[:, :, 0].transpose(1, 2), kvw[:, :, 1].transpose(1, 2)
        out = attend(qw, k, v, bias.to(qw.dtype), oca.scale)                     # (windows, heads, nq, d)
        return oca.proj(out.transpose(1, 2).reshape((e - a) * nq, c))

    n_windows = q.shape[0] // nq
    y = _in_jobs(torch.empty_like(q), nq, attend_windows, t.device, [(0, n_windows, None)])
    t = t + reorder(y, orders, "U", "img")
    return t + oca.mlp(oca.norm2(t))


class FastHAT(HAT):
    """HAT with the optimised `forward_features` (see the module docstring)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if any(layer.residual_group.use_checkpoint for layer in self.layers):
            return super().forward_features(x)
        b, c, h, w = x.shape
        orders = cached_orders(self, b, h, w, x.device, _HatOrders)
        t = x.permute(0, 2, 3, 1).reshape(b * h * w, c)        # tokens in image order
        if self.patch_embed.norm is not None:
            t = self.patch_embed.norm(t)
        if self.ape:
            t = (t.view(b, h * w, c) + self.absolute_pos_embed).view(b * h * w, c)
        t = self.pos_drop(t)
        for layer in self.layers:
            z = t
            for blk in layer.residual_group.blocks:
                z = _hab(blk, z, orders, b, h, w)
            z = _ocab(layer.residual_group.overlap_attn, z, orders, self.relative_position_index_OCA)
            image = z.view(b, h, w, c).permute(0, 3, 1, 2)      # channels-last view, no copy
            t = layer.conv(image).permute(0, 2, 3, 1).reshape(b * h * w, c) + t
        t = self.norm(t)
        return t.view(b, h, w, c).permute(0, 3, 1, 2)


def make_fast(net: HAT) -> HAT:
    """Switch `net` (a HAT, weights loaded or not) to the optimised path, in place."""
    return to_fast(net, FastHAT)


def make_reference(net: HAT) -> HAT:
    """Switch `net` back to the reference path, in place (caches dropped)."""
    return to_reference(net, FastHAT)
