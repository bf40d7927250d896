"""How training scenes are dealt to folds: balanced on their edge density, one by one or by group.

Scenes differ most in how much fine structure they hold (dense city blocks vs fields or
water), which is also what drives their SSIM; folds are balanced on that (`edge_density`,
`assign_folds`: sorted by it, each run of K scenes dealt one to each fold).

Groups of related training scenes (the same place) are kept in one fold (`assign_group_folds`).

A competition's scenes are often cut from a few large images: neighbouring scenes share
roofs, roads and light, so a net validated on a neighbour of a training scene reads
optimistic. `data/raw/groups.csv` (`id,group`, beside the zips; `data.groups` names it)
says which scenes belong together; stage 01 then never splits a group across folds.

`demo-data --source` writes it for what it builds: the group of a source image is its
folder plus a block of `TILE_BLOCK` consecutive tile numbers (`denseresidential/15-29`),
and all tiles cut from one image share its group. Why numbers: in UC Merced, tiles with
nearby numbers come from the same place (docs/data.md, "Groups").
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from skimage.color import rgb2gray
from skimage.filters import sobel

from pipeline.core import paths
from pipeline.core.errors import PipelineError

# UC Merced: of the within-class tile pairs that look alike (closest 2 % by colour
# histogram), half are 1-2 numbers apart, 90 % at most 10; a block of 15 keeps 80 % of
# them together (10: 65 %, 5: 43 %) and lines up with the benchmark's 30-44 test block.
TILE_BLOCK = 15


def tile_number(source_name: str) -> int | None:
    """The trailing number of a source image's file name (`airplane07.tif` -> 7), if any."""
    match = re.search(r"(\d+)$", PurePosixPath(source_name.rpartition("#")[0] or source_name).stem)
    return int(match.group(1)) if match else None


def source_group(source_name: str, block: int = TILE_BLOCK) -> str:
    """Group of a demo scene named `<relative source path>#<tile>`: the source's folder and
    block of tile numbers (`harbor/00-14`); a source without a number is its own group."""
    path = PurePosixPath(source_name.rpartition("#")[0] or source_name)
    number = tile_number(source_name)
    if number is None:
        return str(path)
    low = number // block * block
    return f"{path.parent}/{low:02d}-{low + block - 1:02d}"


def read_groups(path: Path, ids: list) -> np.ndarray:
    """The group of each training scene `ids` (in that order) from an `id,group` CSV."""
    try:
        table = pd.read_csv(path, dtype={"group": str})
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: not a readable CSV ({type(exc).__name__})") from None
    if list(table.columns[:2]) != ["id", "group"]:
        raise PipelineError(f"{path}: columns id,group expected, found {','.join(map(str, table.columns))}")
    if table["group"].isna().any():
        raise PipelineError(f"{path}: empty group for id(s) {table.loc[table['group'].isna(), 'id'].tolist()[:5]}")
    try:
        table["id"] = table["id"].astype(int)
    except (TypeError, ValueError):
        raise PipelineError(f"{path}: ids must be the scenes' integer ids") from None
    dupes = table.loc[table["id"].duplicated(), "id"].tolist()
    if dupes:
        raise PipelineError(f"{path}: id(s) {dupes[:5]} listed more than once")
    by_id = table.set_index("id")["group"]
    missing = [int(i) for i in ids if int(i) not in by_id.index]
    if missing:
        raise PipelineError(f"{path}: no group for {len(missing)} training scene(s) (ids {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}); list every scene or remove the file")
    return by_id.loc[[int(i) for i in ids]].to_numpy()


def assign_group_folds(statistic: np.ndarray, groups: np.ndarray, n_folds: int, seed: int,
                       source: Path | str = "groups") -> np.ndarray:
    """Fold of each scene such that a group's scenes share one fold, balanced on `statistic`
    and on size: groups are ranked by their mean statistic and dealt K at a time, one to
    each fold (stratified, as without groups); within a deal, the largest group goes to the
    fold with the fewest scenes so far (ties in a seeded random order)."""
    names, inverse = np.unique(groups, return_inverse=True)
    if len(names) < n_folds:
        raise PipelineError(f"{source}: {len(names)} group(s) cannot fill {n_folds} folds; "
                            f"use --n-folds {len(names)} or fewer, or finer groups")
    rng = np.random.default_rng(seed)
    sizes = np.bincount(inverse)
    means = np.bincount(inverse, weights=statistic) / sizes
    order = np.argsort(means, kind="stable")
    fold_of_group = np.empty(len(names), dtype=int)
    fold_sizes = np.zeros(n_folds, dtype=int)
    for start in range(0, len(order), n_folds):
        deal = order[start:start + n_folds]
        deal = deal[rng.permutation(len(deal))]
        deal = deal[np.argsort(-sizes[deal], kind="stable")]       # largest first
        free = list(rng.permutation(n_folds))                        # folds still open in this deal
        for group in deal:
            fold = min(free, key=lambda f: fold_sizes[f])            # first minimum: a random tie-break
            free.remove(fold)
            fold_of_group[group] = fold
            fold_sizes[fold] += sizes[group]
    return fold_of_group[inverse]


STATISTIC = "edge_density"



def edge_density(image: np.ndarray) -> float:
    """Mean Sobel gradient magnitude of the luminance of a uint8 RGB image, in [0, 1]."""
    return float(sobel(rgb2gray(image)).mean())



def assign_folds(statistic: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each scene: sorted by `statistic`, each group of K consecutive scenes
    goes one to each fold in a random order; sizes differ by at most one."""
    n = len(statistic)
    if n_folds < 2:
        raise PipelineError(f"n_folds {n_folds}: at least 2 folds are needed")
    if n_folds > n:
        raise PipelineError(f"{paths.MANIFEST}: {n_folds} folds requested but only {n} training scene(s); "
                            f"use --n-folds {n} or fewer")
    rng = np.random.default_rng(seed)
    order = np.argsort(statistic, kind="stable")
    # the partial group (n mod K scenes) is taken from the middle of the ranking, so the
    # folds that get one scene more get a typical one, not the extreme
    extra = n % n_folds
    cut = (n // n_folds // 2) * n_folds
    groups = [order[s:s + n_folds] for s in range(0, cut, n_folds)]
    groups += [order[cut:cut + extra]] if extra else []
    groups += [order[s:s + n_folds] for s in range(cut + extra, n, n_folds)]
    folds = np.empty(n, dtype=int)
    for group in groups:
        folds[group] = rng.permutation(n_folds)[:len(group)]
    return folds
