"""Validation: the held-out fold's full scenes scored with the competition SSIM, as submitted."""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.core.metrics import ssim_torch
from pipeline.data import patches as data
from pipeline.infer.precision import tf32
from pipeline.infer.tiling import tiled_forward
from pipeline.train.distributed import Dist


@torch.no_grad()
def validate(net: nn.Module, scenes: list[data.Scene], d: Dist, tile: int, overlap: int) -> float:
    """Mean competition SSIM over the scenes, outputs rounded to uint8 levels as submitted.

    Full float32 always (the figure must be the score, not a bf16 or TF32 approximation);
    ranks score every world-th scene and the sums are combined.
    """
    was_training = net.training
    net.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with tf32(False):
        for scene in scenes[d.rank::d.world]:
            lr, hr = data.scene_tensors(scene)
            sr = tiled_forward(net, data.to_float(lr, d.device), net.scale, tile, overlap)
            sr = (sr.clamp(0, 1) * 255).round()
            total += torch.tensor([float(ssim_torch(sr.double(), hr.to(d.device).double(), data_range=255.0)), 1.0])
    net.train(was_training)
    total = d.all_sum(total)
    return float(total[0] / total[1])
