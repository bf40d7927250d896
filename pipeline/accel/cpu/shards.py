"""One training step's batch split across the CPU cores (`train.cpu_shards`).

A super-resolution net's training step is thousands of small operations (50-channel
convolutions on 32x32 crops). Split across the cores inside each operation (torch's intra-op
threads) they scale poorly. So on the CPU the batch is cut into one shard per core instead:
each shard's forward and backward run on a thread of their own with one intra-op thread
(data parallelism inside one process), and the shards' gradients are summed in a fixed order
into `.grad`.

What it computes: the loss is a mean over the batch's images, so shard i's loss counts
n_i / N and the summed gradients are the whole batch's (up to float rounding: the sums are
grouped differently). The same shards give the same bits every time, whichever thread
finishes first (in bf16 too: each shard casts its weights to bf16 uncached). Random numbers
drawn inside the net (stochastic depth) come from a generator per shard (nets/drop_path.py)
seeded from torch's global generator in shard order, so a run stays a function of its seed
and resumes exactly.

`plan` decides the shards, each with its reason: one per torch thread on the CPU (`auto`),
and one shard (the plain step) where sharding cannot serve: on CUDA (one device runs one
stream of kernels), under DDP (the ranks already split the batch, and DDP's gradient hooks
need backward()), with torch.compile, and when the net draws random numbers from torch's
global generator in training (Dropout with p > 0: threads would take them in no fixed order).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from pipeline.core.errors import PipelineError
from pipeline.nets.drop_path import DropPath, thread_generator


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
    return ShardPlan(shards, f"{shards} shards of the batch on {shards} threads, "
                             f"{per} torch thread{'s' * (per > 1)} each ({why})")


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


class ShardedGradients:
    """A `pipeline.train.step.Gradients` of one batch computed in `shards` shards on threads.

    Called as the wrapped Gradients is, `(lr, hr, scaler) -> (loss, terms)`, it adds the same
    gradients to `.grad` (up to float rounding). Shard 0 runs on a thread of its own too; the
    threads end with `close()` (or the `with` block).
    """

    def __init__(self, gradients, shards: int):
        if shards < 2:
            raise ValueError(f"ShardedGradients needs 2 shards or more, got {shards}")
        self.gradients, self.shards = gradients, shards
        self.params = [p for p in gradients.model.parameters() if p.requires_grad]
        self.pool = ThreadPoolExecutor(shards, thread_name_prefix="cpu-shard",
                                       initializer=torch.set_num_threads, initargs=(threads_per_shard(shards),))

    def __enter__(self) -> "ShardedGradients":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def shard_gradients(self, lr: torch.Tensor, hr: torch.Tensor, seed: int, scale: torch.Tensor,
                        weight: float) -> tuple[torch.Tensor, dict[str, float], tuple]:
        """One shard's (loss x weight, detached; terms x weight; gradients of loss x scale x weight),
        stochastic depth drawn from a generator seeded with `seed`."""
        with thread_generator(torch.Generator(self.gradients.device).manual_seed(seed)):
            # autocast's cache of cast weights is shared by the process's threads, and a thread
            # leaving autocast empties it while another is inside: a weight used twice could go
            # through one cast or two, in no fixed order. Uncached, every use casts its weight.
            loss, terms = self.gradients.loss(lr, hr, cache_casts=False)
            grads = torch.autograd.grad(loss * (scale * weight), self.params, allow_unused=True)
        return loss.detach() * weight, {k: v * weight for k, v in terms.items()}, grads

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor, scaler: torch.amp.GradScaler
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        n = lr.shape[0]
        shards = min(self.shards, n)       # never an empty shard
        bounds = [round(i * n / shards) for i in range(shards + 1)]
        # drawn here, in shard order, from the global generator: each shard's own random source
        seeds = torch.randint(0, 2 ** 62, (shards,)).tolist()
        scale = scaler.scale(torch.ones((), device=self.gradients.device))   # the fp16 loss scale (1 otherwise)

        def job(i: int) -> tuple:
            a, e = bounds[i], bounds[i + 1]
            return self.shard_gradients(lr[a:e], hr[a:e], seeds[i], scale, (e - a) / n)

        parts = list(self.pool.map(job, range(shards)))
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
