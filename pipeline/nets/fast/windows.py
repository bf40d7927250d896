"""Window attention machinery shared by the SwinIR and HAT fast paths.

- `WindowOrders`: the token permutations of one (batch, H, W) feature map between image order
  and window orders (unshifted, and shifted with the masked border windows last), built once
  per input size (`switch.cached_orders`).
- `window_attention`: attention within windows of consecutive tokens, the position bias
  gathered once per weight version (`position_bias`), interior windows with the bias alone and
  only the border windows with the shifted-window mask. It runs torch's fused attention
  (`scaled_dot_product_attention`) wherever that serves (inference; CUDA, whose kernel also
  differentiates the bias), and the products spelt out for autograd where it does not (training
  on the CPU: torch's fused CPU kernel has no gradient for the bias).
- `in_jobs` / `run_jobs`: a block's windows at inference as jobs, one per run of windows.

Two extension points, which `pipeline.accel` fills for the CPU and nothing here knows more of:
`register_attention_kernel(kernel)` adds a device-specific kernel that inference attention is
handed to where `kernel.takes(...)` says so, and `register_jobs(device_type, jobs)` splits a
block's windows into smaller jobs and runs them (on worker threads, say). Without them every
device runs torch's own operations, one job per run of windows.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from pipeline.nets.swinir import SwinIR, WindowAttention

Segments = list[tuple[int, int, "torch.Tensor | None"]]    # (first window, stop, mask of its windows)


class WindowOrders:
    """Token permutations of one (batch, H, W) feature map, flattened to B*H*W tokens.

    Orders: "img" (b, y, x), "U" (unshifted windows) and "S" (windows of the image rolled
    by -shift, interior windows first); windowed orders are laid out (window, b, cell), so
    the first `n_interior * B` windows of "S" are exactly the unmasked ones.
    `index(a, b)` maps: tokens_in_b = tokens_in_a[index(a, b)].
    """

    def __init__(self, net: SwinIR, b: int, h: int, w: int, device: torch.device):
        ws, shift = net.window_size, net.shift_size
        self.cells = ws * ws
        mask = net.attn_mask(h, w, device).cpu() if shift else None   # (nW, N, N), the reference's
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        offsets = torch.arange(b) * h * w

        def windows(s: int, order: torch.Tensor | None) -> torch.Tensor:
            # image index of every cell of every window of the image rolled by -s
            src = ((y + s) % h) * w + (x + s) % w
            win = src.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1, self.cells)
            if order is not None:
                win = win[order]
            return (win[:, None, :] + offsets[None, :, None]).reshape(-1)

        self.to_img: dict[str, torch.Tensor] = {"U": windows(0, None)}   # order -> image index
        self.n_interior = (h // ws) * (w // ws) * b
        self.border_mask = None
        if shift:
            border = mask.flatten(1).ne(0).any(1)
            order = torch.cat([torch.nonzero(~border).flatten(), torch.nonzero(border).flatten()])
            self.to_img["S"] = windows(shift, order)
            self.n_interior = int((~border).sum()) * b
            # (n_border * B, 1, N, N): each border window's mask, repeated for the batch. The
            # reference's -100 becomes -inf: exp(-100) is a float32 denormal, which x86 computes
            # far slower; exp(-inf) = 0, a difference far below float rounding.
            border_mask = mask[border].masked_fill(mask[border] != 0, float("-inf"))
            self.border_mask = border_mask.repeat_interleave(b, dim=0).unsqueeze(1).to(device)
        self.to_img["img"] = torch.arange(b * h * w)
        self._device = device
        self._maps: dict[tuple[str, str], torch.Tensor] = {}

    def segments(self, shifted: bool) -> Segments:
        """A block's windows as (first, stop, mask) runs in window order: all of them unmasked,
        or in a shifted block the interior ones, then the border ones with their mask (so the
        last run's mask is that of the last windows); empty runs left out."""
        windows = self.to_img["U"].numel() // self.cells
        if not shifted or self.border_mask is None:
            return [(0, windows, None)]
        runs = [(0, self.n_interior, None), (self.n_interior, windows, self.border_mask)]
        return [run for run in runs if run[1] > run[0]]

    def index(self, src: str, dst: str) -> torch.Tensor:
        key = (src, dst)
        if key not in self._maps:
            with torch.inference_mode(False):  # reusable outside inference mode (training)
                inverse_src = torch.empty_like(self.to_img[src])
                inverse_src[self.to_img[src]] = torch.arange(inverse_src.numel())
                self._maps[key] = inverse_src[self.to_img[dst]].to(self._device)
        return self._maps[key]


def head_dim(d: int, device: torch.device, fused: bool = True) -> int:
    """Head dimension attention runs at: for the fused kernel, padded with zeros to a multiple
    of 4 on the CPU (SwinIR-S's 10 -> 12: the fused CPU kernel ran faster at 12) and of 8 on
    CUDA (what its fused kernels want). Zero columns in q and k add nothing to q.k; zero
    columns in v give zero outputs that `proj` ignores. The spelt-out products run unpadded."""
    if not fused:
        return d
    align = 8 if device.type == "cuda" else 4
    return -(-d // align) * align


def cached(owner: torch.nn.Module, name: str, sources: list[torch.Tensor], build: Callable):
    """build() once per version of its source parameters (inference); every call where
    gradients must flow through it (training)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return build()
    key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in sources)
    hit = owner.__dict__.get(name)
    if hit is None or hit[0] != key:
        with torch.inference_mode(False), torch.no_grad():  # reusable outside inference mode
            hit = (key, build())
        owner.__dict__[name] = hit
    return hit[1]


def position_bias(attn: WindowAttention) -> torch.Tensor:
    """(1, heads, N, N) relative-position bias, gathered from its table."""
    table, n = attn.relative_position_bias_table, attn.window_size ** 2

    def build() -> torch.Tensor:
        return table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0).contiguous()
    return cached(attn, "_fast_bias", [table], build)


def padded_projections(attn: WindowAttention, d_pad: int) -> tuple:
    """(qkv weight, qkv bias, proj weight) with every head's dimension zero-padded to d_pad."""
    qkv, proj, heads = attn.qkv, attn.proj, attn.num_heads
    c = proj.weight.shape[0]
    d = c // heads
    sources = [qkv.weight, proj.weight] + ([qkv.bias] if qkv.bias is not None else [])

    def build() -> tuple:
        w = F.pad(qkv.weight.view(3, heads, d, c), (0, 0, 0, d_pad - d)).reshape(3 * heads * d_pad, c)
        b = None if qkv.bias is None else F.pad(qkv.bias.view(3, heads, d), (0, d_pad - d)).reshape(-1)
        p = F.pad(proj.weight.view(c, heads, d), (0, d_pad - d)).reshape(c, heads * d_pad)
        return w, b, p
    return cached(attn, f"_fast_padded{d_pad}", sources, build)


def spelt_out(device: torch.device, mask: torch.Tensor, drop: float) -> bool:
    """Whether `attend` spells attention out (training on the CPU) instead of the fused kernel."""
    return device.type == "cpu" and torch.is_grad_enabled() and (mask.requires_grad or drop > 0)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           dropout: torch.nn.Dropout | None = None) -> torch.Tensor:
    """softmax(q.k * scale + mask).v, `mask` additive (the learnt position bias, with the
    shifted-window mask where there is one) and broadcast over windows.

    The fused kernel (scaled_dot_product_attention: the windows x heads x N x N scores never
    stored) wherever it can serve: inference, and CUDA, whose memory-efficient kernel also
    differentiates the mask. In training on the CPU it is spelt out and autograd does the
    rest: torch's fused CPU kernel has no gradient for the mask. The price is memory: the
    probabilities are kept for the backward."""
    drop = dropout.p if dropout is not None and dropout.training else 0.0
    if spelt_out(q.device, mask, drop):
        probs = ((q * scale) @ k.transpose(-2, -1) + mask).softmax(dim=-1)
        return (dropout(probs) if drop else probs) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=scale)


