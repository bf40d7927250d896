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
- Attention is `scaled_dot_product_attention` (a fused kernel on CPU and GPU: the
  (windows x heads x 64 x 64) score tensor is never written to memory), with the
  relative-position bias gathered once per weight version, not per call. Training on the
  CPU runs `window_attention_cpu` instead: forward and backward by hand, through a compiled
  kernel that keeps each window-head's scores in cache, or torch's products in cache-sized
  chunks of windows (faster there, and it differentiates the bias).
- The shifted-window mask is zero except in the last row and column of windows. Those
  windows are put last in the shifted order, so the interior ones run with the bias
  alone (broadcast over windows) and only the few border ones carry bias + mask.
- Permutations and masks depend only on (height, width, batch, device): computed once
  per input size and cached (a few sizes, tiles and TTA views reuse them).
- In training, each residual add takes its drop path in one addcmul. With the inverse
  gather above, a SwinIR-S training step (batch 24, 2 shards; AMD EPYC, in-process A/B)
  ran 0.860 -> 0.824 s in bf16 and 1.252 -> 1.181 s in fp32.
It works under autocast (bf16) and with autograd (training), on CPU and CUDA.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from pipeline.accel.cpu import window_attention as window_attention_cpu
from pipeline.accel.cpu.onednn_linear import linear as _linear
from pipeline.accel.cpu.window_attention import window_attention
from pipeline.nets.drop_path import keep_mask
from pipeline.nets.fast.switch import cached_orders, reorder, to_fast, to_reference
from pipeline.nets.swinir import SwinIR, SwinTransformerBlock, WindowAttention

_CHUNK_WINDOWS = 128  # windows per inference job of a block (8192 tokens of SwinIR-S)


