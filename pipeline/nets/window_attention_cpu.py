"""Window attention for training on the CPU: forward and backward by hand, a few windows at a time.

`window_attention(qkv, bias, mask, heads, cells, scale)` is the attention of SwinIR's (and
HAT's) windows, softmax(q.k * scale + bias + mask).v per window and head, taking the qkv
projection's output and returning the input of `proj`, both (tokens, channels) with the
tokens of one window consecutive. It computes what autograd through the spelt-out products
computes (tests/test_fast_paths.py holds it to the reference's gradients), faster, for two
reasons measured on SwinIR-S (64-token windows, 6 heads of 10 channels; AMD EPYC, one thread):
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
Attention dropout is not here (`swinir_fast.attend` spells it out for autograd when a net has it).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# scores per chunk: 1.5 MiB, 16 SwinIR-S windows in fp32, 32 in bf16. A whole SwinIR-S step (2 shards)
# ran fastest with it: fp32 1.41 / 1.36 / 1.50 s, bf16 0.97 / 0.94 / 0.96 s at 0.75 / 1.5 / 3 MiB
_CHUNK_BYTES = 3 << 19


def _chunks(windows: int, heads: int, cells: int, itemsize: int):
    step = max(1, _CHUNK_BYTES // (heads * cells * cells * itemsize))
    for a in range(0, windows, step):
        yield a, min(a + step, windows)


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None,
                heads: int, cells: int, scale: float) -> torch.Tensor:
        tokens, windows = qkv.shape[0], qkv.shape[0] // cells
        d = qkv.shape[1] // (3 * heads)
        with torch.autocast(qkv.device.type, enabled=False):   # everything in qkv's dtype, as autocast runs it
            chunks = list(_chunks(windows, heads, cells, qkv.element_size()))
            per_chunk = chunks[0][1]
            # q, k, v as (windows * heads, cells, d) batches, split from qkv a chunk at a time
            split = qkv.new_empty(3, windows, heads, cells, d)
            q, k, v = split.view(3, -1, cells, d)
            probs = qkv.new_empty(windows * heads, cells, cells)
            out = qkv.new_empty(windows, cells, heads, d)
            out_t = qkv.new_empty(per_chunk * heads, d, cells)   # a chunk's P.v, transposed
            # the bias repeated for a chunk's windows, once: baddbmm starts every chunk's scores from it
            bias_rows = bias.to(qkv.dtype).expand(per_chunk, heads, cells, cells).reshape(-1, cells, cells)
            for a, e in chunks:
                rows, n = slice(a * heads, e * heads), (e - a) * heads
                split[:, a:e].copy_(qkv.view(windows, cells, 3, heads, d)[a:e].permute(2, 0, 3, 1, 4))
                scores = torch.baddbmm(bias_rows[:n], q[rows], k[rows].transpose(1, 2), alpha=scale)
                if mask is not None:
                    scores.view(e - a, heads, cells, cells).add_(mask[a:e])
                torch.ops.aten._softmax.out(scores, -1, False, out=probs[rows])
                torch.bmm(v[rows].transpose(1, 2), probs[rows].transpose(1, 2), out=out_t[:n])
                out[a:e].copy_(out_t[:n].view(e - a, heads, d, cells).permute(0, 3, 1, 2))
        ctx.save_for_backward(q, k, v, probs)
        ctx.shape = (windows, heads, cells, d, scale)
        ctx.bias_dtype = bias.dtype
        return out.view(tokens, heads * d)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: torch.Tensor):
        q, k, v, probs = ctx.saved_tensors
        windows, heads, cells, d, scale = ctx.shape
        with torch.autocast(q.device.type, enabled=False):
            g = d_out.view(windows, cells, heads, d)
            d_qkv = q.new_empty(windows, cells, 3, heads, d)
            chunks = list(_chunks(windows, heads, cells, q.element_size()))
            d_qkv_t = q.new_empty(3, chunks[0][1] * heads, d, cells)     # a chunk's dq^T, dk^T, dv^T
            d_bias = probs.new_zeros(heads, cells, cells, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            for a, e in chunks:
                rows, n = slice(a * heads, e * heads), (e - a) * heads
                p, g_c = probs[rows], g[a:e].transpose(1, 2).reshape(-1, cells, d)
                torch.bmm(g_c.transpose(1, 2), p, out=d_qkv_t[2, :n])                       # dv^T = g^T P
                d_scores = torch._softmax_backward_data(torch.bmm(g_c, v[rows].transpose(1, 2)), p, -1, p.dtype)
                if d_bias is not None:
                    # summed over windows in the scores' dtype (float32 inside the sum), as autograd
                    # sums a bf16 bias's gradient; a float32 result would first copy the bf16 scores
                    d_bias += d_scores.view(e - a, heads, cells, cells).sum(0)
                d_q, d_k = d_qkv_t[0, :n], d_qkv_t[1, :n]
                torch.baddbmm(d_q, k[rows].transpose(1, 2), d_scores.transpose(1, 2), beta=0, alpha=scale, out=d_q)
                torch.baddbmm(d_k, q[rows].transpose(1, 2), d_scores, beta=0, alpha=scale, out=d_k)
                d_qkv[a:e].copy_(d_qkv_t[:, :n].view(3, e - a, heads, d, cells).permute(1, 4, 0, 2, 3))
            d_qkv = d_qkv.view(windows * cells, -1)
        if d_bias is not None:
            d_bias = d_bias.unsqueeze(0).to(ctx.bias_dtype)
        return d_qkv, d_bias, None, None, None, None


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None,
                     heads: int, cells: int, scale: float) -> torch.Tensor:
    """Attention within windows of `cells` consecutive tokens.

    qkv: (tokens, 3 * heads * d), the qkv projection's output (q, k, v, then heads, then d);
    bias: (1, heads, cells, cells), the learnt relative-position bias (differentiated);
    mask: None or (windows, 1, cells, cells), a constant additive mask per window (the
    shifted-window mask, -inf where tokens must not see each other);
    returns (tokens, heads * d), heads then d: the input of the output projection."""
    return _WindowAttention.apply(qkv, bias, mask, heads, cells, scale)
