"""Build a demo competition in exactly the organiser's format from ordinary photographs.

Writes `data/raw/train.zip` (flat `train_{i}_low.tif` + `train_{i}_high.tif`),
`data/raw/evaluation.zip` (flat `test_{i}_low.tif`) and keeps the test answers as
`data/demo/answers/test_{i}_high.tif`, so a demo submission can be scored. File patterns
and scale come from the experiment config (`data` section).

High-res scenes are tiles of the source images (or whole images with `--tile 0`), centre
cropped to a multiple of the scale and to at most the competition's 1200x1500. Low-res is
a downscale of the high-res scene by exactly the scale; the organiser's kernel is not
published, so the default is Pillow's bicubic (Keys a=-0.5, support widened by the scale,
i.e. antialiased), the usual "bicubic" of Python SR data preparation; `--kernel` picks
any candidate of the degradation probe (pipeline.data.degradation). Without `--source`, the sources are the RGB photographs bundled inside
scikit-image, so the demo builds offline on any machine. The same arguments and seed give
byte-identical zips, and a zip whose content did not change is not rewritten (its date
stays, so `make` does not redo the stages after it).

With `--source`, `data/raw/groups.csv` (id,group of the training scenes) says which
scenes come from one place, for stage 01's grouped folds (pipeline/data/folds.py: folder plus
a block of tile numbers); `--test-numbers 30-44` makes those tile numbers of every
folder the test set, so the test holds places the training never saw.
"""
from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path

import numpy as np

from pipeline.core import io, locks, paths
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.competition import MAX_HIGH_SIZE, MIN_LOW_SIDE, answer_pattern, crop_to_scale, tif_bytes, zip_bytes
from pipeline.data.degradation import KERNELS, check_kernel, downscale, kernel_names  # noqa: F401 (re-exported)
from pipeline.data.folds import source_group, tile_number

# scikit-image's bundled RGB photographs (greyscale, synthetic and mostly-black ones left out).
BUILTIN_SAMPLES = ("astronaut", "chelsea", "coffee", "immunohistochemistry", "rocket", "motorcycle")
BUILTIN_TILE = 192        # small scenes (rounded down to a multiple of the scale): the whole demo
                          # pipeline, training included, runs in minutes on a CPU
BUILTIN_COUNTS = (16, 6)  # train, test scenes from the built-in photographs
def tile_image(image: np.ndarray, tile: int) -> list[np.ndarray]:
    """Non-overlapping tile x tile squares on a grid centred in the image."""
    rows, cols = image.shape[0] // tile, image.shape[1] // tile
    top, left = (image.shape[0] - rows * tile) // 2, (image.shape[1] - cols * tile) // 2
    return [image[top + r * tile:top + (r + 1) * tile, left + c * tile:left + (c + 1) * tile]
            for r in range(rows) for c in range(cols)]


def builtin_sources() -> list[tuple[str, np.ndarray]]:
    """scikit-image's bundled RGB photographs (no download needed)."""
    import skimage.data

    out = []
    for name in BUILTIN_SAMPLES:
        image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
        out.append((name, io.to_rgb_uint8(image, f"skimage.data.{name}")))
    return out


def folder_sources(folder: Path) -> list[tuple[str, np.ndarray]]:
    """Every tif/png/jpg under `folder` (recursive) that is 8-bit RGB; others skipped with one warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: source folder not found")
    out, skipped = [], []
    for path in io.list_images(folder, recursive=True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # RGBA sources simply lose alpha
                out.append((str(path.relative_to(folder)), io.read_image(path)))
        except PipelineError as exc:
            skipped.append(str(exc))
    if skipped:
        warnings.warn(f"{folder}: skipped {len(skipped)} source image(s) that are not 8-bit RGB: "
                      + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    if not out:
        raise PipelineError(f"{folder}: no usable tif/png/jpg image found (searched recursively)")
    return out


def make_scenes(sources: list[tuple[str, np.ndarray]], scale: int, tile: int,
                rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """High-res scenes (name, image) from the sources, ordered round-robin across sources.

    Round-robin over shuffled sources and tiles means that taking the first N scenes
    draws from as many different source images as possible.
    """
    if tile and (tile % scale or tile > min(MAX_HIGH_SIZE)):
        raise PipelineError(f"--tile {tile} must be a multiple of scale {scale} and at most {min(MAX_HIGH_SIZE)}")
    per_source = []
    for name, image in sources:
        image = crop_to_scale(image, scale)
        crops = tile_image(image, tile) if tile else [image]
        crops = [c for c in crops if min(c.shape[:2]) >= MIN_LOW_SIDE * scale]
        order = rng.permutation(len(crops))
        per_source.append([(f"{name}#{k}", crops[k]) for k in order])
    per_source = [per_source[k] for k in rng.permutation(len(per_source))]
    scenes = []
    for depth in range(max((len(s) for s in per_source), default=0)):
        scenes += [s[depth] for s in per_source if depth < len(s)]
    return scenes


def split_counts(available: int, n_train: int | None, n_test: int | None,
                 test_fraction: float) -> tuple[int, int]:
    """Resolve how many train and test scenes to make (missing counts from the fraction)."""
    if not 0 < test_fraction < 1:
        raise PipelineError(f"--test-fraction {test_fraction} must be between 0 and 1")
    if n_train is None and n_test is None:
        n_test = max(1, round(available * test_fraction))
        n_train = available - n_test
    elif n_train is None:
        n_train = available - n_test
    elif n_test is None:
        n_test = max(1, round(n_train * test_fraction / (1 - test_fraction)))
    if n_train < 1 or n_test < 1:
        raise PipelineError(f"need at least 1 train and 1 test scene (got {n_train} train, {n_test} test)")
    if n_train + n_test > available:
        raise PipelineError(f"{n_train} train + {n_test} test scenes requested but the sources give only "
                            f"{available} (use a smaller --tile, more images or smaller counts)")
    return n_train, n_test


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write atomically unless the file already holds exactly these bytes; True if written."""
    if path.exists() and path.stat().st_size == len(data) and \
            hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest():
        return False
    with io.atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return True


