"""Stage 04: predict the test scenes with every fold x seed checkpoint and 8-way TTA.

    models/<exp>/seed<s>/fold<f>/best.pt + data/interim (test split)
      -> data/predictions/<exp>/test_{i}_answer.tif, data/predictions/<exp>/ensemble.json

Every selected checkpoint sees every dihedral view of each scene (`infer.tta`, 8 by
default); all net x view outputs are averaged in float and rounded to uint8 once, by
`inference.predict_scene` (the same function `predict --checkpoint models/<exp>` uses).
Large scenes are tiled (`infer.tile`, overlap `infer.tile_overlap`, feathered blend);
tiles and views go through the nets `infer.batch` at a time.

From a blend (`--blend NAME`, models/blends/NAME/blend.json, see pipeline/blend.py): every
member's fold x seed checkpoints x views, each member's mean weighted by its blend weight
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

from pipeline.core import io, paths
from pipeline.core.checkpoints import find_checkpoints, net_from_checkpoint, read_checkpoint
from pipeline.core.config import add_set_argument, load_config
from pipeline.core.errors import PipelineError
from pipeline.core.io import sha256_file
from pipeline.core.precision import choose
from pipeline.infer.blend import read_blend, weighted_checkpoints
from pipeline.infer.ensemble import pick_device, predict_scene
from pipeline.infer.tta import TTA_CHOICES
from pipeline.stages.s00_unzip import load_manifest


def relative_to_workdir(path: Path) -> str:
    """Paths in the JSON records are relative to the work folder, so it can move."""
    try:
        return str(Path(path).resolve().relative_to(paths.WORKDIR))
    except ValueError:
        return str(Path(path).resolve())


def checkpoint_record(path: Path) -> dict:
    """What identifies one checkpoint for later staleness checks."""
    ckpt = read_checkpoint(path)
    return {"path": relative_to_workdir(path), "seed": ckpt.get("seed"), "fold": ckpt.get("fold"),
            "step": ckpt.get("step"), "val_ssim": ckpt.get("val_ssim"),
            "net": ckpt["net"]["name"], "val_split": ckpt.get("val_split"),
            "mtime": path.stat().st_mtime, "sha256": sha256_file(path)}


def select_checkpoints(exp: str, seeds: list[int] | None) -> list[Path]:
    """best.pt of every fold x seed of `exp` (only `seeds` when given); an error when none."""
    found = find_checkpoints(paths.experiment_dir(exp), seeds=seeds)
    if not found:
        which = f" for seed(s) {' '.join(map(str, seeds))}" if seeds else ""
        raise PipelineError(f"{paths.experiment_dir(exp)}: no checkpoint seed*/fold*/best.pt{which}; "
                            f"run `make train-all EXP={exp}` first")
    return found


def load_nets(ckpt_paths: list[Path], scale: int, device: torch.device) -> list[torch.nn.Module]:
    nets = []
    for path in ckpt_paths:
        net = net_from_checkpoint(path)
        if getattr(net, "scale", None) != scale:
            raise PipelineError(f"{path}: net scale {getattr(net, 'scale', None)} but data.scale is {scale}")
        nets.append(net.to(device))
    return nets


def infer_settings(cfg: dict, tta: int | None = None, tile: int | None = None) -> dict:
    """The inference keyword arguments of predict_scene from the config (`tta`/`tile` override)."""
    infer = cfg["infer"]
    return {"tta": int(infer["tta"] if tta is None else tta),
            "tile": int(infer["tile"] if tile is None else tile),
            "overlap": int(infer["tile_overlap"]), "batch": int(infer["batch"]),
            "precision": str(infer["precision"])}


def answer_name(cfg: dict, scene_id: int) -> str:
    return cfg["data"]["answer"].format(i=int(scene_id))


def test_scenes(cfg: dict) -> list[dict]:
    """The test split of the manifest: id, low path, expected answer name and shape."""
    scale = int(cfg["data"]["scale"])
    test = load_manifest("test")
    if test.empty:
        raise PipelineError(f"{paths.MANIFEST}: no test scenes")
    return [{"id": int(row.id), "low_path": row.low_path, "answer": answer_name(cfg, row.id),
             "shape": (int(row.low_height) * scale, int(row.low_width) * scale, 3)}
            for row in test.itertuples()]


def blend_config(blend: str | Path) -> tuple[dict, Path, dict]:
    """(config, blend file, blend record) of a blend: the first member's config, named after
    the blend (its predictions and zips go under that name), with the blend's TTA."""
    path, record = read_blend(blend)
    cfg = load_config(record["members"][0]["exp"])
    cfg["exp"] = record["name"]
    cfg["infer"]["tta"] = record["tta"]
    return cfg, path, record


