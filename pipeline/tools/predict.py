"""`python -m pipeline predict`: super-resolve images with a net, pretrained weights or checkpoints.

    predict --model rlfn --weights rlfn_x4 --input scenes/ --output out/ --tta 8
    predict --checkpoint models/aerial --input data/interim/evaluation --output out/

Every input image (tif/png/jpg, any size, RGB) gives `<output>/<same file name>`, uint8
RGB, scale x larger. `--checkpoint` takes one pipeline checkpoint, an experiment folder
whose `seed*/fold*/best.pt` are all ensembled exactly as stage 04 does (the same
`inference.predict_scene`: every net x TTA view averaged in float, rounded once), or one
seed's folder (`models/aerial/seed0`: its `fold*/best.pt`), or a blend file
(`models/blends/<name>/blend.json`: every member's checkpoints, weighted as stage 04 does;
its TTA unless `--tta` is given).
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch.nn as nn
from tqdm import tqdm

from pipeline.core import io, locks, paths
from pipeline.core.artifacts import is_blend_file, read_blend
from pipeline.core.device import pick_device
from pipeline.core.errors import PipelineError
from pipeline.infer.ensemble import PRECISIONS, predict_scene
from pipeline.infer.load import checkpoint_paths, load_nets, named_net
from pipeline.infer.precision import choose
from pipeline.infer.tta import TTA_CHOICES

LOSSY_SUFFIXES = {".jpg", ".jpeg"}


def input_images(path: Path) -> list[Path]:
    if path.is_dir():
        images = io.list_images(path)
        if not images:
            raise PipelineError(f"{path}: no tif/png/jpg image in this folder")
        return images
    if not path.is_file():
        raise PipelineError(f"{path}: input not found")
    if not io.is_image(path):
        raise PipelineError(f"{path}: not a tif/png/jpg image")
    return [path]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="net name (see pipeline/nets), e.g. rlfn, swinir_s, bicubic")
    parser.add_argument("--weights", help="weight file or known name (rlfn_x4, ...) for --model")
    parser.add_argument("--checkpoint", type=Path,
                        help="a pipeline checkpoint or run folder (models/<exp>/seed0/full: a full-data fit), "
                             "models/<exp> to ensemble its seed*/fold*/best.pt, or "
                             "models/blends/<name>/blend.json (a weighted blend of experiments)")
    parser.add_argument("--models", choices=tuple(paths.ENSEMBLE_RUNS), default="folds",
                        help="for an experiment, seed or blend: its folds' checkpoints (default), "
                             "its full-data fits, or both")
    parser.add_argument("--input", required=True, type=Path, help="an image or a folder of images")
    parser.add_argument("--output", required=True, type=Path, help="folder for the results (same file names)")
    parser.add_argument("--scale", type=int, default=None, help="upscaling factor (checked against the net)")
    parser.add_argument("--tta", type=int, default=None, choices=TTA_CHOICES,
                        help="dihedral views averaged per net (default 1, a blend's own for a blend; "
                             "8 = all flips/rotations)")
    parser.add_argument("--tile", type=int, default=0, help="LR tile side for tiled inference (0 = whole image)")
    parser.add_argument("--overlap", type=int, default=16, help="LR pixels shared by neighbouring tiles")
    parser.add_argument("--batch", type=int, default=8, help="views/tiles per forward pass")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="fp32 (default), bf16, fp16, or auto: what the device runs natively (pipeline/infer/precision.py)")
    parser.add_argument("--device", default=None, help="auto (default: a GPU torch can use, else the CPU), cpu, cuda, cuda:1 ...")


def main(args: argparse.Namespace) -> int:
    start = time.time()
    images = input_images(args.input)
    out_dir = args.output
    if out_dir.resolve() in {p.parent.resolve() for p in images}:
        raise PipelineError(f"{out_dir}: the output folder holds the inputs; results would overwrite them")
    if args.checkpoint is not None:
        if args.weights is not None:
            raise PipelineError("--weights and --checkpoint exclude each other (a checkpoint holds its weights)")
        checkpoints, net_weights = checkpoint_paths(args.checkpoint, args.models)
        nets = load_nets(checkpoints, args.scale, args.model)
    elif args.model is not None:
        nets, net_weights = [named_net(args.model, args.weights, args.scale)], None
    else:
        raise PipelineError("give --model NAME (with --weights) or --checkpoint CKPT_OR_EXPDIR")
    if args.tta is None:
        blend = args.checkpoint is not None and is_blend_file(args.checkpoint)
        args.tta = read_blend(args.checkpoint)[1]["tta"] if blend else 1
    device = pick_device(args.device)
    lossy = [p.name for p in images if p.suffix.lower() in LOSSY_SUFFIXES]
    if lossy:
        warnings.warn(f"{len(lossy)} JPEG input(s): their results are written as JPEG too (lossy)")
    precision = choose(args.precision, device, nn.ModuleList(nets), training=False)
    settings = dict(tta=args.tta, tile=args.tile, overlap=args.overlap, batch=args.batch,
                    device=device, precision=precision.name, weights=net_weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(images, desc=f"predict ({len(nets)} net{'s' * (len(nets) > 1)} x {args.tta} views)",
               unit="image", disable=None)
    with locks.locked(out_dir, what=f"{out_dir} (predict's output folder)"):
        for path in bar:
            lr = io.read_image(path)
            io.write_image(out_dir / path.name, predict_scene(nets, lr, **settings))
    print(f"{len(images)} image(s) -> {out_dir} ({len(nets)} net(s), tta {args.tta}, "
          f"tile {args.tile or 'none'}, {precision.name}, {device}) in {time.time() - start:.1f}s")
    return 0