# --- device-specific kernels (registered by pipeline.accel) --------------------------------------

class AttentionKernel(Protocol):
    """A device-specific window attention for inference: `takes` says where it serves, the call
    computes softmax(q.k * scale + bias + mask).v from the qkv projection's output (tokens,
    3 * heads * d) and returns the output projection's input (tokens, heads * d)."""

    def takes(self, device: torch.device, dtype: torch.dtype, heads: int, cells: int, d: int) -> bool: ...

    def __call__(self, qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None, heads: int,
                 cells: int, scale: float) -> torch.Tensor: ...


class Jobs(Protocol):
    """How a device runs a block's windows at inference: `windows_per_job(cells)` cuts them into
    jobs, `run(run, jobs, device)` calls run(job) for every job (in any order, on any thread)."""

    def windows_per_job(self, cells: int) -> int: ...

    def run(self, run: Callable[[tuple], None], jobs: list[tuple], device: torch.device) -> None: ...


_KERNELS: list[AttentionKernel] = []
_JOBS: dict[str, Jobs] = {}


def register_attention_kernel(kernel: AttentionKernel) -> None:
    if kernel not in _KERNELS:
        _KERNELS.append(kernel)


def unregister_attention_kernel(kernel: AttentionKernel) -> None:
    if kernel in _KERNELS:
        _KERNELS.remove(kernel)


