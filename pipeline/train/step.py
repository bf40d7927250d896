"""One training step, the same for every device: stage 02 runs it in its loop, `make bench` times it.

    gradients = Gradients(model, loss_fn, amp_dtype, device)     # forward + backward of a batch
    step = TrainStep(net, gradients, optimizer, scheduler, scaler, ema, grad_clip)
    outcome = step(lr, hr)                                       # float NCHW batches on the device

A step: clear the gradients; forward and backward (`gradients`: the loss under autocast, its
gradients scaled by the fp16 scaler; CUDA products may use TF32, `infer.precision.tf32`); the loss averaged over DDP ranks (`reduce`); then, unless
the loss or the gradient norm is not finite (`NonFiniteStep`, raised before anything touches
the weights), unscale, clip, the optimizer's update (fp16: skipped when a gradient is inf or
NaN, and the scale halved), the schedule, and the EMA of the weights (not after a skipped
update). `gradients` is any callable with Gradients' signature: on the CPU the batch may be
cut into shards that run on threads of their own (`pipeline.accel`), which the step does not
need to know.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from pipeline.infer.precision import tf32


class NonFiniteStep(Exception):
    """The loss or the gradient norm of a step is inf or NaN (outside fp16, whose scaler skips
    such steps): the weights were not touched."""


class Gradients:
    """Forward and backward of one batch on the calling thread.

    `gradients(lr, hr, scaler)` adds the gradients of the batch's loss (scaled by `scaler`, as
    `scaler.scale(loss).backward()` does) to the parameters' `.grad` and returns (the loss,
    detached; its unweighted terms). `loss(lr, hr)` is the forward alone, under autocast when
    `amp_dtype` is set; `cache_casts=False` casts each weight at every use instead of once
    (callers that run the model on several threads at once need that: autocast's cache is
    shared by a process's threads).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, amp_dtype: torch.dtype | None, device: torch.device):
        self.model, self.loss_fn, self.amp_dtype, self.device = model, loss_fn, amp_dtype, device

    def loss(self, lr: torch.Tensor, hr: torch.Tensor, cache_casts: bool = True
             ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=cache_casts):
            sr = self.model(lr)
        return self.loss_fn.evaluate(sr, hr)

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor, scaler: torch.amp.GradScaler
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, terms = self.loss(lr, hr)
        scaler.scale(loss).backward()
        return loss.detach(), terms

    def __enter__(self) -> "Gradients":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release here (a sharded version ends its threads)."""


@dataclass
class Outcome:
    """What one step did: the batch's loss and its terms (mean over DDP ranks), the learning
    rate it updated with, whether fp16's scaler skipped the update, the scale after it."""
    loss: float
    terms: dict[str, float]
    lr: float
    skipped: bool
    grad_scale: float | None


@dataclass
class TrainStep:
    net: nn.Module                              # the parameters (the module the optimizer holds)
    gradients: Callable                         # (lr, hr, scaler) -> (loss, terms): Gradients or a wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: nn.Module | None = None                # torch.optim.swa_utils.AveragedModel
    grad_clip: float = 0.0                      # max gradient norm; 0: no clipping
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda values: values   # mean over DDP ranks

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor) -> Outcome:
        fp16 = self.scaler.is_enabled()
        self.optimizer.zero_grad(set_to_none=True)
        with tf32(True):                                      # GPUs from Ampere on: TF32 products
            loss, terms = self.gradients(lr, hr, self.scaler)     # the weights are not touched yet
        # every rank sees the same (mean) loss: they stop together and log the global figure
        reported = self.reduce(torch.tensor([float(loss)] + list(terms.values()), dtype=torch.float64))
        loss_value = float(reported[0])
        if not math.isfinite(loss_value) and not fp16:
            raise NonFiniteStep(f"loss is {loss_value}")
        self.scaler.unscale_(self.optimizer)                  # true gradients for clipping (no-op without fp16)
        if self.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip))
            if not math.isfinite(norm) and not fp16:
                raise NonFiniteStep(f"gradient norm is {norm}")
        lr_now = self.optimizer.param_groups[0]["lr"]
        scale_before = self.scaler.get_scale() if fp16 else None
        self.scaler.step(self.optimizer)                      # fp16: skipped when a gradient is inf/NaN
        self.scaler.update()                                  # ... and the scale halved
        skipped = fp16 and self.scaler.get_scale() < scale_before
        with warnings.catch_warnings():                       # a skipped first step makes the scheduler warn
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`")
            self.scheduler.step()
        if self.ema is not None and not skipped:              # a skipped step changed nothing to average
            self.ema.update_parameters(self.net)
        return Outcome(loss_value, dict(zip(terms, (float(v) for v in reported[1:]))), lr_now, bool(skipped),
                       self.scaler.get_scale() if fp16 else None)
