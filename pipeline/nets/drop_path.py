"""Stochastic depth (DropPath) whose random draws can come from a generator per thread.

timm's DropPath draws its keep mask from torch's global generator. Training with the batch
split across threads (pipeline/accel/cpu/shards.py) needs each thread to draw from a generator
of its own, seeded in a fixed order: two threads drawing from the one global stream take
their numbers in whatever order they happen to run, and a run would no longer be a
function of its seed. `thread_generator(g)` sets the calling thread's generator; without
one the global generator is used, so this DropPath draws exactly what timm's does.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

_local = threading.local()


@contextmanager
def thread_generator(generator: torch.Generator | None) -> Iterator[None]:
    """Draw this thread's drop-path masks from `generator` inside the block."""
    previous = getattr(_local, "generator", None)
    _local.generator = generator
    try:
        yield
    finally:
        _local.generator = previous


def keep_mask(like: torch.Tensor, shape: tuple[int, ...], keep: float, scale_by_keep: bool = True) -> torch.Tensor:
    """A 0/1 mask of `shape` (1 with probability `keep`), divided by `keep` when
    `scale_by_keep` (the kept paths carry the expected sum), as timm's drop_path draws it."""
    mask = like.new_empty(shape).bernoulli_(keep, generator=getattr(_local, "generator", None))
    if keep > 0 and scale_by_keep:
        mask.div_(keep)
    return mask


class DropPath(nn.Module):
    """Drop whole samples' residual paths in training (timm's DropPath: same attributes,
    same draws when no thread generator is set)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * keep_mask(x, shape, 1.0 - self.drop_prob, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"
