"""Fast inference paths, switched on in one place: `prepare_for_inference`.

`inference.predict_float` (so `predict`, stage 03 and stage 04) passes every net through
`prepare_for_inference(net, device, precision)` before use. It changes how a net
computes, never what: the weights, the state_dict keys and the outputs (within float
rounding, see tests/test_fast_paths.py) stay those of the reference path.
- SwinIR: switched to the optimised `FastSwinIR` (pipeline/nets/swinir_fast.py).
- HAT: switched to the optimised `FastHAT` (pipeline/nets/hat_fast.py).
- every net: convolution weights in channels-last layout, which oneDNN (CPU) and cuDNN
  (GPU) run faster; a conv given a channels-last weight returns channels-last
  activations, so the layout carries through the net without copies.
- bf16: autocast itself is the caller's (`inference.autocast`). The convolutions at a
  net's two ends (the first one, and those from the last skip connection to the image)
  compute in float32 even under autocast: there bf16's 8-bit mantissa would quantise the
  image itself (steps of 1/256 near 1.0, a grey level), which measurably moved RLFN's
  competition SSIM (by up to 7e-4 on aerial tiles; 3.6e-4 with fp32 ends). They are a
  few percent of the work. A CPU without native bf16 (AVX512-BF16 or AMX) gets a
  warning: it emulates bf16 far slower than fp32.
`fast=False` puts a net back on the reference path (the benchmarks' reference rows).
Training takes the same paths (`prepare_for_training`, stage 02's `train.fast`).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn

from pipeline.accel.cpu import native as window_attention_native
from pipeline.accel.cpu.window_attention import native_kernel_takes
from pipeline.core.precision import hardware, native
from pipeline.nets.fast import hat as hat_fast
from pipeline.nets.fast.swinir import make_fast, make_reference
from pipeline.nets.hat import HAT
from pipeline.nets.rlfn import RLFN
from pipeline.nets.swinir import SwinIR, WindowAttention


class Fp32Conv2d(nn.Conv2d):
    """A Conv2d computing in float32 even inside autocast (same parameters and keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def edge_convs(net: nn.Module) -> list[nn.Conv2d]:
    """The convolutions at the ends of a net that stay float32 under bf16 autocast."""
    def convs(*modules: nn.Module | None) -> list[nn.Conv2d]:
        return [c for m in modules if m is not None for c in m.modules() if isinstance(c, nn.Conv2d)]

    found = []
    for m in net.modules():
        if isinstance(m, RLFN):      # shallow features, the skip's conv and the upsampler
            found += convs(m.conv_1, m.conv_2, m.upsampler)
        elif isinstance(m, SwinIR):  # shallow features, the conv after the body, the image's conv
            last = m.upsample if m.upsampler == "pixelshuffledirect" else getattr(m, "conv_last", None)
            found += convs(m.conv_first, m.conv_after_body, last)
        elif isinstance(m, HAT):     # the same three places
            found += convs(m.conv_first, m.conv_after_body, m.conv_last)
    return found


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


def prepare_for_training(net: nn.Module, fast: bool = True) -> nn.Module:
    """The same fast paths for training (stage 02, `train.fast`), in place: SwinIR's and HAT's
    window orders with autograd (on the CPU: window attention by hand, `window_attention_cpu`, through
    a compiled kernel where a C compiler exists;
    fp32 linears through oneDNN, `onednn_linear`), channels-last convolutions (weights, so the
    gradients and the optimizer state too), fp32 edge convolutions under autocast. Call it before the EMA copy
    and the optimizer are made, so they share the layout."""
    return use_fast_path(net, fast)


def training_window_attention(net: nn.Module, dtype: torch.dtype, threads: int) -> str | None:
    """What CPU training on the fast path computes the window attention of `net`'s SwinIR or
    HAT blocks with, and why, in one line (None for a net without them): the compiled kernel
    (`window_attention_native`) or torch's products. Loads the kernel, building it if needed:
    call it before a step's shard processes fork, so they inherit it."""
    shapes = sorted({(m.window_size ** 2, m.num_heads, m.qkv.in_features // m.num_heads)
                     for m in net.modules() if isinstance(m, WindowAttention)})
    if not shapes:
        return None
    cpu = torch.device("cpu")
    if all(native_kernel_takes(cpu, dtype, heads, cells, d, threads) for cells, heads, d in shapes):
        return window_attention_native.status()
    # why not: no kernel, the threads, or (some of) the net's shapes
    if window_attention_native.kernel() is None:
        return window_attention_native.status()
    if threads > 1:
        return f"torch products ({threads} torch threads a shard; the native kernel trains on one)"
    slower = [f"{cells}-token windows, heads of {d}" for cells, heads, d in shapes
              if not native_kernel_takes(cpu, dtype, heads, cells, d)]
    return (f"torch products for {', '.join(slower)} in {str(dtype).removeprefix('torch.')} "
            f"(measured faster there than the native kernel)" + ("; the native kernel for the rest"
                                                                 if len(slower) < len(shapes) else ""))


def use_fast_path(net: nn.Module, fast: bool = True) -> nn.Module:
    """Every SwinIR and HAT inside `net` on its fast path (or back), in place, with channels-last
    convolutions and fp32 edge convolutions; the fast paths train too (autograd)."""
    layout = torch.channels_last if fast else torch.contiguous_format
    for module in net.modules():   # a SwinIR or HAT may also sit inside a wrapper
        if isinstance(module, SwinIR):
            make_fast(module) if fast else make_reference(module)
        elif isinstance(module, HAT):
            hat_fast.make_fast(module) if fast else hat_fast.make_reference(module)
        elif isinstance(module, nn.Conv2d):
            # convolution weights only: buffers and other parameters keep their plain strides
            # (DDP's per-step broadcast copies a buffer that is alone of its dtype, like SwinIR's
            # (1, 3, 1, 1) `mean`, back onto itself through a plain view, and torch refuses
            # that for a channels-last one)
            module.to(memory_format=layout)
    for conv in edge_convs(net):
        conv.__class__ = Fp32Conv2d if fast else nn.Conv2d
    return net
