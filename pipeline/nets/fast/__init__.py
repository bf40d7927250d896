"""The nets' fast paths, switched on in one place: `use_fast_path(net)`.

A fast path changes how a net computes, never what: the weights, the state_dict keys and the
outputs (within float rounding, tests/test_fast_paths.py) stay those of the reference net.
- SwinIR and HAT switch to `FastSwinIR` / `FastHAT` (`swinir.py`, `hat.py`): tokens kept in
  window order, torch's fused attention, window orders cached per input size (`windows.py`).
- Every net's convolution weights go channels-last, which oneDNN (CPU) and cuDNN (GPU) run
  faster; a conv given a channels-last weight returns channels-last activations, so the
  layout carries through the net without copies.
- Under bf16 autocast the convolutions at a net's two ends (each net's `edge_convs()`: the
  ones that read the image or write it) compute in float32: there bf16's 8-bit mantissa
  would quantise the image itself (steps of 1/256 near 1.0, a grey level), which measurably
  moved the competition SSIM. They are a few percent of the work.
Inference (`pipeline.infer`) and training (`train.fast`) take the same paths; `fast=False`
puts a net back on its reference path (the benchmarks' reference rows).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.nets import hat as reference_hat
from pipeline.nets import swinir as reference_swinir
from pipeline.nets.fast import hat, swinir


class Fp32Conv2d(nn.Conv2d):
    """A Conv2d computing in float32 even inside autocast (same parameters and keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def edge_convs(net: nn.Module) -> list[nn.Conv2d]:
    """The convolutions at the ends of every net inside `net` that stay float32 under autocast."""
    return [conv for m in net.modules() if hasattr(m, "edge_convs") for conv in m.edge_convs()]


def use_fast_path(net: nn.Module, fast: bool = True) -> nn.Module:
    """Every SwinIR and HAT inside `net` on its fast path (or back), in place, with channels-last
    convolutions and fp32 edge convolutions; the fast paths train too (autograd). Idempotent."""
    layout = torch.channels_last if fast else torch.contiguous_format
    for module in net.modules():   # a SwinIR or HAT may also sit inside a wrapper
        if isinstance(module, reference_swinir.SwinIR):
            swinir.make_fast(module) if fast else swinir.make_reference(module)
        elif isinstance(module, reference_hat.HAT):
            hat.make_fast(module) if fast else hat.make_reference(module)
        elif isinstance(module, nn.Conv2d):
            # convolution weights only: buffers and other parameters keep their plain strides
            # (DDP's per-step broadcast copies a buffer that is alone of its dtype, like SwinIR's
            # (1, 3, 1, 1) `mean`, back onto itself through a plain view, and torch refuses
            # that for a channels-last one)
            module.to(memory_format=layout)
    for conv in edge_convs(net):
        conv.__class__ = Fp32Conv2d if fast else nn.Conv2d
    return net