def split_by_number(scenes: list[tuple[str, np.ndarray]], numbers: tuple[int, int], n_train: int | None,
                    n_test: int | None) -> tuple[list, list]:
    """(train, test): test = scenes whose source's tile number is in `numbers` (inclusive),
    train = the rest; each side cut to its count when one is given."""
    low, high = numbers
    test = [s for s in scenes if tile_number(s[0]) is not None and low <= tile_number(s[0]) <= high]
    train = [s for s in scenes if not (tile_number(s[0]) is not None and low <= tile_number(s[0]) <= high)]
    for side, count, name in ((train, n_train, "train"), (test, n_test, "test")):
        if count is not None and count > len(side):
            raise PipelineError(f"--n-{name} {count}: --test-numbers {low}-{high} leaves only {len(side)} {name} scenes")
    train, test = train[:n_train], test[:n_test]
    if not train or not test:
        raise PipelineError(f"--test-numbers {low}-{high}: {len(train)} train / {len(test)} test scenes; "
                            "the sources' file names need tile numbers on both sides of that range")
    return train, test


def parse_numbers(text: str) -> tuple[int, int]:
    """`30-44` -> (30, 44), for --test-numbers."""
    low, sep, high = text.partition("-")
    try:
        numbers = (int(low), int(high if sep else low))
    except ValueError:
        raise PipelineError(f"--test-numbers '{text}': expected a range like 30-44") from None
    if numbers[0] > numbers[1]:
        raise PipelineError(f"--test-numbers '{text}': the range is empty")
    return numbers


def write_groups(train_scenes: list[tuple[str, np.ndarray]] | None) -> int | None:
    """data/raw/groups.csv for the training scenes (None: no groups, an old file removed
    so stage 01 cannot apply it to other scenes); returns the number of groups."""
    target = paths.RAW / "groups.csv"
    if train_scenes is None:
        target.unlink(missing_ok=True)
        return None
    groups = [source_group(name) for name, _ in train_scenes]
    text = "id,group\n" + "".join(f"{i},{g}\n" for i, g in enumerate(groups))
    write_if_changed(target, text.encode())
    return len(set(groups))


