"""What an experiment's `model` and `train` sections build: the net, its optimizer, schedule and EMA.

`build_model` makes
the configured net (with `model.pretrained` loaded by `load_pretrained`, `model.reinit`
modules left fresh); `build_optimizer` MADGRAD or Adam; `lr_factor_at` the step schedule;
`make_ema` the exponential moving average of the weights, with timm's warm-up;
`training_net` the module the loop calls (fast path, optionally compiled); `optimisation` all
of a step's recipe-decided parts at once, for stage 02, the bench and gpu-check alike.
"""
from __future__ import annotations

import bisect
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from pipeline.core import weights
from pipeline.core.errors import PipelineError
from pipeline.infer.precision import Precision, choose
from pipeline.nets import build_net
from pipeline.nets.fast import use_fast_path


def build_model(cfg: dict[str, Any], pretrained: bool, main: bool) -> nn.Module:
    """The configured net; with its pretrained weights when asked (and `pretrained`)."""
    m = cfg["model"]
    net = build_net(m["name"], **m["args"])
    scale = cfg["data"]["scale"]
    if getattr(net, "scale", None) != scale:
        raise PipelineError(f"config '{cfg['exp']}': net '{m['name']}' upscales x{getattr(net, 'scale', '?')} "
                            f"but data.scale is {scale}; set the scale in model.args")
    if pretrained:
        load_pretrained(cfg, net, main)
    return net



def load_pretrained(cfg: dict[str, Any], net: nn.Module, main: bool) -> dict | None:
    """model.pretrained into the net, the model.reinit modules left freshly initialised
    (e.g. an upsampler for another scale); what was loaded (recorded in config.yaml), or
    None when training from scratch."""
    m = cfg["model"]
    if m["reinit"] and not m["pretrained"]:
        raise PipelineError(f"config '{cfg['exp']}': model.reinit {m['reinit']} needs model.pretrained")
    if not m["pretrained"]:
        return None
    try:
        report = weights.load_pretrained(net, m["pretrained"], reinit=m["reinit"])
    except PipelineError as exc:
        if m["pretrained_required"]:
            raise
        if main:
            warnings.warn(f"{exc}; model.pretrained_required is false, so '{m['name']}' "
                          "trains from scratch (expect a lower score)")
        return None
    if main:
        print(f"train: pretrained {m['pretrained']}: {report.summary()} (sha256 {report.sha256[:16]}...)")
    return report.record()



def build_optimizer(params, t: dict[str, Any]) -> torch.optim.Optimizer:
    if t["optimizer"] == "madgrad":
        import madgrad
        return madgrad.MADGRAD(params, lr=t["lr"], weight_decay=t["weight_decay"])
    return torch.optim.Adam(params, lr=t["lr"], weight_decay=t["weight_decay"])



def ema_update(decay: float):
    """AveragedModel's multi_avg_fn: an EMA whose decay warms up as min(decay, (1+n)/(10+n))
    after n updates (TensorFlow's/timm's warm-up), so a short fine-tuning run is not
    dominated by its starting weights. It depends only on n, which the EMA state holds."""
    @torch.no_grad()
    def update(ema_params, params, num_averaged) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1 + n) / (10 + n))
        for e, p in zip(ema_params, params):
            if e.is_floating_point():
                e.lerp_(p.detach(), weight)
            else:  # integer buffers (SwinIR's relative position index) are copied, not averaged
                e.copy_(p)
    return update



def lr_factor_at(step: int, t: dict[str, Any]) -> float:
    """Step schedule: lr_factors[i] between the (i-1)th and ith milestone (fractions of steps)."""
    bounds = [round(m * t["steps"]) for m in t["milestones"]]
    return t["lr_factors"][bisect.bisect_right(bounds, step)]



def training_net(net: nn.Module, t: dict[str, Any]) -> nn.Module:
    """The module the loop calls: `net` on its fast path (`train.fast`, in place: weights,
    gradients and optimizer state channels-last), compiled when `train.compile`
    (parameters shared, so checkpoints and the EMA see the same tensors)."""
    use_fast_path(net, fast=t["fast"])   # before the EMA copy and the optimizer: they share the layout
    return torch.compile(net) if t["compile"] else net


def make_ema(net: nn.Module, decay: float) -> AveragedModel | None:
    """The EMA of `net`'s weights and buffers (None when `decay` is 0: EMA off)."""
    return AveragedModel(net, multi_avg_fn=ema_update(decay), use_buffers=True) if decay > 0 else None


class Optimisation(NamedTuple):
    """What the `train` and `loss` sections make of a net for its training step."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    precision: Precision
    scaler: torch.amp.GradScaler      # fp16: loss scaled up for the backward, inf/NaN steps skipped
    ema: AveragedModel | None


def optimisation(net: nn.Module, cfg: dict[str, Any], device: torch.device) -> Optimisation:
    """The optimizer, step schedule, loss, precision, scaler and EMA of `cfg` for `net` (on `device`)."""
    from pipeline.train.losses import build_loss

    t = cfg["train"]
    ema = make_ema(net, t["ema"])
    optimizer = build_optimizer(net.parameters(), t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor_at(s, t))
    loss_fn = build_loss(cfg["loss"]).to(device)
    prec = choose(t["precision"], device, net)
    return Optimisation(optimizer, scheduler, loss_fn, prec,
                        torch.amp.GradScaler(device.type, enabled=prec.scaler), ema)
