"""The nets a prediction runs, and the inference settings it runs them with: one way for every caller.

`predict`, stage 03 (out of fold) and stage 04 (the test set) all get their nets here:
- `checkpoint_paths(target)`: the checkpoints `predict --checkpoint` names, from one file, an
  experiment folder (its seed*/fold*/best.pt), one seed's folder, or a blend file (its
  members' checkpoints with their weights in the mean);
- `experiment_checkpoints(exp, seeds)` / `ensemble_checkpoints(...)`: stage 04's, from an
  experiment's folds x seeds or a blend;
- `load_nets(checkpoints, scale)`: each rebuilt as it was trained and loaded, in eval mode;
- `named_net(model, weights, scale)`: a registered net with pretrained weights.
`infer_settings(cfg)` reads the config's inference keys for `predict_scene`.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from pipeline.core import paths
from pipeline.core.artifacts import is_blend_file, read_blend, relative_to_workdir, weighted_checkpoints
from pipeline.core.checkpoints import find_checkpoints, read_checkpoint
from pipeline.core.errors import PipelineError
from pipeline.core.io import sha256_file
from pipeline.core.weights import load_weights
from pipeline.nets import build_net, net_from_checkpoint


def checkpoint_paths(target: str | Path, models: str = "folds") -> tuple[list[Path], list[float] | None]:
    """(checkpoints, their weights in the mean or None for equal) of a checkpoint file, a run
    folder (its best.pt: a fold's or a full-data fit's, `models/<exp>/seed0/full`), an
    experiment folder (every seed*/fold*/best.pt; `models`: full, the seeds' full-data fits;
    both), one seed's folder (fold*/best.pt, ...) or a blend file (models/blends/<name>/blend.json)."""
    target = Path(target)
    if is_blend_file(target):
        path, record = read_blend(target)
        weighted = weighted_checkpoints(record, path, models)
        return [p for p, _ in weighted], [w for _, w in weighted]
    if target.is_dir() and (target / "best.pt").is_file():
        return [target / "best.pt"], None
    if target.is_dir():
        found = find_checkpoints(target, models=models)
        if not found:
            runs = paths.runs_glob(models)
            raise PipelineError(f"{target}: no seed*/{runs}/best.pt or {runs}/best.pt checkpoint in this folder")
        return found, None
    if not target.is_file():
        raise PipelineError(f"{target}: checkpoint not found")
    return [target], None


def experiment_checkpoints(exp: str, seeds: list[int] | None, models: str = "folds") -> list[Path]:
    """best.pt of every fold x seed of `exp` (only `seeds` when given), or of its full-data
    fits (`models="full"`), or both; an error when none."""
    found = find_checkpoints(paths.experiment_dir(exp), seeds=seeds, models=models)
    if not found:
        which = f" for seed(s) {' '.join(map(str, seeds))}" if seeds else ""
        how = f"make train FOLD=all EXP={exp}" if models == "full" else f"make train-all EXP={exp}"
        raise PipelineError(f"{paths.experiment_dir(exp)}: no checkpoint seed*/{paths.runs_glob(models)}/best.pt"
                            f"{which}; run `{how}` first")
    return found


def ensemble_checkpoints(exp: str, seeds: list[int] | None, blend: tuple[Path, dict] | None,
                         models: str = "folds") -> tuple[list[Path], list[float] | None, dict]:
    """(checkpoints, per-net weights or None for equal, what stage 04's record adds) of one
    experiment's `seeds`, or of a blend (path, record), from the runs `models` names."""
    if blend is None:
        return experiment_checkpoints(exp, seeds, models), None, {}
    path, record = blend
    weighted = weighted_checkpoints(record, path, models)
    extra = {"blend": {"name": record["name"], "path": relative_to_workdir(path), "sha256": sha256_file(path)},
             "members": [{k: m[k] for k in ("exp", "seeds", "weight")} for m in record["members"]]}
    return [p for p, _ in weighted], [w for _, w in weighted], extra


def load_nets(checkpoints: list[Path], scale: int | None = None, model: str | None = None) -> list[nn.Module]:
    """Every checkpoint's net, rebuilt as it was trained, its inference weights loaded (eval
    mode); each must upscale by `scale` and, when `model` is given, be that net."""
    nets = []
    for path in checkpoints:
        trained_as = read_checkpoint(path)["net"]["name"]
        if model is not None and trained_as != model:
            raise PipelineError(f"{path}: holds a '{trained_as}' net, not the --model '{model}'")
        net = net_from_checkpoint(path)
        if scale is not None and getattr(net, "scale", None) != scale:
            raise PipelineError(f"{path}: the net upscales x{getattr(net, 'scale', '?')}, but the scale is {scale}")
        nets.append(net)
    return nets


def named_net(model: str, weights: str | None, scale: int | None = None) -> nn.Module:
    """A registered net by name with pretrained `weights` (a file or a known name); a net with
    parameters and no weights is refused (its output would be noise)."""
    net = build_net(model, **({"scale": scale} if scale else {}))
    if weights is not None:
        load_weights(net, weights)
    elif any(p.numel() for p in net.parameters()):
        raise PipelineError(f"--model {model} has trainable parameters: give --weights (a file or a "
                            "known name, see `python -m pipeline weights`) or --checkpoint")
    if scale is not None and getattr(net, "scale", None) != scale:
        raise PipelineError(f"the net upscales x{getattr(net, 'scale', '?')}, but --scale is {scale}")
    return net.eval()


def infer_settings(cfg: dict, tta: int | None = None, tile: int | None = None) -> dict:
    """The inference keyword arguments of predict_scene from the config (`tta`/`tile` override)."""
    infer = cfg["infer"]
    return {"tta": int(infer["tta"] if tta is None else tta),
            "tile": int(infer["tile"] if tile is None else tile),
            "overlap": int(infer["tile_overlap"]), "batch": int(infer["batch"]),
            "precision": str(infer["precision"])}
