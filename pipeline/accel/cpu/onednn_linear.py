"""`linear(x, weight, bias, gelu)`: F.linear (then exact GELU), through oneDNN on the CPU in fp32.

The token-matrix nets' linears (SwinIR's and HAT's qkv, proj and MLP: (tokens x 60) by
(60 x 180) and the like) are most of their training FLOPs. On the CPU, fp32 F.linear and
its gradients go to the BLAS torch was built with (MKL), while oneDNN's own kernels, the
ones torch uses for convolutions and bf16 matrix products, ran these shapes 2-3x faster on
the AMD EPYC this was measured on (one thread: a (12288 x 60)(60 x 180) product 3.8 ms in
MKL, 1.4 ms in oneDNN; a 1024^3 product 90 vs 210 GFLOP/s). So, in fp32 on the CPU:
- inference: oneDNN's fused linear, the kernel torch.compile's CPU backend uses, bias (and
  GELU) applied inside the product instead of in extra passes over memory;
- training: the product and the gradient of x through oneDNN (dx = dy.W is a linear with
  the transposed weight), the weight's gradient (dy^T.x over all tokens) through oneDNN
  on transposed views (20-40 % faster than MKL there). The numbers are fp32 products
  summed in another order: equal within float rounding (tests/test_fast_paths.py).
Everywhere else (CUDA, autocast, bf16/fp16 tensors, torch.compile) it is F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """x.weight^T + bias (then GELU) in one oneDNN call."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                              "none" if gelu else "")


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _onednn(dy, weight.t().contiguous(), None) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            # dw = dy^T.x; oneDNN copies a transposed input (its first operand) to contiguous but
            # reads a transposed weight in place, so the wider of the two goes second
            # (qkv's (12288 x 180) gradient: 3.3 -> 1.9 ms a product, one thread)
            dw = (_onednn(x.t(), dy.t(), None).t().contiguous() if dy.shape[1] >= x.shape[1]
                  else _onednn(dy.t(), x.t(), None))
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _fp32_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 2
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias), then exact GELU if `gelu`; x is (tokens, features)."""
    if _fp32_cpu(x, weight):
        if not torch.is_grad_enabled():
            return _onednn(x.contiguous(), weight, bias, gelu)
        y = _OneDnnLinear.apply(x.contiguous(), weight, bias)
    else:
        y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y
