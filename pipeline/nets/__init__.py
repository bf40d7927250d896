"""Architectures, picked by name: `build_net("rlfn", **kwargs)`.

Each net is a plain nn.Module in its own file of this folder, registered with
`@register("name")`; every module here is imported on first use, so a new net is one new
file and nothing else. Contract: every net takes and returns float images in [0, 1], NCHW,
and has an integer attribute `scale`; nets trained on 0..255 are wrapped so callers never
see it. The nets' fast paths (same weights, faster code) live in `pipeline.nets.fast`.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable

import torch.nn as nn

from pipeline.core.checkpoints import read_checkpoint
from pipeline.core.errors import PipelineError
from pipeline.core.weights import KNOWN_WEIGHTS, known_weights, load_weights

NETS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(builder):
        NETS[name] = builder
        return builder
    return deco


def _load_all() -> None:
    """Import every architecture module of this folder (each registers its nets)."""
    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg:
            importlib.import_module(f"{__name__}.{module.name}")


def available_nets() -> list[str]:
    _load_all()
    return sorted(NETS)


def build_net(name: str, **kwargs) -> nn.Module:
    """Build a registered net; kwargs are its constructor arguments."""
    _load_all()
    if name not in NETS:
        raise PipelineError(f"unknown net '{name}' (known: {', '.join(sorted(NETS))})")
    try:
        return NETS[name](**kwargs)
    except TypeError as exc:
        # a typo in `model.args` is the config's problem: one line, not a traceback
        if "keyword argument" not in str(exc) and "positional argument" not in str(exc):
            raise
        raise PipelineError(f"net '{name}': {exc} (check model.args in the experiment config)") from None


def net_from_checkpoint(path: str | Path) -> nn.Module:
    """Rebuild the net a checkpoint was trained as and load its inference weights (eval mode)."""
    ckpt = read_checkpoint(path)
    net = build_net(ckpt["net"]["name"], **ckpt["net"]["args"])
    net.load_state_dict(ckpt["state_dict"], strict=True)
    return net.eval()


def build_pretrained(name: str, **overrides) -> nn.Module:
    """Build the net a known weight file belongs to and load it (eval mode)."""
    known = known_weights(name)
    if known is None:
        raise PipelineError(f"{name}: unknown weights (known: {', '.join(KNOWN_WEIGHTS)})")
    net = build_net(known.net, **{**known.net_args, **overrides})
    return load_weights(net, known.name).eval()


def window_transformer(net: nn.Module | None) -> str:
    """"SwinIR" or "HAT", the first of them inside `net` ('' if none): nets whose steps are
    thousands of small operations run from Python, which some choices (precision) weigh."""
    from pipeline.nets.hat import HAT
    from pipeline.nets.swinir import SwinIR

    for m in net.modules() if net is not None else ():
        for kind in (SwinIR, HAT):          # a fast path's subclass (FastSwinIR) counts as its net
            if isinstance(m, kind):
                return kind.__name__
    return ""
