"""One training step's batch split across the CPU cores (`train.cpu_shards`).

A super-resolution net's training step is thousands of small operations: 50-channel
convolutions on 32x32 crops, SwinIR's 64-token windows with 10-dimensional heads. Split
across the cores inside each operation (torch's intra-op threads) they scale poorly. So on
the CPU the batch is cut into one shard per core instead: each shard's forward and
backward run on a thread of their own with one intra-op thread (data parallelism inside
one process), and the shards' gradients are summed in a fixed order into `.grad`.

What it computes: the loss is a mean over the batch's images, so shard i's loss counts
n_i / N and the summed gradients are the whole batch's (up to float rounding: the sums
are grouped differently). The same shards give the same bits every time, whichever thread
finishes first. Random numbers drawn inside the net (stochastic depth) come from a
generator per shard (nets/drop_path.py) seeded from torch's global generator in shard
order, so a run stays a function of its seed and resumes exactly.

Measured (AMD EPYC, 2 cores, avx512_bf16, torch 2.14.1; 2 shards of one thread against one
batch on 2 intra-op threads): RLFN batch 16 fp32 0.353 -> 0.271 s a step, bf16 0.272 ->
0.217 s; SwinIR-S batch 24 fp32 2.99 -> 2.24 s, bf16 2.46 -> 1.68 s (BENCHMARKS.md has
the bench rows). The shards share Python's lock, being threads of one process: a SwinIR-S
shard, whose step runs thousands of small operations from Python, ran 6-15 % slower beside its
twin than alone, where two processes lost nothing (BENCHMARKS.md, training round 5).

`auto` is one shard per torch thread on the CPU, and one shard (the plain step) where
sharding cannot serve, each with its reason: on CUDA (one device runs one stream of
kernels), under DDP (the ranks already split the batch, and DDP's gradient hooks need
backward()), with torch.compile, and when the net draws random numbers from torch's global
generator in training (Dropout with p > 0): threads would take them in no fixed order.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .errors import PipelineError
from .nets.drop_path import DropPath, thread_generator


@dataclass(frozen=True)
class ShardPlan:
    shards: int
    reason: str


def plan(setting: int | str, device: torch.device, net: nn.Module, batch_size: int,
         world: int = 1, compiled: bool = False) -> ShardPlan:
    """How many shards `train.cpu_shards` means for this run, and why."""
    if setting != "auto" and (isinstance(setting, bool) or not isinstance(setting, int) or setting < 1):
        raise PipelineError(f"train.cpu_shards must be 'auto' or an integer >= 1, got {setting!r}")
    if setting == 1:
        return ShardPlan(1, "cpu_shards 1: the whole batch on this thread")
    blocker = (f"on {device.type} the batch runs as one" if device.type != "cpu" else
               f"DDP over {world} processes splits the batch already" if world > 1 else
               "torch.compile runs the batch as one" if compiled else
               _global_randomness(net))
    if blocker:
        return ShardPlan(1, f"one shard: {blocker}")
    wanted = torch.get_num_threads() if setting == "auto" else setting
    if wanted == 1:
        return ShardPlan(1, "one shard: one torch thread")
    if batch_size == 1:
        return ShardPlan(1, "one shard: a batch of one image")
    shards = min(wanted, batch_size)
    per = threads_per_shard(shards)
    why = "auto: one per torch thread" if setting == "auto" else f"cpu_shards {setting}"
    return ShardPlan(shards, f"{shards} shards of the batch on {shards} threads, {per} torch thread{'s' * (per > 1)} "
                             f"each ({why})")


def threads_per_shard(shards: int) -> int:
    """The torch threads each shard's thread runs its operations on: the process's, shared out."""
    return max(1, torch.get_num_threads() // shards)


def _global_randomness(net: nn.Module) -> str:
    """Why the net's training forward cannot be sharded deterministically ('' if it can)."""
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name or 'the net'} is Dropout(p={m.p}), drawn from torch's global generator"
        if getattr(m, "drop_prob", 0) and not isinstance(m, DropPath):
            return f"{name or 'the net'} ({type(m).__name__}) draws from torch's global generator"
    return ""


class ShardedStep:
    """Forward and backward of one batch, in `shards` threads (1: on the caller's thread).

    `step(lr, hr, scaler)` returns (the batch's loss, detached; its unweighted terms) and
    adds the gradients of the loss (scaled by `scaler`, as `scaler.scale(loss).backward()`
    would) to the parameters' `.grad`. Use it as a context manager: the threads end with it.
    """

    def __init__(self, model: nn.Module, loss_fn, shards: int, amp_dtype: torch.dtype | None,
                 device: torch.device):
        self.model, self.loss_fn, self.shards = model, loss_fn, shards
        self.amp_dtype, self.device = amp_dtype, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.pool = None
        if shards > 1:
            self.pool = ThreadPoolExecutor(shards, thread_name_prefix="cpu-shard", initializer=torch.set_num_threads,
                                           initargs=(threads_per_shard(shards),))

    def __enter__(self) -> "ShardedStep":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _loss(self, lr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            sr = self.model(lr)
        return self.loss_fn.evaluate(sr, hr)

    def step(self, lr: torch.Tensor, hr: torch.Tensor, scaler: torch.amp.GradScaler
             ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.pool is None:
            loss, terms = self._loss(lr, hr)
            scaler.scale(loss).backward()
            return loss.detach(), terms
        n = lr.shape[0]
        shards = min(self.shards, n)       # never an empty shard
        bounds = [round(i * n / shards) for i in range(shards + 1)]
        # drawn here, in shard order, from the global generator: each shard's own random source
        seeds = torch.randint(0, 2 ** 62, (shards,)).tolist()
        factor = scaler.scale(torch.ones((), device=self.device))   # the fp16 loss scale (1 otherwise)

        def shard(i: int) -> tuple[torch.Tensor, dict[str, float], tuple]:
            a, e = bounds[i], bounds[i + 1]
            with thread_generator(torch.Generator(self.device).manual_seed(seeds[i])):
                loss, terms = self._loss(lr[a:e], hr[a:e])
                weight = (e - a) / n
                grads = torch.autograd.grad(loss * (factor * weight), self.params, allow_unused=True)
            return loss.detach() * weight, {k: v * weight for k, v in terms.items()}, grads

        parts = list(self.pool.map(shard, range(shards)))
        for j, p in enumerate(self.params):
            grads = [part[2][j] for part in parts if part[2][j] is not None]
            if not grads:
                continue
            total = grads[0]
            for g in grads[1:]:
                total = total.add_(g)
            p.grad = total if p.grad is None else p.grad.add_(total)
        loss = parts[0][0]
        for part in parts[1:]:
            loss = loss + part[0]
        terms = {k: sum(part[1][k] for part in parts) for k in parts[0][1]}
        return loss, terms
