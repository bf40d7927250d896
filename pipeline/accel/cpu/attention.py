"""SwinIR's window attention at inference on the CPU through a compiled kernel (`NativeWindowAttention`).

softmax(q.k * scale + bias + mask).v per window and head, read straight from the qkv
projection's output and written as the output projection's input, by `kernels/window_attention.c`
(built on first use by `native.py`). Each window-head's scores stay in the core's first-level
cache from the first product to the last, where torch's fused kernel, built for larger
products, passes over memory between them: with SwinIR-S's 64-token windows and 10-channel
heads the kernel is faster (docs/speed.md). It serves windows of up to 64 tokens (a multiple
of 16) with heads of up to 32 channels in float32, 16 in bfloat16; elsewhere (HAT's 256-token
windows) torch's fused kernel stays faster.
"""
from __future__ import annotations

import ctypes

import torch

from pipeline.accel.cpu import native

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _address(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def native_forward(qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None, heads: int,
                   cells: int, scale: float) -> torch.Tensor:
    """The compiled kernel's attention (see `NativeWindowAttention.__call__`)."""
    qkv = qkv.contiguous()
    tokens, windows, d = qkv.shape[0], qkv.shape[0] // cells, qkv.shape[1] // (3 * heads)
    bias_t = bias.detach().float().reshape(heads, cells, cells).transpose(1, 2).contiguous()
    masked = 0 if mask is None else mask.shape[0]
    mask_t = None if mask is None else mask.float().reshape(masked, cells, cells).transpose(1, 2).contiguous()
    out = qkv.new_empty(tokens, heads * d)
    status = getattr(native.kernel(), f"window_attention_forward_{_SUFFIX[qkv.dtype]}")(
        _address(qkv), _address(bias_t), None if mask_t is None else _address(mask_t), masked,
        windows, heads, cells, d, scale, _address(out), None)
    if status != 0:
        raise MemoryError("window attention kernel: out of memory for its scratch buffers")
    return out


class NativeWindowAttention:
    """`pipeline.nets.fast.windows.AttentionKernel` through the compiled kernel."""

    def takes(self, device: torch.device, dtype: torch.dtype, heads: int, cells: int, d: int) -> bool:
        return (device.type == "cpu" and cells % 16 == 0 and cells <= 64
                and (dtype == torch.float32 and d <= 32 or dtype == torch.bfloat16 and d <= 16)
                and native.kernel() is not None)

    def __call__(self, qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None, heads: int,
                 cells: int, scale: float) -> torch.Tensor:
        """qkv: (tokens, 3 * heads * d), q, k, v then heads then d, the tokens of a window
        consecutive; bias: (1, heads, cells, cells); mask: None or (m, 1, cells, cells) for the
        last m windows; returns (tokens, heads * d)."""
        return native_forward(qkv, bias, mask, heads, cells, scale)
