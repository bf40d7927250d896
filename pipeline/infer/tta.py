"""Test-time augmentation: the 8 dihedral views (flips and 90-degree rotations) of NCHW images.

View k = (k >= 4: mirror left-right first) then (k % 4) quarter turns. Every view has an
exact inverse, so a net's outputs on all views can be brought back and averaged in float
(rounding happens once, later, in inference.predict_scene).
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.core.errors import PipelineError

N_DIHEDRAL = 8
# how many views each allowed TTA setting uses: identity / + mirror / 4 rotations / all 8
_VIEWS = {1: [0], 2: [0, 4], 4: [0, 1, 2, 3], 8: list(range(N_DIHEDRAL))}
TTA_CHOICES = sorted(_VIEWS)


def tta_views(n: int) -> list[int]:
    """The view indices used by `--tta n` (1, 2, 4 or 8)."""
    if n not in _VIEWS:
        raise PipelineError(f"tta: {n} views asked; choose one of {', '.join(map(str, _VIEWS))}")
    return list(_VIEWS[n])


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """View k of an NCHW batch."""
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1))


def undo_dihedral(y: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `dihedral(., k)`: undo the rotation, then the mirror."""
    y = torch.rot90(y, -(k % 4), dims=(-2, -1))
    if k >= 4:
        y = torch.flip(y, dims=(-1,))
    return y


def tta_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, views: list[int],
                batch: int = 8) -> torch.Tensor:
    """Mean over `views` of undo(fn(view(x))), in float32.

    Views that share a shape (all of them for square inputs; two groups, by parity of the
    quarter turns, for non-square ones) are stacked along the batch and fed to `fn` at
    most `batch` images at a time.
    """
    if batch < 1:
        raise PipelineError(f"tta: batch must be >= 1, got {batch}")
    n = x.shape[0]
    total = None
    groups: dict[tuple[int, int], list[int]] = {}
    for k in views:
        groups.setdefault(tuple(dihedral(x[:1, :1, :, :], k).shape[-2:]), []).append(k)
    for ks in groups.values():
        stacked = torch.cat([dihedral(x, k) for k in ks])
        out = torch.cat([fn(chunk).float() for chunk in torch.split(stacked, batch)])
        for i, k in enumerate(ks):
            back = undo_dihedral(out[i * n:(i + 1) * n], k)
            total = back if total is None else total + back
    return total / len(views)
