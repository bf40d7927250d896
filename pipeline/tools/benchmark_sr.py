"""`python -m pipeline benchmark-sr`: Y-PSNR / Y-SSIM on the standard SR test sets.

The paper protocol (as BasicSR and the RLFN/SwinIR papers measure): the LR image is the
MATLAB-bicubic one shipped with the set, the output is clamped and rounded to uint8,
the HR image is cropped to a multiple of the scale, and PSNR/SSIM are computed on the Y
channel (BT.601) with `scale` border pixels cropped, SSIM with the 11x11 Gaussian window
(metrics.y_psnr / metrics.y_ssim). Layout read: <root>/<set>/HR/<name>.png and
<root>/<set>/LR_bicubic/X<s>/<name>x<s>.png. Greyscale images (Set14's bridge) are read
as three equal channels, as the reference code's colour reader does.

Writes a per-set CSV (`--out`, default bench/sr_<model>_x<s>.csv) and a per-image one
beside it (`..._images.csv`), and prints the per-set table in markdown.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

from pipeline.core import paths
from pipeline.core.checkpoints import is_pipeline_checkpoint
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path, to_rgb_uint8
from pipeline.core.locks import locked
from pipeline.core.metrics import y_psnr, y_ssim
from pipeline.infer.ensemble import predict_scene


def read_benchmark_image(path: Path) -> np.ndarray:
    """uint8 RGB; a greyscale file becomes three equal channels (the protocol's reading)."""
    try:
        with Image.open(path) as im:
            if im.mode in ("L", "P"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except Exception as exc:
        raise PipelineError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return to_rgb_uint8(arr, path)


def benchmark_pairs(root: Path, set_name: str, scale: int) -> list[tuple[str, Path, Path]]:
    """(name, lr_path, hr_path) for every HR image of a set, each with its LR partner."""
    hr_dir = root / set_name / "HR"
    lr_dir = root / set_name / "LR_bicubic" / f"X{scale}"
    if not hr_dir.is_dir():
        raise PipelineError(f"{hr_dir}: no such folder (expected <root>/{set_name}/HR/*.png)")
    pairs = []
    for hr in sorted(hr_dir.glob("*.png")):
        lr = lr_dir / f"{hr.stem}x{scale}.png"
        if not lr.is_file():
            raise PipelineError(f"{lr}: LR partner of {hr.name} missing")
        pairs.append((hr.stem, lr, hr))
    if not pairs:
        raise PipelineError(f"{hr_dir}: no .png images")
    return pairs


def evaluate_set(net: nn.Module, root: Path, set_name: str, scale: int, tta: int = 1) -> pd.DataFrame:
    """Per-image Y-PSNR / Y-SSIM of one set: columns set, image, y_psnr, y_ssim.

    Inference is the pipeline's own (inference.predict_scene, fp32, whole image): the
    output is clipped to [0, 1] and rounded to uint8 once, as the protocol does."""
    rows = []
    for name, lr_path, hr_path in tqdm(benchmark_pairs(root, set_name, scale), desc=set_name, leave=False):
        lr, hr = read_benchmark_image(lr_path), read_benchmark_image(hr_path)
        hr = hr[: hr.shape[0] // scale * scale, : hr.shape[1] // scale * scale]  # mod-crop
        sr = predict_scene([net], lr, tta=tta)
        if sr.shape[0] < hr.shape[0] or sr.shape[1] < hr.shape[1]:
            raise PipelineError(f"{lr_path}: output {sr.shape[:2]} smaller than HR {hr.shape[:2]}")
        sr = sr[: hr.shape[0], : hr.shape[1]]
        rows.append({"set": set_name, "image": name, "y_psnr": y_psnr(sr, hr, scale),
                     "y_ssim": y_ssim(sr, hr, scale)})
    return pd.DataFrame(rows)


def build_benchmark_net(model: str | None, weights: str | None, scale: int) -> tuple[nn.Module, str, str]:
    """(net in eval mode, net name, weights label) from --model and/or --weights.

    A pipeline checkpoint rebuilds its own net; a known weight name (rlfn_x4) implies its
    net; otherwise --model names the net. A net with parameters needs weights.
    """
    from pipeline.core.weights import known_weights, load_weights, read_weight_file, resolve_weights
    from pipeline.nets import build_net

    if weights is None:
        if model is None:
            raise PipelineError("benchmark-sr: give --model, --weights, or both")
        net = build_net(model, scale=scale)
        if any(True for _ in net.parameters()):
            raise PipelineError(f"benchmark-sr: net '{model}' has parameters; give its --weights")
        return net.eval(), model, "-"
    path = resolve_weights(weights)
    checkpoint = read_weight_file(path)
    if is_pipeline_checkpoint(checkpoint):  # the net it was trained as
        name = checkpoint["net"]["name"]
        net = build_net(name, **checkpoint["net"]["args"])
        return load_weights(net, checkpoint).eval(), name, str(path)
    known = known_weights(path.name)
    name = model or (known.net if known else None)
    if name is None:
        raise PipelineError(f"{weights}: not a known weight file; name its net with --model")
    net_args = dict(known.net_args) if known and known.net == name else {}
    net = build_net(name, **{**net_args, "scale": scale})
    return load_weights(net, path).eval(), name, path.name


def to_markdown(summary: pd.DataFrame) -> str:
    lines = ["| set | images | Y-PSNR (dB) | Y-SSIM |", "|---|---:|---:|---:|"]
    for r in summary.itertuples():
        lines.append(f"| {r.set} | {r.images} | {r.y_psnr:.2f} | {r.y_ssim:.4f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registered net name (rlfn, swinir_s, bicubic, ...)")
    parser.add_argument("--weights", help="weight file, known name (rlfn_x4) or pipeline checkpoint")
    parser.add_argument("--root", type=Path, default=None,
                        help="folder holding <set>/HR and <set>/LR_bicubic/X<s> (default ../shared/data/sr_benchmarks)")
    parser.add_argument("--sets", nargs="+", default=["Set5", "Set14"])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--tta", type=int, default=1, choices=[1, 2, 4, 8],
                        help="dihedral views averaged (1: the paper protocol)")
    parser.add_argument("--out", type=Path, default=None, help="per-set CSV (default bench/sr_<model>_x<s>.csv)")


def main(args: argparse.Namespace) -> int:
    root = args.root if args.root is not None else paths.SHARED_DATA / "sr_benchmarks"
    net, model, weights = build_benchmark_net(args.model, args.weights, args.scale)
    if net.scale != args.scale:
        raise PipelineError(f"benchmark-sr: {model} upscales x{net.scale}, --scale is {args.scale}")
    per_image = pd.concat([evaluate_set(net, root, s, args.scale, args.tta) for s in args.sets],
                          ignore_index=True)
    summary = (per_image.groupby("set", sort=False)
               .agg(images=("image", "size"), y_psnr=("y_psnr", "mean"), y_ssim=("y_ssim", "mean"))
               .reset_index())
    summary.insert(0, "model", model)
    summary.insert(1, "weights", weights)
    summary.insert(2, "scale", args.scale)
    summary.insert(3, "tta", args.tta)
    tag = (model if weights == "-" else f"{model}_{Path(weights).stem}") + (f"_tta{args.tta}" if args.tta > 1 else "")
    out = args.out or paths.BENCH / f"sr_{tag}_x{args.scale}.csv"
    images_out = out.with_name(out.stem + "_images.csv")
    with locked(out):
        with atomic_path(out) as tmp:
            summary.to_csv(tmp, index=False, float_format="%.6f")
        with atomic_path(images_out) as tmp:
            per_image.to_csv(tmp, index=False, float_format="%.6f")
    print(to_markdown(summary))
    print(f"{model} ({weights}) x{args.scale}, tta {args.tta}, on {', '.join(args.sets)}: table in {out}, "
          f"per image in {images_out.name}")
    return 0
