"""The one inference function every caller uses: predict, stage 03 (OOF) and stage 04 (ensemble).

`predict_scene(nets, lr, tta=8, tile=...)` averages every net x TTA view in float32 and
rounds once at the end, so an ensemble is never the mean of already-rounded images:
    for each net: tiled_forward(tile, overlap) of tta_forward(views) of net
    mean over nets -> clip to [0, 1] -> * 255 -> round half to even -> uint8
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from pipeline.core.device import pick_device
from pipeline.core.errors import PipelineError
from pipeline.infer.memory import auto_tile
from pipeline.infer.precision import NAMES as PRECISIONS
from pipeline.infer.precision import choose, hardware, native, tf32
from pipeline.infer.tiling import tiled_forward
from pipeline.infer.tta import tta_forward, tta_views
from pipeline.nets.fast import use_fast_path


@functools.lru_cache(maxsize=None)
def _warn_emulated(precision: str, device_type: str) -> None:
    warnings.warn(f"{precision} on this {device_type} is emulated (no native {precision}), "
                  "far slower than fp32; use precision fp32 or auto here", stacklevel=3)


def prepare_for_inference(net: nn.Module, device: str | torch.device, precision: str = "fp32",
                          fast: bool = True) -> nn.Module:
    """Move `net` to `device` in eval mode, on its fast path (`fast`) or the reference one.

    In place (the same module is returned); idempotent, so nets shared by several calls
    are prepared once in effect.
    """
    device = torch.device(device)
    net = net.to(device).eval()
    if precision in ("bf16", "fp16") and not native(precision, hardware(device)):
        _warn_emulated(precision, device.type)
    return use_fast_path(net, fast)


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """bf16 or fp16 autocast on CPU or GPU for "bf16"/"fp16"; plain float32 for "fp32"
    (a resolved name: `precision.choose` turns "auto" into one of them)."""
    if precision not in PRECISIONS or precision == "auto":
        raise PipelineError(f"precision '{precision}' unknown (choose {', '.join(PRECISIONS)})")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype or torch.float32,
                        enabled=dtype is not None):
        yield


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 1x3xHxW in [0, 1]."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise PipelineError(f"inference: uint8 HxWx3 image expected, got {img.dtype} {img.shape}")
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)[None].float().div_(255.0)


def tensor_to_image(t: torch.Tensor) -> np.ndarray:
    """float 1x3xHxW (or 3xHxW) -> uint8 HxWx3: clip to [0, 1], * 255, round half to even.

    The single rounding step of the pipeline (torch.round rounds halves to even, as
    numpy does); predictions are only rounded here.
    """
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise PipelineError(f"inference: one image expected, got a batch of {t.shape[0]}")
        t = t[0]
    t = t.detach().float().cpu().clamp(0.0, 1.0).mul(255.0).round()
    return t.permute(1, 2, 0).to(torch.uint8).numpy()


def net_scale(nets: Sequence[nn.Module]) -> int:
    """The common `scale` of the nets; mixing scales is refused."""
    if not nets:
        raise PipelineError("inference: no net given")
    scales = {int(getattr(net, "scale", 0)) for net in nets}
    if len(scales) != 1 or 0 in scales:
        raise PipelineError(f"inference: nets must share one integer `scale` attribute, got {sorted(scales)}")
    return scales.pop()


def predict_float(nets: Sequence[nn.Module], x: torch.Tensor, *, tta: int = 1, tile: int = 0,
                  overlap: int = 16, batch: int = 8, device: str | torch.device | None = None,
                  precision: str = "fp32", fast: bool = True,
                  weights: Sequence[float] | None = None, memory_budget: int | None = None) -> torch.Tensor:
    """Mean over nets x TTA views of the SR of float NCHW `x`, float32 on the CPU, not rounded.

    The nets are moved to `device` and put in eval mode; `precision` "auto" is resolved for
    the nets on `device` (pipeline.infer.precision). `weights` (one per net, >= 0): a weighted mean
    over the nets instead (a blend of experiments); None: equal weights. `tile` 0: the whole
    scene where it fits `memory_budget` (bytes; None: the device's, pipeline.infer.memory),
    else tiles of the largest side that does.
    """
    scale = net_scale(nets)
    if weights is not None and (len(weights) != len(nets) or min(weights) < 0 or sum(weights) <= 0):
        raise PipelineError(f"inference: {len(nets)} nets need as many non-negative weights, got {list(weights)}")
    views = tta_views(tta)
    device = pick_device(device)
    precision = choose(precision, device, nn.ModuleList(nets), training=False).name
    x = x.to(device)
    total = None
    for net in nets:   # on `device`, eval mode, fast path (fast=False: the reference path); outside
        prepare_for_inference(net, device, precision, fast=fast)     # inference mode: the net may train later
    with torch.inference_mode(), autocast(precision, device), tf32(False):   # scored: full float32
        if tile == 0:
            tile = auto_tile(list(nets), tuple(x.shape[-2:]), len(views) * x.shape[0], batch, scale, device,
                             overlap, memory_budget)
        for k, net in enumerate(nets):
            def views_of_net(t: torch.Tensor, net: nn.Module = net) -> torch.Tensor:
                return tta_forward(net, t, views, batch)

            out = tiled_forward(views_of_net, x, scale, tile, overlap, batch).float()
            if weights is not None:
                out = out * float(weights[k])
            total = out if total is None else total + out
    return (total / (len(nets) if weights is None else float(sum(weights)))).cpu()


def predict_scene(nets: Sequence[nn.Module], lr: np.ndarray, *, tta: int = 1, tile: int = 0,
                  overlap: int = 16, batch: int = 8, device: str | torch.device | None = None,
                  precision: str = "fp32", fast: bool = True,
                  weights: Sequence[float] | None = None, memory_budget: int | None = None) -> np.ndarray:
    """Super-resolve one uint8 HxWx3 scene with an ensemble of nets: uint8 (H*s)x(W*s)x3.

    Every net x TTA view is averaged in float32 before the one rounding (see
    tensor_to_image). `tta`: 1, 2, 4 or 8 dihedral views; `tile` > 0: LR tiles of that
    side with `overlap` (feathered blend), 0: the whole scene where it fits `memory_budget`;
    `batch`: views/tiles per forward pass; `precision`: "fp32", "bf16", "fp16" (autocast, also
    on CPU) or "auto" (pipeline.infer.precision); `fast`: the nets' optimised paths
    (pipeline.nets.fast; False: their reference paths); `weights`: one per net for a weighted
    mean (a blend), None for equal weights.
    """
    sr = predict_float(nets, image_to_tensor(lr), tta=tta, tile=tile, overlap=overlap, batch=batch,
                       device=device, precision=precision, fast=fast, weights=weights,
                       memory_budget=memory_budget)
    return tensor_to_image(sr)
