"""Switching a transformer between its reference class and its optimised subclass, in place.

A fast path (`swinir.FastSwinIR`, `hat.FastHAT`) is a subclass of the reference
net that only replaces `forward_features` and keeps its per-input-size index caches in
`_fast_orders`; switching is a change of `__class__`, so weights and keys never move.
`reorder` moves tokens between the window orders that those caches hold.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn

ORDERS_CACHE = "_fast_orders"   # where a fast path keeps its cached window orders
CACHED_SIZES = 4                # window orders kept for this many (batch, H, W, device)
_ORDERS_LOCK = threading.Lock()  # a batch's shards (pipeline.accel) run the net on several threads


def cached_orders(net: nn.Module, b: int, h: int, w: int, device: torch.device, build: Callable):
    """The net's window orders of a (b, h, w) map on `device`: `build(net, b, h, w, device)`
    once per size, the last CACHED_SIZES sizes kept (tiles and TTA views reuse them)."""
    with _ORDERS_LOCK:
        cache = net.__dict__.setdefault(ORDERS_CACHE, OrderedDict())
        key = (b, h, w, str(device))
        if key in cache:
            cache.move_to_end(key)
        else:
            if len(cache) >= CACHED_SIZES:
                cache.popitem(last=False)
            with torch.inference_mode(False):  # reusable outside inference mode (training)
                cache[key] = build(net, b, h, w, device)
        return cache[key]


def to_fast(net: nn.Module, fast_class: type) -> nn.Module:
    """`net` (an instance of fast_class's reference base) on the fast path."""
    base = fast_class.__bases__[0]
    if not isinstance(net, base):
        raise TypeError(f"make_fast: a {base.__name__} expected, got {type(net).__name__}")
    net.__class__ = fast_class
    return net


def to_reference(net: nn.Module, fast_class: type) -> nn.Module:
    """`net` back on the reference path, its fast-path caches dropped."""
    if isinstance(net, fast_class):
        net.__class__ = fast_class.__bases__[0]
        net.__dict__.pop(ORDERS_CACHE, None)
    return net


class _Reorder(torch.autograd.Function):
    """x[index] along tokens, whose gradient is the gather through the inverse permutation:
    autograd's index_select backward scatter-adds instead, which cannot know the rows are a
    permutation (a gather is several times faster)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.inverse = inverse
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(0, ctx.inverse), None, None


def reorder(z: torch.Tensor, orders, src: str, dst: str) -> torch.Tensor:
    """Tokens in order `src` -> order `dst` (`orders.index(src, dst)`: a permutation of the rows)."""
    if not torch.is_grad_enabled() or not z.requires_grad:
        return z.index_select(0, orders.index(src, dst))
    return _Reorder.apply(z, orders.index(src, dst), orders.index(dst, src))
