"""Stage 01: split the training scenes into K folds that are comparable.

    data/interim/manifest.csv [+ data/raw/groups.csv] -> data/folds.csv (id, scene, fold, edge_density[, group])

Scenes differ most in how much fine structure they hold (dense city blocks vs fields or
water), which is also what drives their SSIM; folds are balanced on that. The statistic is
the edge density of the low-res input: the mean Sobel gradient magnitude of its
luminance (in [0, 1]). Scenes are sorted by it and cut into consecutive groups of K; each
group deals one scene to each of K folds in a seeded random order (the n mod K scenes left
over, taken from the middle of the ranking, go to a random subset of folds). Every fold
thus gets the same spread of easy and hard scenes and fold sizes differ by at most one.

With groups (`data.groups`, default `groups.csv`: an `id,group` CSV beside the zips in
data/raw/), scenes of one group (one place) always share a fold: groups are dealt instead
of scenes, balanced on their mean edge density and on size (pipeline/data/folds.py), and
folds.csv gets a `group` column. Without the file the split is per scene, as said once.

K is `data.n_folds` (`--n-folds` overrides), the seed `data.fold_seed`. The same manifest,
K and seed give the same folds; an unchanged `folds.csv` is not rewritten, only its date
refreshed (training and out-of-fold targets run on demand anyway, not on its date).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import io, locks, paths
from pipeline.core.artifacts import load_manifest
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.folds import STATISTIC, assign_folds, assign_group_folds, edge_density, read_groups


def groups_path(data_cfg: dict) -> Path | None:
    """The groups CSV of `data.groups` (relative to data/raw/), or None when switched off."""
    name = data_cfg.get("groups")
    return None if not name else paths.RAW / name


def make_folds(n_folds: int, seed: int, groups_csv: Path | None = None) -> pd.DataFrame:
    """folds.csv's table; scenes grouped by `groups_csv` (id,group) when it is given."""
    train = load_manifest("train")
    if train.empty:
        raise PipelineError(f"{paths.MANIFEST}: no training scenes")
    stats = np.array([edge_density(io.read_image(p)) for p in train["low_path"]])
    table = pd.DataFrame({"id": train["id"], "scene": train["scene"]})
    if groups_csv is None:
        table["fold"] = assign_folds(stats, n_folds, seed)
        table[STATISTIC] = stats.round(6)
        return table
    groups = read_groups(groups_csv, train["id"].tolist())
    table["fold"] = assign_group_folds(stats, groups, n_folds, seed, source=groups_csv)
    table[STATISTIC] = stats.round(6)
    table["group"] = groups
    return table


def add_arguments(parser) -> None:
    parser.add_argument("--exp", default="demo", help="experiment name or YAML path (data: n_folds, fold_seed)")
    parser.add_argument("--n-folds", type=int, default=None, help="number of folds K (default: data.n_folds)")
    parser.add_argument("--seed", type=int, default=None, help="fold seed (default: data.fold_seed)")


def main(args) -> int:
    start = time.time()
    data_cfg = load_config(args.exp)["data"]
    n_folds = int(args.n_folds if args.n_folds is not None else data_cfg["n_folds"])
    seed = int(args.seed if args.seed is not None else data_cfg["fold_seed"])
    groups_csv = groups_path(data_cfg)
    if groups_csv is not None and not groups_csv.is_file():
        print(f"folds: no {groups_csv}: scenes are split one by one (neighbouring scenes of one place "
              f"may land in different folds; an id,group CSV there keeps each group in one fold)")
        groups_csv = None
    folds = make_folds(n_folds, seed, groups_csv)
    text = folds.to_csv(index=False)
    with locks.locked(paths.FOLDS):
        changed = not paths.FOLDS.exists() or paths.FOLDS.read_text() != text
        if changed:
            with io.atomic_path(paths.FOLDS) as tmp:
                tmp.write_text(text)
        else:
            os.utime(paths.FOLDS)  # newer than the config that made make call us; no stage redoes on it
    per_fold = folds.groupby("fold")[STATISTIC].agg(["size", "mean"])
    spread = ", ".join(f"{f}: {int(r['size'])} scenes / {r['mean']:.4f}" for f, r in per_fold.iterrows())
    grouped = f", {folds['group'].nunique()} groups kept whole" if groups_csv is not None else ""
    print(f"folds: {len(folds)} scenes in {n_folds} folds (seed {seed}{grouped}; fold: size / mean {STATISTIC}: "
          f"{spread}) -> {paths.FOLDS} ({'written' if changed else 'unchanged'}, {time.time() - start:.1f} s)")
    return 0