class _Orders:
    """Token permutations of one (batch, H, W) feature map, flattened to B*H*W tokens.

    Orders: "img" (b, y, x), "U" (unshifted windows) and "S" (windows of the image rolled
    by -shift, interior windows first); windowed orders are laid out (window, b, cell), so
    the first `n_interior * B` windows of "S" are exactly the unmasked ones.
    `index(a, b)` maps: tokens_in_b = tokens_in_a[index(a, b)].
    """

    def __init__(self, net: SwinIR, b: int, h: int, w: int, device: torch.device):
        ws, shift = net.window_size, net.shift_size
        self.cells = ws * ws
        mask = net.attn_mask(h, w, device).cpu() if shift else None   # (nW, N, N), the reference's
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        offsets = torch.arange(b) * h * w

        def windows(s: int, order: torch.Tensor | None) -> torch.Tensor:
            # image index of every cell of every window of the image rolled by -s
            src = ((y + s) % h) * w + (x + s) % w
            win = src.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1, self.cells)
            if order is not None:
                win = win[order]
            return (win[:, None, :] + offsets[None, :, None]).reshape(-1)

        self.to_img: dict[str, torch.Tensor] = {"U": windows(0, None)}   # order -> image index
        self.n_interior = (h // ws) * (w // ws) * b
        self.border_mask = None
        if shift:
            border = mask.flatten(1).ne(0).any(1)
            order = torch.cat([torch.nonzero(~border).flatten(), torch.nonzero(border).flatten()])
            self.to_img["S"] = windows(shift, order)
            self.n_interior = int((~border).sum()) * b
            # (n_border * B, 1, N, N): each border window's mask, repeated for the batch. The
            # reference's -100 becomes -inf: exp(-100) = 4e-44 is a float32 denormal, which x86
            # computes ~30x slower (it made the softmax exp and the matrix products of the
            # attention backward 40 % of a training step); exp(-inf) = 0, a difference far below
            # float rounding (e^-100 relative to the unmasked terms).
            border_mask = mask[border].masked_fill(mask[border] != 0, float("-inf"))
            self.border_mask = border_mask.repeat_interleave(b, dim=0).unsqueeze(1).to(device)
        self.to_img["img"] = torch.arange(b * h * w)
        self._device = device
        self._maps: dict[tuple[str, str], torch.Tensor] = {}

    def segments(self, shifted: bool) -> list[tuple[int, int, torch.Tensor | None]]:
        """A block's windows as (first, stop, mask) runs in window order: all of them unmasked,
        or in a shifted block the interior ones, then the border ones with their mask (so the
        last run's mask is that of the last windows); empty runs left out."""
        windows = self.to_img["U"].numel() // self.cells
        if not shifted or self.border_mask is None:
            return [(0, windows, None)]
        runs = [(0, self.n_interior, None), (self.n_interior, windows, self.border_mask)]
        return [run for run in runs if run[1] > run[0]]

    def index(self, src: str, dst: str) -> torch.Tensor:
        key = (src, dst)
        if key not in self._maps:
            with torch.inference_mode(False):  # reusable outside inference mode (training)
                inverse_src = torch.empty_like(self.to_img[src])
                inverse_src[self.to_img[src]] = torch.arange(inverse_src.numel())
                self._maps[key] = inverse_src[self.to_img[dst]].to(self._device)
        return self._maps[key]


def _head_dim(d: int, device: torch.device, fused: bool = True) -> int:
    """Head dimension attention runs at: for the fused kernel SwinIR-S's 10 is padded with
    zeros to 12 on CPU (the fused CPU kernel measured 30% faster at 12 than at 10, all else
    equal) and to a multiple of 8 on CUDA (what its fused kernels want). Zero columns in q
    and k add nothing to q.k; zero columns in v give zero outputs that `proj` ignores. The
    spelt-out products (CPU training) run unpadded: 10 % faster in bf16 (0.94 vs 1.05 s a
    step of batch 12, one thread), the same in fp32."""
    if not fused:
        return d
    align = 8 if device.type == "cuda" else 4
    return -(-d // align) * align


def _cached(owner: torch.nn.Module, name: str, sources: list[torch.Tensor], build):
    """build() once per version of its source parameters (inference); every call where
    gradients must flow through it (training)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return build()
    key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in sources)
    hit = owner.__dict__.get(name)
    if hit is None or hit[0] != key:
        with torch.inference_mode(False), torch.no_grad():  # reusable outside inference mode
            hit = (key, build())
        owner.__dict__[name] = hit
    return hit[1]


def _position_bias(attn: WindowAttention) -> torch.Tensor:
    """(1, heads, N, N) relative-position bias, gathered from its table."""
    table, n = attn.relative_position_bias_table, attn.window_size ** 2

    def build() -> torch.Tensor:
        return table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0).contiguous()
    return _cached(attn, "_fast_bias", [table], build)


def _padded_projections(attn: WindowAttention, d_pad: int) -> tuple:
    """(qkv weight, qkv bias, proj weight) with every head's dimension zero-padded to d_pad."""
    qkv, proj, heads = attn.qkv, attn.proj, attn.num_heads
    c = proj.weight.shape[0]
    d = c // heads
    sources = [qkv.weight, proj.weight] + ([qkv.bias] if qkv.bias is not None else [])

    def build() -> tuple:
        w = F.pad(qkv.weight.view(3, heads, d, c), (0, 0, 0, d_pad - d)).reshape(3 * heads * d_pad, c)
        b = None if qkv.bias is None else F.pad(qkv.bias.view(3, heads, d), (0, d_pad - d)).reshape(-1)
        p = F.pad(proj.weight.view(c, heads, d), (0, d_pad - d)).reshape(c, heads * d_pad)
        return w, b, p
    return _cached(attn, f"_fast_padded{d_pad}", sources, build)


def _native_inference(x: torch.Tensor, heads: int, cells: int) -> bool:
    """Inference (or a frozen net) on the CPU that the compiled window attention kernel runs."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return window_attention_cpu.native_kernel_takes(x.device, dtype, heads, cells, x.shape[1] // heads)


def _spelt_out(device: torch.device, mask: torch.Tensor, drop: float) -> bool:
    """Whether `attend` spells attention out (training on the CPU) instead of the fused kernel."""
    return device.type == "cpu" and torch.is_grad_enabled() and (mask.requires_grad or drop > 0)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           dropout: torch.nn.Dropout | None = None) -> torch.Tensor:
    """softmax(q.k * scale + mask).v, `mask` additive (the learnt position bias, with the
    shifted-window mask where there is one) and broadcast over windows.

    The fused kernel (scaled_dot_product_attention: the windows x heads x N x N scores never
    stored) wherever it can serve: inference, and CUDA, whose memory-efficient kernel also
    differentiates the mask. In training on the CPU it is spelt out and autograd does the
    rest (SwinIR's and HAT's window attention train through `window_attention_cpu` instead;
    this serves attention dropout, torch.compile and HAT's cross-attention there): torch's
    fused CPU kernel has no gradient for the mask, and the hand-written backward
    around that kernel this path used before measured slower than plain autograd through
    the products, at every setting tried on SwinIR-S's shapes (AMD EPYC, avx512_bf16:
    a training step of batch 12 took 1.49 s fused vs 1.00 s spelt out in bf16 on one thread,
    2.14 vs 1.89 s in fp32; on two threads 1.07 vs 0.77 s and 1.41 vs 1.30 s). The price is
    memory: the probabilities are kept for the backward (BENCHMARKS.md states a step's peak)."""
    drop = dropout.p if dropout is not None and dropout.training else 0.0
    if _spelt_out(q.device, mask, drop):
        probs = ((q * scale) @ k.transpose(-2, -1) + mask).softmax(dim=-1)
        return (dropout(probs) if drop else probs) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=scale)


def _window_attention(attn: WindowAttention, x: torch.Tensor, cells: int, bias: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention within windows of `cells` consecutive tokens of `x` (L, C); `bias` is the
    (1, heads, N, N) position bias, `mask` None or the (m, 1, N, N) shifted-window mask of
    the last m windows (the border windows: `_Orders` puts them last)."""
    tokens, c = x.shape
    heads = attn.num_heads
    drop = attn.attn_drop.p if attn.training else 0.0
    spelt_out = _spelt_out(x.device, bias, drop)     # training on the CPU
    if not drop and not torch.compiler.is_compiling() and (spelt_out or _native_inference(x, heads, cells)):
        # by hand (window_attention_cpu says why); attention dropout and torch.compile (which
        # traces them) take the spelt-out products of `attend`. At inference on the CPU the
        # compiled kernel, where it is built, runs 2.5-3x faster than the fused kernel (SwinIR-S,
        # 128 windows, one thread: 2.9 vs 7.2 ms in fp32, 2.9 vs 8.8 ms in bf16)
        qkv = _linear(x, attn.qkv.weight, attn.qkv.bias)
        out = window_attention(qkv, bias, mask, heads, cells, attn.scale)
        return attn.proj_drop(_linear(out, attn.proj.weight, attn.proj.bias))
    unmasked = tokens // cells - (0 if mask is None else mask.shape[0])
    if mask is not None and unmasked:   # the interior windows take the bias alone, broadcast
        return torch.cat([_window_attention(attn, x[:unmasked * cells], cells, bias),
                          _window_attention(attn, x[unmasked * cells:], cells, bias, mask)])
    mask = bias if mask is None else bias + mask
    d = _head_dim(c // heads, x.device, fused=not spelt_out)
    if d == c // heads:
        qkv_w, qkv_b, proj_w = attn.qkv.weight, attn.qkv.bias, attn.proj.weight
    else:
        qkv_w, qkv_b, proj_w = _padded_projections(attn, d)
    qkv = _linear(x, qkv_w, qkv_b).view(tokens // cells, cells, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                          # (windows, heads, N, d) views
    out = attend(q, k, v, mask.to(q.dtype), attn.scale, attn.attn_drop)
    # the fused kernel writes (windows, N, heads, d) memory: this transpose is a view there
    out = _linear(out.transpose(1, 2).reshape(tokens, heads * d), proj_w, attn.proj.bias)
    return attn.proj_drop(out)


def _block(blk: SwinTransformerBlock, z: torch.Tensor, orders: _Orders, b: int) -> torch.Tensor:
    """One Swin block on tokens `z` already in its window order ("S" if shifted, else "U")."""
    n = orders.cells
    bias = _position_bias(blk.attn)
    segments = orders.segments(bool(blk.shift_size))
    if torch.is_grad_enabled() or blk.training:      # one call: the last run's mask covers the last windows
        z = _add_drop_path(blk, z, _window_attention(blk.attn, blk.norm1(z), n, bias, segments[-1][2]), b, n)
        return _add_drop_path(blk, z, _mlp(blk.mlp, blk.norm2(z)), b, n)
    # inference: jobs of a few hundred windows, each updated in place (z is this path's
    # own gather) so its intermediates stay in cache; the jobs run on worker threads
    jobs = [(a, min(a + _CHUNK_WINDOWS, stop), first, mask)
            for first, stop, mask in segments for a in range(first, stop, _CHUNK_WINDOWS)]

    def run(job: tuple) -> None:
        a, e, first, mask = job
        chunk = z[a * n:e * n]
        chunk += _window_attention(blk.attn, blk.norm1(chunk), n, bias, None if mask is None else mask[a - first:e - first])
        chunk += _mlp(blk.mlp, blk.norm2(chunk))

    _run_jobs(run, jobs, z.device)
    return z


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _workers(device: torch.device) -> ThreadPoolExecutor | None:
    """As many threads as torch's intra-op threads, each running whole jobs on one intra-op
    thread (None: run inline). On CPU this beats letting every op split itself across the
    cores: the fused attention kernel of torch 2.14 ran slower on 2 threads than on 1, and
    two single-threaded jobs keep their windows in their own core's cache (measured 1.2x
    on SwinIR-S, 2 cores)."""
    global _POOL
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        return None
    if _POOL is None or _POOL[0] != threads:
        if _POOL is not None:
            _POOL[1].shutdown(wait=False)
        _POOL = (threads, ThreadPoolExecutor(threads, thread_name_prefix="swinir-fast",
                                             initializer=torch.set_num_threads, initargs=(1,)))
    return _POOL[1]


def _forget_workers() -> None:   # a forked child has none of its parent's threads
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def _run_jobs(run, jobs: list, device: torch.device) -> None:
    """run(job) for every job, on the worker threads when there are several; grad, inference
    and autocast modes are per thread in torch, so the workers take the caller's."""
    pool = _workers(device) if len(jobs) > 1 else None
    if pool is None:
        for job in jobs:
            run(job)
        return
    inference = torch.is_inference_mode_enabled()
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type)

    def in_modes(job: tuple) -> None:
        with torch.inference_mode(inference), torch.no_grad(), \
                torch.autocast(device.type, dtype=dtype, enabled=autocast):
            run(job)

    for _ in pool.map(in_modes, jobs):
        pass


def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """The reference Mlp (fc1, GELU, drop, fc2, drop) with the fused linears."""
    if not isinstance(mlp.act, torch.nn.GELU) or mlp.act.approximate != "none":
        return mlp(x)
    return mlp.drop(_linear(mlp.drop(_linear(x, mlp.fc1.weight, mlp.fc1.bias, gelu=True)),
                            mlp.fc2.weight, mlp.fc2.bias))


def _add_drop_path(blk: SwinTransformerBlock, z: torch.Tensor, y: torch.Tensor, b: int, cells: int) -> torch.Tensor:
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
        orders = cached_orders(self, b, h, w, x.device, _Orders)
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
