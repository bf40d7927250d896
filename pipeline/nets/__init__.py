"""Architectures, picked by name: `build_net("rlfn", **kwargs)`.

Each net is a plain nn.Module in its own file, registered with `@register("name")`.
Contract: every net takes and returns float images in [0, 1], NCHW, and has an integer
attribute `scale`; nets trained on 0..255 are wrapped so callers never see it.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch.nn as nn

from pipeline.core.errors import PipelineError

NETS: dict[str, Callable[..., nn.Module]] = {}

# modules whose import registers nets; imported lazily on first use
_NET_MODULES = ["bicubic", "espcn", "srcnn", "rlfn", "swinir", "hat", "rfdn", "safmn"]


def register(name: str):
    def deco(builder):
        NETS[name] = builder
        return builder
    return deco


def _load_all() -> None:
    for mod in _NET_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


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


def window_transformer(net: nn.Module | None) -> str:
    """"SwinIR" or "HAT", the first of them inside `net` ('' if none): nets whose steps are
    thousands of small operations run from Python, which some choices (precision, shards) weigh."""
    from pipeline.nets.hat import HAT
    from pipeline.nets.swinir import SwinIR

    for m in net.modules() if net is not None else ():
        for kind in (SwinIR, HAT):          # a fast path's subclass (FastSwinIR) counts as its net
            if isinstance(m, kind):
                return kind.__name__
    return ""
