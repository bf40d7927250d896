"""Window attention for training on the CPU: forward and backward by hand, a few windows at a time.

`window_attention(qkv, bias, mask, heads, cells, scale)` is the attention of SwinIR's (and
HAT's) windows, softmax(q.k * scale + bias + mask).v per window and head, taking the qkv
projection's output and returning the input of `proj`, both (tokens, channels) with the
tokens of one window consecutive. It computes what autograd through the spelt-out products
computes (tests/test_fast_paths.py holds it to the reference's gradients), faster, two ways:

Through the compiled kernel (`kernels/window_attention.c`, built on first use by
`window_attention_native`) where it is built and measured faster (`native_kernel_takes`), in
training on one torch thread (a step's shards): each window-head's scores stay in cache from
the first product to the last. Round 8, SwinIR-S (AMD EPYC, avx512_bf16, no AMX): one block's
attention forward + backward, 192 windows, one thread, 21 -> 12 ms in fp32, 14 -> 11 ms in
bf16 (the kernel itself 9.6 and 7.0 ms); a training step of batch 24 on 2 shards in processes
1.20 -> 0.93 s in fp32, 0.90 -> 0.68 s in bf16 (one bench run, rows in turn).

Elsewhere (no C compiler, several torch threads, HAT's 16x16 windows, `SR_NATIVE_KERNELS=0`), through torch's
batched products in chunks of windows, faster than autograd for two reasons measured on
SwinIR-S (64-token windows, 6 heads of 10 channels; AMD EPYC, one thread):
- Cache. Spelt out, every product, the softmax and their gradients each make a pass over the
  whole block's (windows x heads x 64 x 64) scores: 19 MB for a shard of 12 crops, far past
  the core's cache, so those passes wait on memory (q.kT of 1152 windows x heads: 2.5 ms at
  once, 1.25 ms in chunks of 96). Here all passes over one chunk of windows (about 1.5 MB of
  scores) run back to back while it is in cache; the probabilities are written once, for the
  backward, as autograd keeps them too.
- Layout. For a head dimension of 10 a (64 x 64)(64 x 10) product runs 2-3x faster when it
  writes its result transposed, (10 x 64), so P.v and the gradients of q, k and v are
  computed as their transposes and copied into place (in cache). The split of qkv into q, k
  and v batches is made a chunk at a time as well, so the products read it from cache.
The forward + backward of an unshifted SwinIR-S block's attention: 37-40 ms -> 22 ms in fp32,
16-19 ms -> 15 ms in bf16 (scratch measurement, batch 12); a whole training step of batch 24
on 2 shards 2.23 -> 1.87 s in fp32, 0.99 -> 0.92 s in bf16 (BENCHMARKS.md, training round 3).
Round 5: splitting and merging per chunk instead of once for the whole block, and the bf16
bias gradient summed in bf16: 22.6 -> 20.4 ms in fp32, 14.6 -> 13.7 ms in bf16 (medians of 15).
Round 7: a shifted block is one call, its mask covering the last (border) windows, instead of
interior and border segments joined by a cat, and the mask is cast to the scores' dtype once a
call: a SwinIR-S step of 2 shards in processes 1.046 -> 0.988 s in bf16, 1.395 -> 1.332 s in fp32.
Attention dropout is not here (`swinir_fast.attend` spells it out for autograd when a net has it).
"""
from __future__ import annotations

import ctypes
import itertools

import torch
from torch.autograd.function import once_differentiable

from pipeline.accel.cpu import native

# scores per chunk: 1.5 MiB, 16 SwinIR-S windows in fp32, 32 in bf16. A whole SwinIR-S step (2 shards)
# ran fastest with it: fp32 1.41 / 1.36 / 1.50 s, bf16 0.97 / 0.94 / 0.96 s at 0.75 / 1.5 / 3 MiB
_CHUNK_BYTES = 3 << 19


