"""Switching a transformer between its reference class and its optimised subclass, in place.

A fast path (`swinir_fast.FastSwinIR`, `hat_fast.FastHAT`) is a subclass of the reference
net that only replaces `forward_features` and keeps its per-input-size index caches in
`_fast_orders`; switching is a change of `__class__`, so weights and keys never move.
"""
from __future__ import annotations

import torch.nn as nn

ORDERS_CACHE = "_fast_orders"   # where a fast path keeps its cached window orders


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