def ensemble_checkpoints(cfg: dict, seeds: list[int] | None, blend: tuple[Path, dict] | None
                         ) -> tuple[list[Path], list[float] | None, dict]:
    """(checkpoints, per-net weights or None for equal, what the record adds) of one
    experiment's `seeds`, or of a blend (path, record)."""
    if blend is None:
        return select_checkpoints(cfg["exp"], seeds), None, {}
    path, record = blend
    weighted = weighted_checkpoints(record, path)
    extra = {"blend": {"name": record["name"], "path": relative_to_workdir(path), "sha256": sha256_file(path)},
             "members": [{k: m[k] for k in ("exp", "seeds", "weight")} for m in record["members"]]}
    return [p for p, _ in weighted], [w for _, w in weighted], extra


def run_ensemble(cfg: dict, seeds: list[int] | None = None, tta: int | None = None,
                 tile: int | None = None, blend: tuple[Path, dict] | None = None) -> dict:
    """Write the test predictions and ensemble.json of `cfg`'s experiment (or of `blend`,
    a (path, record) pair, with `cfg` from blend_config); returns the record."""
    start = time.time()
    exp = cfg["exp"]
    scale = int(cfg["data"]["scale"])
    settings = infer_settings(cfg, tta, tile)
    device = pick_device()
    scenes = test_scenes(cfg)
    ckpt_paths, net_weights, extra = ensemble_checkpoints(cfg, seeds, blend)
    records = [checkpoint_record(p) for p in ckpt_paths]
    if net_weights is not None:
        for r, w in zip(records, net_weights):
            r["weight"] = w
    nets = load_nets(ckpt_paths, scale, device)
    # "auto" resolved here, so ensemble.json records what ran
    settings["precision"] = choose(settings["precision"], device, torch.nn.ModuleList(nets), training=False).name
    out_dir = paths.predictions_dir(exp)
    with io.locked(out_dir), io.atomic_dir(out_dir) as tmp:
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
    add_set_argument(parser)


def main(args) -> int:
    if getattr(args, "blend", None):
        if args.seeds:
            raise PipelineError("--seeds and --blend exclude each other (the blend records its members' seeds)")
        if args.overrides:
            raise PipelineError("--set and --blend exclude each other (a blend's members keep their own configs)")
        cfg, path, blend = blend_config(args.blend)
        record = run_ensemble(cfg, tta=args.tta, tile=args.tile, blend=(path, blend))
    else:
        cfg = load_config(args.exp, args.overrides)
        record = run_ensemble(cfg, seeds=args.seeds or None, tta=args.tta, tile=args.tile)
    n = len(record["checkpoints"])
    print(f"ensemble {cfg['exp']}: {len(record['answers'])} test scenes x {n} checkpoint(s) "
          f"(seeds {' '.join(map(str, record['seeds']))}) x {record['tta']} TTA views, "
          f"{record['precision']} on {record['device']}, {record['seconds']:.1f} s "
          f"-> {paths.predictions_dir(cfg['exp'])}")
    return 0
