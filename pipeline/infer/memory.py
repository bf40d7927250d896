"""How large a piece of a scene a forward pass can take within memory: automatic tiling.

A whole scene through a net keeps its feature maps at the scene's size: RLFN holds about
1.6 KB per low-res pixel (a 1500x2000 scene takes ~5 GB of RAM without TTA), a window
transformer several times that. So `predict_scene` with `tile=0` ("whole scene") asks
`auto_tile` first: when the scene (times the images a forward takes at once) would need more
than the memory budget, it is run in tiles of the largest side that fits, with the seamless
tiling that exists (`pipeline.infer.tiling`); otherwise it runs whole, as before.

- The need: `bytes_per_pixel(net)`, the largest activation of a forward on a 64x64 probe per
  low-res pixel, times `SAFETY` (a forward keeps several maps of that size alive at once:
  RLFN's and HAT-S's measured peaks are 8-9 of them), plus the float32 outputs TTA holds.
- The budget (`memory_budget`): on CUDA 80 % of the GPU memory free now; on the CPU half of
  the RAM available now; `SR_MEMORY_BUDGET_MB` sets it by hand.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

PROBE = 64             # LR side of the probe (a multiple of SwinIR's and HAT's windows)
SAFETY = 9.0           # activations alive at once, in units of the largest one
MIN_TILE = 64
TILE_STEP = 16
BUDGET_ENV = "SR_MEMORY_BUDGET_MB"


def bytes_per_pixel(net: nn.Module, device: torch.device) -> float:
    """Peak bytes a forward of `net` keeps per low-res pixel (estimated; cached on the net)."""
    cached = net.__dict__.get("_bytes_per_pixel")
    if cached is not None and cached[0] == device:
        return cached[1]
    largest = [0]

    def hook(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())
    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 3, PROBE, PROBE, device=device))
    finally:
        for h in handles:
            h.remove()
    value = SAFETY * largest[0] / PROBE ** 2
    net.__dict__["_bytes_per_pixel"] = (device, value)
    return value


def memory_budget(device: torch.device) -> int:
    """Bytes a forward pass may take: SR_MEMORY_BUDGET_MB, else 80 % of the GPU's free
    memory (CUDA) or half the RAM available (CPU)."""
    if os.environ.get(BUDGET_ENV):
        return int(float(os.environ[BUDGET_ENV]) * 2 ** 20)
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) // 2


def auto_tile(nets: list[nn.Module], lr_shape: tuple[int, int], views: int, batch: int, scale: int,
              device: torch.device, overlap: int, budget: int | None = None) -> int:
    """0 (the whole scene) when it fits the budget, else the largest tile side that does."""
    per_pixel = max(bytes_per_pixel(net, device) for net in nets)
    hr_bytes = 3 * scale ** 2 * 4                       # a float32 output per low-res pixel
    budget = memory_budget(device) if budget is None else budget
    h, w = lr_shape
    if (per_pixel * min(batch, views) + (views + 2) * hr_bytes) * h * w <= budget:
        return 0
    # tiled: a pass takes `batch` tiles with all their views' outputs; the blended output and
    # its weights stay scene-sized
    room = budget - 2 * hr_bytes * h * w
    side = int((max(room, 0) / (batch * (per_pixel + views * hr_bytes))) ** 0.5) // TILE_STEP * TILE_STEP
    return max(side, MIN_TILE, 2 * overlap + TILE_STEP)