def build_demo(source: Path | None = None, exp: str = "demo", scale: int | None = None,
               n_train: int | None = None, n_test: int | None = None, test_fraction: float = 0.25,
               tile: int | None = None, kernel: str = "pil-bicubic", seed: int = 0,
               test_numbers: tuple[int, int] | None = None) -> dict:
    """Build the demo competition under the current work folder; returns a summary dict."""
    data_cfg = load_config(exp)["data"]
    scale = int(scale or data_cfg["scale"])
    if scale < 1:
        raise PipelineError(f"scale {scale} must be a positive integer")
    check_kernel(kernel, scale)
    rng = np.random.default_rng(seed)
    if source is None:
        sources = builtin_sources()
        tile = BUILTIN_TILE // scale * scale if tile is None else tile
        if n_train is None and n_test is None:
            n_train, n_test = BUILTIN_COUNTS
    else:
        sources = folder_sources(source)
        tile = 0 if tile is None else tile
    scenes = make_scenes(sources, scale, tile, rng)
    if test_numbers is not None:
        train_scenes, test_scenes = split_by_number(scenes, test_numbers, n_train, n_test)
        n_train, n_test = len(train_scenes), len(test_scenes)
    else:
        n_train, n_test = split_counts(len(scenes), n_train, n_test, test_fraction)
        chosen = [scenes[k] for k in rng.permutation(n_train + n_test)]
        test_scenes, train_scenes = chosen[:n_test], chosen[n_test:]

    train_members = []
    for i, (_, high) in enumerate(train_scenes):
        train_members.append((data_cfg["train_low"].format(i=i), tif_bytes(downscale(high, scale, kernel))))
        train_members.append((data_cfg["train_high"].format(i=i), tif_bytes(high)))
    eval_members = [(data_cfg["test_low"].format(i=i), tif_bytes(downscale(high, scale, kernel)))
                    for i, (_, high) in enumerate(test_scenes)]
    answer_name = answer_pattern(data_cfg["test_low"])
    with locks.locked(paths.RAW, what=f"the demo competition ({paths.RAW}, {paths.DEMO_ANSWERS})"):
        written = [write_if_changed(paths.TRAIN_ZIP, zip_bytes(train_members)),
                   write_if_changed(paths.EVAL_ZIP, zip_bytes(eval_members))]
        with io.atomic_dir(paths.DEMO_ANSWERS) as tmp:
            for i, (_, high) in enumerate(test_scenes):
                (tmp / answer_name.format(i=i)).write_bytes(tif_bytes(high))
        n_groups = write_groups(train_scenes if source is not None else None)
    return {"n_train": n_train, "n_test": n_test, "scale": scale, "kernel": kernel, "tile": tile,
            "sources": len(sources), "written": written, "groups": n_groups,
            "train_sources": [name for name, _ in train_scenes],
            "test_sources": [name for name, _ in test_scenes]}


def add_arguments(parser) -> None:
    parser.add_argument("--source", type=Path, default=None,
                        help="folder of high-res tif/png/jpg images, searched recursively "
                             "(default: scikit-image's bundled RGB photographs)")
    parser.add_argument("--exp", default="demo", help="experiment name or YAML path giving file patterns and scale")
    parser.add_argument("--scale", type=int, default=None, help="downscale factor (default: the config's data.scale)")
    parser.add_argument("--n-train", type=int, default=None,
                        help=f"training scenes (default: {BUILTIN_COUNTS[0]} from the built-in photographs; "
                             "from --source: all scenes minus the test share)")
    parser.add_argument("--n-test", type=int, default=None,
                        help=f"test scenes (default: {BUILTIN_COUNTS[1]} from the built-in photographs; "
                             "from --source: --test-fraction of the scenes)")
    parser.add_argument("--test-fraction", type=float, default=0.25,
                        help="share of scenes that become test scenes when counts are not given (default 0.25)")
    parser.add_argument("--tile", type=int, default=None,
                        help=f"cut sources into tile x tile high-res scenes; 0 = one scene per image "
                             f"(default: {BUILTIN_TILE} for the built-in photographs, 0 with --source)")
    parser.add_argument("--kernel", default="pil-bicubic", metavar="NAME",
                        help="downscale kernel, as the degradation probe names them (default pil-bicubic: "
                             f"Pillow bicubic, antialiased): {kernel_names()}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tile choice and split (default 0)")
    parser.add_argument("--test-numbers", default=None, metavar="A-B",
                        help="with --source: sources whose file name ends in a number A..B are the test set, "
                             "the rest train (a split by place for numbered tiles, e.g. UC Merced 30-44)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="build under this work folder instead of the project's (same as SR_WORKDIR): "
                             "a second competition, e.g. a benchmark, lives beside the demo")


def main(args) -> int:
    if args.workdir is not None:
        paths.set_workdir(args.workdir)
    start = time.time()
    summary = build_demo(source=args.source, exp=args.exp, scale=args.scale, n_train=args.n_train,
                         n_test=args.n_test, test_fraction=args.test_fraction, tile=args.tile,
                         kernel=args.kernel, seed=args.seed,
                         test_numbers=parse_numbers(args.test_numbers) if args.test_numbers else None)
    state = "written" if any(summary["written"]) else "unchanged"
    print(f"demo-data: {summary['n_train']} train + {summary['n_test']} test scenes from "
          f"{summary['sources']} source image(s), x{summary['scale']} {summary['kernel']}, "
          f"tile {summary['tile'] or 'whole image'} -> {paths.RAW} ({state}), answers in "
          f"{paths.DEMO_ANSWERS} ({time.time() - start:.1f} s)")
    if summary["groups"]:
        print(f"demo-data: {summary['groups']} groups of related training scenes -> {paths.RAW / 'groups.csv'}")
    return 0