def _chunk_windows(windows: int, heads: int, cells: int, itemsize: int) -> int:
    """Windows a chunk: _CHUNK_BYTES of scores."""
    return min(windows, max(1, _CHUNK_BYTES // (heads * cells * cells * itemsize)))


def _masks(mask: torch.Tensor | None, windows: int, step: int) -> list:
    """Per chunk of `step` windows: None, or (its first masked window, counted from the
    chunk's start; the mask rows of its masked windows). `mask` covers the last windows."""
    first = windows - (0 if mask is None else mask.shape[0])
    return [None if min(a + step, windows) <= first else
            (max(a, first) - a, mask[max(a, first) - first:min(a + step, windows) - first])
            for a in range(0, windows, step)]


def _scratch(windows: int, step: int, whole: tuple, cut) -> itertools.chain:
    """The loop's scratch views chunk by chunk: `whole` for each chunk of `step` windows, then
    `cut(w)` for a last, shorter chunk of w windows."""
    full, last = divmod(windows, step)
    return itertools.chain(itertools.repeat(whole, full), [cut(last)] if last else [])


class _WindowAttention(torch.autograd.Function):
    """The loops take every operand's chunk views from one `split` each (the scratch buffers'
    from `_scratch`): a batch's shards run on threads that share Python's lock, and these loops
    held about half of its samples in a SwinIR-S step (py-spy --gil), ~25 % fewer since."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None,
                heads: int, cells: int, scale: float) -> torch.Tensor:
        tokens, windows = qkv.shape[0], qkv.shape[0] // cells
        d = qkv.shape[1] // (3 * heads)
        with torch.autocast(qkv.device.type, enabled=False):   # everything in qkv's dtype, as autocast runs it
            step = _chunk_windows(windows, heads, cells, qkv.element_size())
            rows = step * heads
            # q, k, v as (windows * heads, cells, d) batches, split from qkv a chunk at a time
            split = qkv.new_empty(3, windows, heads, cells, d)
            q, k, v = split.view(3, -1, cells, d).unbind(0)
            probs = qkv.new_empty(windows * heads, cells, cells)
            out = qkv.new_empty(windows, cells, heads, d)
            out_t = qkv.new_empty(step, heads, d, cells)          # a chunk's P.v, transposed
            out_t_rows, out_t_tokens = out_t.view(rows, d, cells), out_t.permute(0, 3, 1, 2)
            # the bias repeated for a chunk's windows, once: baddbmm starts every chunk's scores from it
            bias_rows = bias.to(qkv.dtype).expand(step, heads, cells, cells).reshape(rows, cells, cells)
            # the mask in the scores' dtype, once: a float32 mask added into bf16 scores is cast
            # chunk by chunk (a 32-window chunk's add: 0.18 ms, against 0.11 ms in bf16)
            mask = None if mask is None else mask.to(qkv.dtype)
            scratch = _scratch(windows, step, (bias_rows, out_t_rows, out_t_tokens),
                               lambda w: (bias_rows[:w * heads], out_t_rows[:w * heads], out_t_tokens[:w]))
            chunks = zip(qkv.view(windows, cells, 3, heads, d).permute(2, 0, 3, 1, 4).split(step, 1),
                         split.split(step, 1), q.split(rows), k.transpose(1, 2).split(rows),
                         v.transpose(1, 2).split(rows), probs.split(rows), probs.transpose(1, 2).split(rows),
                         out.split(step), _masks(mask, windows, step), scratch)
            for qkv_c, split_c, q_c, k_t, v_t, p_c, p_t, out_c, mask_c, (bias_c, out_t_c, out_t_tokens_c) in chunks:
                split_c.copy_(qkv_c)
                scores = torch.baddbmm(bias_c, q_c, k_t, alpha=scale)
                if mask_c is not None:
                    masked_from, mask_rows = mask_c
                    scores.view(-1, heads, cells, cells)[masked_from:].add_(mask_rows)
                torch._softmax(scores, -1, False, out=p_c)
                torch.bmm(v_t, p_t, out=out_t_c)
                out_c.copy_(out_t_tokens_c)
        ctx.save_for_backward(q, k, v, probs)
        ctx.shape = (windows, heads, cells, d, scale, step)
        ctx.bias_dtype = bias.dtype
        return out.view(tokens, heads * d)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: torch.Tensor):
        q, k, v, probs = ctx.saved_tensors
        windows, heads, cells, d, scale, step = ctx.shape
        with torch.autocast(q.device.type, enabled=False):
            rows = step * heads                                     # the forward's chunks
            d_qkv = q.new_empty(windows, cells, 3, heads, d)
            d_t = q.new_empty(3, step, heads, d, cells)             # a chunk's dq^T, dk^T, dv^T
            d_q_t, d_k_t, d_v_t = d_t.view(3, rows, d, cells).unbind(0)
            d_t_tokens = d_t.permute(1, 4, 0, 2, 3)                 # as (windows, cells, 3, heads, d)
            d_bias = probs.new_zeros(heads, cells, cells, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            scratch = _scratch(windows, step, (d_q_t, d_k_t, d_v_t, d_t_tokens),
                               lambda w: (d_q_t[:w * heads], d_k_t[:w * heads], d_v_t[:w * heads], d_t_tokens[:w]))
            chunks = zip(d_out.view(windows, cells, heads, d).transpose(1, 2).split(step), probs.split(rows),
                         q.transpose(1, 2).split(rows), k.transpose(1, 2).split(rows),
                         v.transpose(1, 2).split(rows), d_qkv.split(step), scratch)
            for g_c, p, q_t, k_t, v_t, d_qkv_c, (d_q, d_k, d_v, d_t_tokens_c) in chunks:
                g_c = g_c.reshape(-1, cells, d)
                torch.bmm(g_c.transpose(1, 2), p, out=d_v)                                  # dv^T = g^T P
                d_scores = torch._softmax_backward_data(torch.bmm(g_c, v_t), p, -1, p.dtype)
                if d_bias is not None:
                    # summed over windows in the scores' dtype (float32 inside the sum), as autograd
                    # sums a bf16 bias's gradient; a float32 result would first copy the bf16 scores
                    d_bias += d_scores.view(-1, heads, cells, cells).sum(0)
                torch.baddbmm(d_q, k_t, d_scores.transpose(1, 2), beta=0, alpha=scale, out=d_q)
                torch.baddbmm(d_k, q_t, d_scores, beta=0, alpha=scale, out=d_k)
                d_qkv_c.copy_(d_t_tokens_c)
            d_qkv = d_qkv.view(windows * cells, -1)
        if d_bias is not None:
            d_bias = d_bias.unsqueeze(0).to(ctx.bias_dtype)
        return d_qkv, d_bias, None, None, None, None


def _address(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("window attention kernel: out of memory for its scratch buffers")


def _native_forward(qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None, heads: int,
                    cells: int, scale: float, keep_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The compiled kernel's forward: (output, the probabilities transposed if kept)."""
    tokens, windows, d = qkv.shape[0], qkv.shape[0] // cells, qkv.shape[1] // (3 * heads)
    bias_t = bias.detach().float().reshape(heads, cells, cells).transpose(1, 2).contiguous()
    masked = 0 if mask is None else mask.shape[0]
    mask_t = None if mask is None else mask.float().reshape(masked, cells, cells).transpose(1, 2).contiguous()
    out = qkv.new_empty(tokens, heads * d)
    probs_t = qkv.new_empty(windows, heads, cells, cells) if keep_probs else None
    _check(getattr(native.kernel(), f"window_attention_forward_{_SUFFIX[qkv.dtype]}")(
        _address(qkv), _address(bias_t), None if mask_t is None else _address(mask_t), masked,
        windows, heads, cells, d, scale, _address(out), None if probs_t is None else _address(probs_t)))
    return out, probs_t


class _NativeWindowAttention(torch.autograd.Function):
    """The same attention through the compiled kernel (`kernels/window_attention.c`), which
    keeps each window-head's scores in cache from the first product to the last. The
    probabilities it keeps for the backward are transposed (key, query), in qkv's dtype."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None,
                heads: int, cells: int, scale: float) -> torch.Tensor:
        qkv = qkv.contiguous()
        out, probs_t = _native_forward(qkv, bias, mask, heads, cells, scale, keep_probs=True)
        ctx.save_for_backward(qkv, probs_t)
        ctx.shape = (qkv.shape[0] // cells, heads, cells, qkv.shape[1] // (3 * heads), scale)
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: torch.Tensor):
        qkv, probs_t = ctx.saved_tensors
        windows, heads, cells, d, scale = ctx.shape
        d_out = d_out.to(qkv.dtype).contiguous()
        d_qkv = torch.empty_like(qkv)
        d_bias_t = torch.zeros(heads, cells, cells)
        _check(getattr(native.kernel(), f"window_attention_backward_{_SUFFIX[qkv.dtype]}")(
            _address(qkv), _address(probs_t), _address(d_out), windows, heads, cells, d, scale,
            _address(d_qkv), _address(d_bias_t)))
        d_bias = d_bias_t.transpose(1, 2).unsqueeze(0).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return d_qkv, d_bias, None, None, None, None


_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def native_kernel_takes(device: torch.device, dtype: torch.dtype, heads: int, cells: int, d: int,
                        training_threads: int | None = None) -> bool:
    """Whether attention on a qkv of this device and dtype goes through the compiled kernel:
    where it measured faster than torch's products (training) and fused kernel (inference),
    and the kernel is built (window_attention_native.status() says why not). In training
    (`training_threads`: the torch threads the call runs on) only on one thread: the kernel
    runs on one core, as a step's shards do; a step on several threads unsharded ran as fast
    through torch's products on all of them. Forward + backward, one thread, against torch's
    chunked products (AMD EPYC, avx512_bf16):
    - 8x8 windows, heads of 10 (SwinIR-S): fp32 21 -> 12 ms, bf16 14 -> 11 ms (192 windows);
    - 8x8 windows, heads of 30 (SwinIR): fp32 15 -> 11 ms, but bf16 8 -> 10 ms (64 windows);
    - 16x16 windows, heads of 24 (HAT-S): fp32 35 -> 31 ms, bf16 24 -> 28 ms (16 windows),
      whole HAT-S steps within noise: a window's 256 x 256 scores outgrow the first-level
      cache, and torch's bf16 products use the CPU's bf16 dot products, which the kernel
      (float32 inside) does not;
    - built for AVX2 (8-float vectors) on the same CPU, against torch's kernels forced to AVX2
      (`ATEN_CPU_CAPABILITY=avx2`), SwinIR-S: fp32 21 -> 18 ms (22 -> 15 ms with a shifted
      block's mask), bf16 16 -> 14 ms.
    So: windows of up to 64 tokens (a multiple of 16), float32 with heads of up to 32
    channels, bfloat16 with heads of up to 16."""
    return (device.type == "cpu" and cells % 16 == 0 and cells <= 64
            and (dtype == torch.float32 and d <= 32 or dtype == torch.bfloat16 and d <= 16)
            and training_threads in (None, 1) and native.kernel() is not None)


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None,
                     heads: int, cells: int, scale: float) -> torch.Tensor:
    """Attention within windows of `cells` consecutive tokens.

    qkv: (tokens, 3 * heads * d), the qkv projection's output (q, k, v, then heads, then d);
    bias: (1, heads, cells, cells), the learnt relative-position bias (differentiated);
    mask: None or (m, 1, cells, cells), a constant additive mask for each of the last m
    windows (the shifted-window mask, -inf where tokens must not see each other; SwinIR and
    HAT put the windows it touches last, so a shifted block is one call);
    returns (tokens, heads * d), heads then d: the input of the output projection."""
    training = torch.is_grad_enabled() and (qkv.requires_grad or bias.requires_grad)
    if native_kernel_takes(qkv.device, qkv.dtype, heads, cells, qkv.shape[1] // (3 * heads),
                           torch.get_num_threads() if training else None):
        if training:
            return _NativeWindowAttention.apply(qkv, bias, mask, heads, cells, scale)
        return _native_forward(qkv.contiguous(), bias, mask, heads, cells, scale, keep_probs=False)[0]
    return _WindowAttention.apply(qkv, bias, mask, heads, cells, scale)