def register_jobs(device_type: str, jobs: Jobs | None) -> None:
    """`jobs` for `device_type` (None: back to one job per run of windows, inline)."""
    if jobs is None:
        _JOBS.pop(device_type, None)
    else:
        _JOBS[device_type] = jobs


def _inference_kernel(x: torch.Tensor, heads: int, cells: int) -> AttentionKernel | None:
    """A registered kernel that takes this inference call (or a frozen net's), if any."""
    if not _KERNELS or torch.is_grad_enabled() and x.requires_grad or torch.compiler.is_compiling():
        return None
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    return next((k for k in _KERNELS if k.takes(x.device, dtype, heads, cells, x.shape[1] // heads)), None)


def window_attention(attn: WindowAttention, x: torch.Tensor, cells: int, bias: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention within windows of `cells` consecutive tokens of `x` (L, C); `bias` is the
    (1, heads, N, N) position bias, `mask` None or the (m, 1, N, N) shifted-window mask of
    the last m windows (the border windows: `WindowOrders` puts them last)."""
    tokens, c = x.shape
    heads = attn.num_heads
    drop = attn.attn_drop.p if attn.training else 0.0
    kernel = None if drop else _inference_kernel(x, heads, cells)
    if kernel is not None:
        qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
        out = kernel(qkv, bias, mask, heads, cells, attn.scale)
        return attn.proj_drop(F.linear(out, attn.proj.weight, attn.proj.bias))
    unmasked = tokens // cells - (0 if mask is None else mask.shape[0])
    if mask is not None and unmasked:   # the interior windows take the bias alone, broadcast
        return torch.cat([window_attention(attn, x[:unmasked * cells], cells, bias),
                          window_attention(attn, x[unmasked * cells:], cells, bias, mask)])
    mask = bias if mask is None else bias + mask
    d = head_dim(c // heads, x.device, fused=not spelt_out(x.device, bias, drop))
    if d == c // heads:
        qkv_w, qkv_b, proj_w = attn.qkv.weight, attn.qkv.bias, attn.proj.weight
    else:
        qkv_w, qkv_b, proj_w = padded_projections(attn, d)
    qkv = F.linear(x, qkv_w, qkv_b).view(tokens // cells, cells, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                          # (windows, heads, N, d) views
    out = attend(q, k, v, mask.to(q.dtype), attn.scale, attn.attn_drop)
    # the fused kernel writes (windows, N, heads, d) memory: this transpose is a view there
    out = F.linear(out.transpose(1, 2).reshape(tokens, heads * d), proj_w, attn.proj.bias)
    return attn.proj_drop(out)


def in_jobs(segments: Segments, cells: int, device: torch.device) -> list[tuple]:
    """A block's windows at inference as jobs (first, stop, segment's first window, segment's
    mask): one per segment, or as the device's registered `Jobs` cut them."""
    jobs = _JOBS.get(device.type)
    per = jobs.windows_per_job(cells) if jobs is not None else None
    return [(a, min(a + per, stop) if per else stop, first, mask)
            for first, stop, mask in segments for a in (range(first, stop, per) if per else (first,))]


def run_jobs(run: Callable[[tuple], None], jobs: list[tuple], device: torch.device) -> None:
    """run(job) for every job: inline, or as the device's registered `Jobs` runs them."""
    runner = _JOBS.get(device.type)
    if runner is None or len(jobs) < 2:
        for job in jobs:
            run(job)
    else:
        runner.run(run, jobs, device)
