"""Stage 04: predict the test scenes with every fold x seed checkpoint and 8-way TTA.

    models/<exp>/seed<s>/fold<f>/best.pt (infer.models: folds; full: seed<s>/full/best.pt, the
    full-data fits; both) + data/interim (test split)
      -> data/predictions/<exp>/test_{i}_answer.tif, data/predictions/<exp>/ensemble.json

Every selected checkpoint sees every dihedral view of each scene (`infer.tta`, 8 by
default); all net x view outputs are averaged in float and rounded to uint8 once, by
`inference.predict_scene` (the same function `predict --checkpoint models/<exp>` uses).
Large scenes are tiled (`infer.tile`, overlap `infer.tile_overlap`, feathered blend);
tiles and views go through the nets `infer.batch` at a time.

From a blend (`--blend NAME`, models/blends/NAME/blend.json, see pipeline/infer/blend.py): every
member's fold x seed checkpoints (or full-data fits: the weights fitted out of fold apply to
them alike) x views, each member's mean weighted by its blend weight
(one mean over all nets with per-net weights, in float, rounded once), written to
data/predictions/NAME/ with the data settings of the first member and the blend's TTA.

The prediction folder is built in a temporary folder renamed into place at the end, so it
always holds one complete, consistent set: answers plus `ensemble.json`, which records
the checkpoints (path, seed, fold, step, validation SSIM, mtime, sha256), TTA, tiling,
precision, device and time. Stage 05 uses it to refuse predictions older than their
checkpoints.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.core import io, locks, paths
from pipeline.core.artifacts import (
    blend_config,
    checkpoint_record,
    test_scenes,
)
from pipeline.core.config import add_set_argument, load_config
from pipeline.core.device import pick_device
from pipeline.core.errors import PipelineError
from pipeline.infer.ensemble import predict_scene
from pipeline.infer.load import ensemble_checkpoints, infer_settings, load_nets
from pipeline.infer.precision import choose
from pipeline.infer.tta import TTA_CHOICES


def run_ensemble(cfg: dict, seeds: list[int] | None = None, tta: int | None = None,
                 tile: int | None = None, blend: tuple[Path, dict] | None = None, models: str | None = None) -> dict:
    """Write the test predictions and ensemble.json of `cfg`'s experiment (or of `blend`,
    a (path, record) pair, with `cfg` from blend_config), from the runs `models` names
    (default `infer.models`: folds, full or both); returns the record."""
    start = time.time()
    exp = cfg["exp"]
    scale = int(cfg["data"]["scale"])
    settings = infer_settings(cfg, tta, tile)
    device = pick_device(cfg["device"])
    scenes = test_scenes(cfg)
    models = models or cfg["infer"]["models"]
    ckpt_paths, net_weights, extra = ensemble_checkpoints(exp, seeds, blend, models)
    records = [checkpoint_record(p) for p in ckpt_paths]
    if net_weights is not None:
        for r, w in zip(records, net_weights):
            r["weight"] = w
    nets = load_nets(ckpt_paths, scale)
    # "auto" resolved here, so ensemble.json records what ran
    settings["precision"] = choose(settings["precision"], device, torch.nn.ModuleList(nets), training=False).name
    out_dir = paths.predictions_dir(exp)
    with locks.locked(out_dir), io.atomic_dir(out_dir) as tmp:
        bar = tqdm(scenes, desc=f"ensemble {exp} ({len(nets)} nets x {settings['tta']} views)",
                   unit="scene", disable=None)
        for scene in bar:
            lr = io.read_image(scene["low_path"])
            sr = predict_scene(nets, lr, device=device, weights=net_weights, **settings)
            io.write_tif(tmp / scene["answer"], sr)
        record = {
            "exp": exp,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seeds": sorted({r["seed"] for r in records}),
            "models": models,
            "checkpoints": records,
            **extra,
            **settings,
            "device": str(device),
            "threads": torch.get_num_threads(),  # CPU fp32 convolutions round by thread count
            "scale": scale,
            "answers": [s["answer"] for s in scenes],
            "seconds": round(time.time() - start, 2),
        }
        (tmp / paths.ENSEMBLE_JSON).write_text(json.dumps(record, indent=2))
        if (out_dir / ".gitkeep").exists():
            (tmp / ".gitkeep").touch()
    return record


def add_arguments(parser) -> None:
    parser.add_argument("--exp", default="demo", help="experiment name or YAML path")
    parser.add_argument("--blend", default=None,
                        help="a blend name or blend.json instead of --exp: its members' checkpoints, weighted")
    parser.add_argument("--seeds", type=int, nargs="*", default=None,
                        help="seeds to ensemble (default: every seed with checkpoints; a blend's own)")
    parser.add_argument("--tta", type=int, choices=TTA_CHOICES, default=None,
                        help="dihedral views per net (default: infer.tta)")
    parser.add_argument("--tile", type=int, default=None,
                        help="tile side in LR pixels, 0 = whole scene (default: infer.tile)")
    parser.add_argument("--models", choices=tuple(paths.ENSEMBLE_RUNS), default=None,
                        help="folds: every fold x seed; full: the full-data fits; both (default: infer.models)")
    add_set_argument(parser)


def main(args) -> int:
    if getattr(args, "blend", None):
        if args.seeds:
            raise PipelineError("--seeds and --blend exclude each other (the blend records its members' seeds)")
        if args.overrides:
            raise PipelineError("--set and --blend exclude each other (a blend's members keep their own configs)")
        cfg, path, blend = blend_config(args.blend)
        record = run_ensemble(cfg, tta=args.tta, tile=args.tile, blend=(path, blend), models=args.models)
    else:
        cfg = load_config(args.exp, args.overrides)
        record = run_ensemble(cfg, seeds=args.seeds or None, tta=args.tta, tile=args.tile, models=args.models)
    n = len(record["checkpoints"])
    print(f"ensemble {cfg['exp']}: {len(record['answers'])} test scenes x {n} checkpoint(s) of the {record['models']} "
          f"(seeds {' '.join(map(str, record['seeds']))}) x {record['tta']} TTA views, "
          f"{record['precision']} on {record['device']}, {record['seconds']:.1f} s "
          f"-> {paths.predictions_dir(cfg['exp'])}")
    return 0
