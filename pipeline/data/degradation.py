"""Which downscaler made the low-res images, and the same downscalers to make new ones.

    python -m pipeline degradation --exp E      (run by `make unzip` after stage 00)
      data/interim/manifest.csv (training pairs) -> data/interim/degradation.json

One place for every candidate kernel (name -> downscale function): the probe tries them,
`demo-data --kernel` builds competitions with them, and external data (`data.extra`)
gets its low-res images from the probe's answer. Candidates:

    pil-bicubic, pil-lanczos, pil-bilinear, pil-box   Pillow's resize: its kernel widened by
                                                      the scale, i.e. antialiased
    cv2-area, cv2-cubic, cv2-linear                   OpenCV INTER_AREA / INTER_CUBIC /
                                                      INTER_LINEAR: the last two are not
                                                      antialiased (a few source pixels per output)
    skimage-aa, skimage                               scikit-image `resize(order=3)` with and
                                                      without `anti_aliasing` (Gaussian prefilter)
    skimage-aa-linear                                 `resize` with its defaults when shrinking
                                                      (order 1 + anti_aliasing)
    matlab-bicubic                                    MATLAB `imresize(x, 1/s)`: the SR literature's
                                                      kernel (Set5/Set14/DIV2K LR_bicubic)
    gauss<sigma>[@<dy>,<dx>]                          cv2.GaussianBlur(sigma) then every s-th pixel
                                                      from row dy, column dx (default 0,0)

Same operation, different code: pil-box and cv2-area at every integer scale (both the
mean of each s x s block; they differ only in rounding); at odd scales cv2-cubic,
cv2-linear and skimage, which then all take the centre pixel of each block, and
skimage-aa and skimage-aa-linear (Gaussian sigma (s-1)/2, then that pixel: close to
gauss<(s-1)/2>@<s//2>,<s//2>, whose blur is truncated sooner). At even
scales scikit-image's `resize(order=1)` without antialiasing is cv2-linear (both average
the two middle pixels of each block), so it is not a separate candidate. torchvision's antialiased bicubic resize
is Pillow's by design. The probe names the implementation that matches, and its margin
is measured over the next candidate that is a different operation.

The probe downscales each training high-res image with every candidate and compares it
with the given low-res image (PSNR on uint8, per scene, then the mean over scenes). Only
two corner crops of each scene are compared (they hold all four kinds of border, where
implementations differ most): the result does not depend on the scene size, and 60
scenes of the competition's size take a few seconds.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from pipeline.core import io
from pipeline.core.artifacts import degradation_path
from pipeline.core.errors import PipelineError

# --- the candidates --------------------------------------------------------------------

Downscale = Callable[[np.ndarray, int], np.ndarray]   # (high uint8 HxWx3, scale) -> low uint8


def _pil(resample: int) -> Downscale:
    def run(high: np.ndarray, s: int) -> np.ndarray:
        h, w = high.shape[:2]
        return np.asarray(Image.fromarray(high).resize((w // s, h // s), resample=resample))
    return run


def _cv2(interpolation: int) -> Downscale:
    def run(high: np.ndarray, s: int) -> np.ndarray:
        h, w = high.shape[:2]
        return cv2.resize(high, (w // s, h // s), interpolation=interpolation)
    return run


def _skimage(order: int, anti_aliasing: bool) -> Downscale:
    def run(high: np.ndarray, s: int) -> np.ndarray:
        from skimage.transform import resize

        h, w = high.shape[:2]
        low = resize(high, (h // s, w // s), order=order, anti_aliasing=anti_aliasing, preserve_range=True)
        return np.clip(np.rint(low), 0, 255).astype(np.uint8)
    return run


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's and Pillow's 'bicubic')."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _imresize_taps(n_in: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB imresize's weights and source indices (0-based) for one axis shrunk by s."""
    u = np.arange(1, n_in // s + 1) * s + 0.5 * (1 - s)      # output centres, 1-based input coords
    width = 4.0 * s                                          # the cubic's support, widened: antialiasing
    left = np.floor(u - width / 2)
    idx = left[:, None] + np.arange(int(math.ceil(width)) + 2)[None, :]
    w = _keys_cubic((u[:, None] - idx) / s) / s
    w /= w.sum(axis=1, keepdims=True)
    # MATLAB clamps out-of-range indices ("replicating end-points"); some ports mirror
    # instead, which changes the 2 outer low-res pixels (the Set5/Set14 files are clamped)
    return w, np.clip(idx.astype(np.int64) - 1, 0, n_in - 1)


def matlab_bicubic(high: np.ndarray, s: int) -> np.ndarray:
    """MATLAB `imresize(high, 1/s)` (bicubic, antialiased) on uint8: rows first, each pass
    in double and rounded to uint8 (what its MEX core returns for uint8 input)."""
    a = high.astype(np.float64)
    for axis in (0, 1):
        w, idx = _imresize_taps(a.shape[axis], s)
        moved = np.moveaxis(a, axis, 0)
        out = np.einsum("ok,ok...->o...", w, moved[idx])
        a = np.moveaxis(np.clip(np.floor(out + 0.5), 0, 255), 0, axis)   # round half away from zero
    return a.astype(np.uint8)


def gauss_downscale(high: np.ndarray, s: int, sigma: float, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Gaussian blur (OpenCV, kernel size from sigma, uint8 out) then every s-th pixel."""
    dy, dx = offset
    blurred = cv2.GaussianBlur(high, (0, 0), sigmaX=sigma, sigmaY=sigma)
    h, w = high.shape[0] // s, high.shape[1] // s
    return np.ascontiguousarray(blurred[dy::s, dx::s][:h, :w])


KERNELS: dict[str, Downscale] = {
    "pil-bicubic": _pil(Image.Resampling.BICUBIC),
    "pil-lanczos": _pil(Image.Resampling.LANCZOS),
    "pil-bilinear": _pil(Image.Resampling.BILINEAR),
    "pil-box": _pil(Image.Resampling.BOX),
    "cv2-area": _cv2(cv2.INTER_AREA),
    "cv2-cubic": _cv2(cv2.INTER_CUBIC),
    "cv2-linear": _cv2(cv2.INTER_LINEAR),
    "skimage-aa": _skimage(3, True),
    "skimage": _skimage(3, False),
    "skimage-aa-linear": _skimage(1, True),
    "matlab-bicubic": matlab_bicubic,
}
GAUSS_SIGMAS = tuple(round(0.6 + 0.1 * k, 1) for k in range(20))   # 0.6 .. 2.5
_GAUSS_NAME = re.compile(r"gauss(\d+(?:\.\d+)?)(?:@(\d+),(\d+))?\Z")


def gauss_name(sigma: float, offset: tuple[int, int] = (0, 0)) -> str:
    return f"gauss{sigma:g}" + (f"@{offset[0]},{offset[1]}" if tuple(offset) != (0, 0) else "")


def parse_gauss(name: str) -> tuple[float, tuple[int, int]] | None:
    match = _GAUSS_NAME.match(name)
    if not match:
        return None
    return float(match.group(1)), (int(match.group(2) or 0), int(match.group(3) or 0))


def kernel_names() -> str:
    return ", ".join(KERNELS) + ", gauss<sigma>[@<dy>,<dx>]"


def check_kernel(name: str, scale: int | None = None) -> str:
    """The name itself if it is a known kernel (a gauss offset must be below the scale)."""
    gauss = parse_gauss(name)
    if name in KERNELS or (gauss and gauss[0] > 0 and (scale is None or max(gauss[1]) < scale)):
        return name
    if gauss and gauss[0] > 0:
        raise PipelineError(f"kernel '{name}': sampling offset {gauss[1]} must be below the scale {scale}")
    raise PipelineError(f"unknown kernel '{name}' (known: {kernel_names()})")


def downscale(high: np.ndarray, scale: int, kernel: str = "pil-bicubic") -> np.ndarray:
    """Low-res image exactly 1/scale of `high` (whose sides must be multiples of scale)."""
    check_kernel(kernel, scale)
    if high.shape[0] % scale or high.shape[1] % scale:
        raise PipelineError(f"image of shape {high.shape} is not a multiple of scale {scale}")
    gauss = parse_gauss(kernel)
    if kernel not in KERNELS and gauss:
        return gauss_downscale(high, scale, *gauss)
    return KERNELS[kernel](high, scale)


def same_operation_as(name: str, scale: int) -> set[str]:
    """The candidates that compute the same thing as `name` at this scale (itself included)."""
    groups = [{"pil-box", "cv2-area"}]          # the mean of each s x s block
    if scale % 2:   # odd: output centres fall on pixels, so the interpolation order drops out
        groups += [{"cv2-cubic", "cv2-linear", "skimage"},   # the centre pixel of each block
                   {"skimage-aa", "skimage-aa-linear"}]     # Gaussian prefilter, then that pixel
    return next((g for g in groups if name in g), {name})


def same_operation(a: str, b: str, scale: int) -> bool:
    return b in same_operation_as(a, scale)


# --- the probe -------------------------------------------------------------------------

# Best mean PSNR below which no candidate counts as the one that made the images: an RMS
# error of 1.4 levels. Measured on real aerial tiles (`python -m pipeline.tools.degradation_study`,
# docs/data.md): the right kernel gives 100 dB, the same operation from other code 54 dB,
# truncation instead of rounding 51, an off-grid Gaussian sigma 50 (all still fit); near
# relatives that are different operations 46-50 (the margin tells them apart), other
# kernels 36-40; a known kernel under noise of 2 levels 42, under JPEG q95 36.5.
FIT_PSNR = 45.0
PSNR_CAP = 100.0          # identical images (MSE 0) are reported as 100 dB
PROBE_CROP = 48           # low-res side of each compared corner crop
PROBE_MARGIN = 8          # low-res pixels computed beyond a crop's inner sides, then dropped:
                          # kernels reach < 4, scikit-image's cubic-spline prefilter further
                          # (x0.27 a pixel: at 4 a value in ~10^5 rounded the other way)
PROBE_SCENES = 60         # scenes compared at most (evenly spread over the training set)


def psnr_from_mse(mse: float) -> float:
    return min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse)) if mse > 0 else PSNR_CAP


def _corner_crops(high: np.ndarray, low: np.ndarray, s: int):
    """(high crop, low crop, slice of the candidate's output to compare) for the top-left
    and bottom-right corners: each crop keeps two real image borders; on its inner sides
    PROBE_MARGIN extra low-res pixels are computed and dropped."""
    h, w = low.shape[:2]
    ch, cw = min(PROBE_CROP, h), min(PROBE_CROP, w)
    eh, ew = min(h, ch + PROBE_MARGIN), min(w, cw + PROBE_MARGIN)
    yield high[:eh * s, :ew * s], low[:ch, :cw], (slice(0, ch), slice(0, cw))
    if (h, w) != (ch, cw):
        yield (high[(h - eh) * s:, (w - ew) * s:], low[h - ch:, w - cw:],
               (slice(eh - ch, eh), slice(ew - cw, ew)))


def scene_errors(high: np.ndarray, low: np.ndarray, s: int) -> dict:
    """For one pair: summed squared error, exact pixel count and pixel count of every named
    kernel, and of every Gaussian sigma x sampling offset (arrays [sigma, dy, dx])."""
    named = {name: np.zeros(2) for name in KERNELS}
    gauss = np.zeros((len(GAUSS_SIGMAS), s, s, 2))
    n = 0
    for hi, lo, where in _corner_crops(high, low, s):
        lo = lo.astype(np.int32)
        n += lo.size
        for name, fn in KERNELS.items():
            diff = (fn(hi, s)[where].astype(np.int32) - lo).ravel()
            named[name] += [np.dot(diff, diff), diff.size - np.count_nonzero(diff)]
        eh, ew = hi.shape[0] // s, hi.shape[1] // s
        for k, sigma in enumerate(GAUSS_SIGMAS):
            blurred = cv2.GaussianBlur(hi, (0, 0), sigmaX=sigma, sigmaY=sigma)
            # every sampling offset at once: [dy, dx, row, column, channel]
            phases = blurred.reshape(eh, s, ew, s, -1).transpose(1, 3, 0, 2, 4)[:, :, where[0], where[1]]
            diff = (phases.astype(np.int32) - lo).reshape(s, s, -1)
            gauss[k, ..., 0] += np.einsum("abi,abi->ab", diff, diff)
            gauss[k, ..., 1] += diff.shape[-1] - np.count_nonzero(diff, axis=-1)
    return {"named": named, "gauss": gauss, "n": n}


@dataclass
class Candidate:
    kernel: str
    psnr: float           # mean over scenes of the per-scene PSNR
    min_psnr: float       # the worst scene
    exact: float          # share of compared low-res values reproduced exactly


def rank_candidates(errors: list[dict]) -> list[Candidate]:
    """Candidates sorted by mean PSNR, one per named kernel and one per Gaussian sigma
    (at the sampling offset that fits best over all scenes)."""
    n = np.array([e["n"] for e in errors], dtype=np.float64)

    def summary(sse: np.ndarray, same: np.ndarray) -> tuple[float, float, float]:
        per_scene = [psnr_from_mse(v) for v in sse / n]
        return float(np.mean(per_scene)), float(np.min(per_scene)), float(same.sum() / n.sum())

    out = []
    for name in KERNELS:
        sse = np.array([e["named"][name][0] for e in errors])
        same = np.array([e["named"][name][1] for e in errors])
        out.append(Candidate(name, *summary(sse, same)))
    gauss = np.stack([e["gauss"] for e in errors])       # scenes x sigma x dy x dx x 2
    for k, sigma in enumerate(GAUSS_SIGMAS):
        best = None
        for dy in range(gauss.shape[2]):
            for dx in range(gauss.shape[3]):
                c = Candidate(gauss_name(sigma, (dy, dx)), *summary(gauss[:, k, dy, dx, 0], gauss[:, k, dy, dx, 1]))
                best = c if best is None or c.psnr > best.psnr else best
        out.append(best)
    return sorted(out, key=lambda c: -c.psnr)


def probe_pairs(pairs: list[tuple[Path, Path]], scale: int, n_jobs: int = -1) -> list[dict]:
    """scene_errors of every (low path, high path), on threads (cv2, Pillow and numpy
    release the GIL: no process start-up, no image pickling)."""
    from joblib import Parallel, delayed

    def one(low_path: Path, high_path: Path) -> dict:
        low, high = io.read_image(low_path), io.read_image(high_path)
        if high.shape[:2] != (low.shape[0] * scale, low.shape[1] * scale):
            raise PipelineError(f"{high_path}: {high.shape[1]}x{high.shape[0]} is not {scale}x the low "
                                f"image's {low.shape[1]}x{low.shape[0]}")
        return scene_errors(high, low, scale)

    return Parallel(n_jobs=n_jobs, prefer="threads")(delayed(one)(lo, hi) for lo, hi in pairs)


def spread(items: list, n: int | None) -> list:
    """At most n items evenly spread over the list (all of them when n is None or larger)."""
    if n is None or len(items) <= n:
        return list(items)
    return [items[k] for k in np.linspace(0, len(items) - 1, n).round().astype(int)]


def probe(pairs: list[tuple[Path, Path]], scale: int, max_scenes: int | None = PROBE_SCENES,
          n_jobs: int = -1) -> dict:
    """The degradation.json record for these training pairs (see DESIGN.md)."""
    if not pairs:
        raise PipelineError("degradation: no training pairs to compare")
    used = spread(pairs, max_scenes)
    ranked = rank_candidates(probe_pairs(used, scale, n_jobs))
    best = ranked[0]
    runner_up = next((c for c in ranked[1:] if not same_operation(c.kernel, best.kernel, scale)), None)
    return {
        "best": best.kernel,
        "psnr": round(best.psnr, 3),
        "margin": round(best.psnr - runner_up.psnr, 3) if runner_up else None,
        "fits": best.psnr >= FIT_PSNR,
        "threshold": FIT_PSNR,
        "scale": scale,
        "scenes": len(used),
        "scenes_total": len(pairs),
        "candidates": [{"kernel": c.kernel, "psnr": round(c.psnr, 3), "min_psnr": round(c.min_psnr, 3),
                        "exact": round(c.exact, 5)} for c in ranked],
    }


def format_table(result: dict, gauss_rows: int = 3) -> str:
    """The ranked table: every named kernel, the best few Gaussian sigmas, margin and verdict."""
    best = result["best"]
    lines = [f"{'rank':>4}  {'kernel':<18} {'PSNR dB':>8} {'worst':>8} {'exact':>7}  note",
             f"{'-' * 4}  {'-' * 18} {'-' * 8} {'-' * 8} {'-' * 7}  ----"]
    shown_gauss, hidden = 0, 0
    for rank, c in enumerate(result["candidates"], 1):
        if c["kernel"].startswith("gauss") and c["kernel"] != best:
            if shown_gauss >= gauss_rows:
                hidden += 1
                continue
            shown_gauss += 1
        twins = sorted(same_operation_as(c["kernel"], result["scale"]) - {c["kernel"]})
        note = f"same operation as {', '.join(twins)} at x{result['scale']}" if twins else ""
        if c["kernel"] == best:
            note = "<- best" + (f"; {note}" if note else "")
        lines.append(f"{rank:>4}  {c['kernel']:<18} {c['psnr']:>8.2f} {c['min_psnr']:>8.2f} "
                     f"{100 * c['exact']:>6.1f}%  {note}".rstrip())
    if hidden:
        lines.append(f"      ... {hidden} more Gaussian sigmas (0.6-2.5) in {degradation_path()}")
    margin = result["margin"]
    margin_text = f"margin {margin:.2f} dB over the next different operation" if margin is not None else "no other candidate"
    scenes = f"{result['scenes']} of {result['scenes_total']} training scenes, x{result['scale']}"
    if result["fits"]:
        verdict = f"degradation: the low-res images were made with {best} ({result['psnr']:.2f} dB, {margin_text}; {scenes})"
    else:
        verdict = (f"degradation: no candidate reproduces the low-res images (best {result['psnr']:.2f} dB < "
                   f"{result['threshold']:.0f} dB); the closest is {best} ({margin_text}; {scenes}). "
                   f"External data needs data.extra_kernel set by hand.")
    return "\n".join(lines + [verdict])
