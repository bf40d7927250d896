"""Experiment configuration: `pipeline/configs/<exp>.yaml` over the defaults below.

An experiment file only states what differs from DEFAULTS. Every key must exist in
DEFAULTS: an unknown key (a typo that would otherwise be silently ignored) is refused
with its dotted name. Values of `model.args` are free-form (constructor arguments).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from . import paths
from .errors import PipelineError

DEFAULTS: dict[str, Any] = {
    # Competition format: file patterns and scale (the 2023 Solafune contest used x5).
    "data": {
        "scale": 4,
        "train_low": "train_{i}_low.tif",
        "train_high": "train_{i}_high.tif",
        "test_low": "test_{i}_low.tif",
        "answer": "test_{i}_answer.tif",
        "n_folds": 5,
        "fold_seed": 0,
        # External high-res images for training only (pipeline/extra_data.py): folders,
        # the kernel their low-res is made with (null: the degradation probe's), and the
        # share of crops drawn from them (null: in proportion to their pixels).
        "extra": None,
        "extra_kernel": None,
        "extra_weight": None,
    },
    "model": {
        "name": "rlfn",
        "args": {},                  # constructor kwargs for build_net(name, **args)
        "pretrained": None,          # weight file name (resolved via SR_WEIGHTS_DIR) or path
        "pretrained_required": True,  # missing file stops the run, never silently from scratch
    },
    "train": {
        "steps": 2000,               # bounded: training always ends
        "batch_size": 16,
        "lr_patch": 32,              # LR crop side; HR crop is scale x this
        "optimizer": "madgrad",      # madgrad | adam
        "lr": 2.0e-4,
        "milestones": [0.6, 0.85],   # fractions of steps where the LR steps down
        "lr_factors": [1.0, 0.5, 0.1],  # LR multiplier before, between and after milestones
        "weight_decay": 0.0,
        "ema": 0.999,                # EMA decay of the weights; 0 disables
        "grad_clip": 1.0,            # max grad norm; 0 disables
        "precision": "bf16",         # bf16 (autocast where supported) | fp32
        "val_every": 200,
        "ckpt_every": 100,
        "val_tile": 0,               # validation tile side in LR pixels; 0 = whole scene
        "num_workers": 0,
        "augment": {
            "dihedral": True,        # the 8 flips/rotations by 90 degrees
            "hue_saturation": 0.0,   # probability of a small hue/saturation shift
            "brightness_contrast": 0.0,  # probability of a small brightness/contrast change
            "cutmix": 0.0,           # probability of pasting a patch from another scene
        },
    },
    # Weighted loss terms (see losses.py); zero weights are skipped.
    "loss": {"ssim": 1.0, "l1": 0.0, "charbonnier": 0.0, "sobel": 0.0},
    "infer": {
        "tta": 8,                    # 1 or 8 dihedral views
        "tile": 0,                   # tile side in LR pixels; 0 = whole image
        "tile_overlap": 16,          # LR pixels shared by neighbouring tiles (feathered)
        "seeds": [0],                # seeds trained and ensembled
        "precision": "fp32",
        "batch": 8,                  # views/tiles per forward pass
    },
}


def _merge(base: dict, override: dict, where: str, source: Path) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        dotted = f"{where}.{key}" if where else key
        if key not in base:
            raise PipelineError(f"{source}: unknown config key '{dotted}'")
        if isinstance(base[key], dict) and dotted != "model.args":
            if not isinstance(value, dict):
                raise PipelineError(f"{source}: config key '{dotted}' must be a mapping")
            out[key] = _merge(base[key], value, dotted, source)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_path(exp: str) -> Path:
    return paths.CONFIGS / f"{exp}.yaml"


def load_config(exp_or_path: str | Path, _bases: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load an experiment by name (`pipeline/configs/<name>.yaml`) or by file path.

    `base: <experiment>` (a file in the same folder) starts from that experiment instead
    of DEFAULTS, so a variant (an ablation) states only what it changes.
    """
    path = Path(exp_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = config_path(str(exp_or_path))
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in paths.CONFIGS.glob("*.yaml")))
        raise PipelineError(f"{path}: no such experiment config (known: {known})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: top level must be a mapping")
    raw.pop("exp", None)  # a resolved config.yaml written by a run names its experiment
    start = DEFAULTS
    base = raw.pop("base", None)
    if base is not None:
        if path.resolve() in _bases:
            raise PipelineError(f"{path}: 'base' chain loops back to this file")
        base = str(base) if str(base).endswith((".yaml", ".yml")) else f"{base}.yaml"
        start = load_config(path.parent / base, _bases + (path.resolve(),))  # a sibling file
        start.pop("exp")
    cfg = _merge(start, raw, "", path)
    cfg["exp"] = path.stem
    return cfg


def dump_config(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
