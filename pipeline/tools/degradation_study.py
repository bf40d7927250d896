"""How far apart the probe's candidates are, and what damaged low-res scores: the figures
behind degradation.FIT_PSNR (docs/data.md, "Degradation probe").

    python -m pipeline.tools.degradation_study [--source ../shared/data/ucmerced_urban] [--n 20]

For every candidate as the truth, low-res images are made from n real tiles and the
probe's top three are printed (the truth should be 100 dB; the next ones show how close
other kernels come); then the same for low-res with something on top of Pillow bicubic:
Gaussian noise, JPEG compression, truncation instead of rounding.
"""
from __future__ import annotations

import argparse
import io as bytes_io
from typing import Callable

import numpy as np
from PIL import Image

from pipeline.core import io, paths
from pipeline.data import degradation
from pipeline.data.competition import crop_to_scale


def _jpeg(low: np.ndarray, quality: int) -> np.ndarray:
    buf = bytes_io.BytesIO()
    Image.fromarray(low).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf))


def _truncated_skimage(high: np.ndarray, scale: int) -> np.ndarray:
    from skimage.transform import resize

    h, w = high.shape[:2]
    return (resize(high, (h // scale, w // scale), order=3, anti_aliasing=True) * 255).astype(np.uint8)


def damaged(rng: np.random.Generator) -> dict[str, Callable[[np.ndarray, int], np.ndarray]]:
    def noisy(sigma):
        return lambda h, s: np.clip(degradation.downscale(h, s) + rng.normal(0, sigma, (h.shape[0] // s, h.shape[1] // s, 3)),
                                    0, 255).round().astype(np.uint8)
    return {"pil-bicubic + noise 1": noisy(1.0), "pil-bicubic + noise 1.5": noisy(1.5),
            "pil-bicubic + noise 2": noisy(2.0),
            "pil-bicubic + JPEG 95": lambda h, s: _jpeg(degradation.downscale(h, s), 95),
            "pil-bicubic + JPEG 90": lambda h, s: _jpeg(degradation.downscale(h, s), 90),
            "skimage-aa truncated": _truncated_skimage,
            "gauss0.65 (off the grid)": lambda h, s: degradation.gauss_downscale(h, s, 0.65)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(paths.SHARED_DATA / "ucmerced_urban"))
    parser.add_argument("--n", type=int, default=20, help="tiles, spread over the folder (default 20)")
    parser.add_argument("--scale", type=int, default=4)
    args = parser.parse_args(argv)
    files = degradation.spread(io.list_images(args.source, recursive=True), args.n)
    highs = [crop_to_scale(io.read_image(p), args.scale) for p in files]
    truths: dict[str, Callable] = {name: (lambda h, s, k=name: degradation.downscale(h, s, k))
                                   for name in degradation.KERNELS}
    truths.update(damaged(np.random.default_rng(0)))
    print(f"{len(highs)} tiles of {args.source}, x{args.scale}: the probe's top three (mean PSNR dB)")
    for label, make in truths.items():
        errors = [degradation.scene_errors(h, make(h, args.scale), args.scale) for h in highs]
        top = degradation.rank_candidates(errors)[:3]
        print(f"  {label:<26} " + "   ".join(f"{c.kernel} {c.psnr:.1f}" for c in top))


if __name__ == "__main__":
    main()
