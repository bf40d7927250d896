"""Out-of-fold evaluation: each fold's checkpoints scored on the scenes they never trained on.

Stage 03 runs it; here are its pieces: which checkpoint holds out which fold
(`checkpoints_by_fold`), the guard against folds re-split after training (`check_splits`),
the recipe's starting point (`start_net`, the pretrained net untouched), the CV figures of a
per-scene table (`summarize`) and the plot of oof.png (`plot_oof`, with `gallery_item` crops).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core import io, paths, weights
from pipeline.core.checkpoints import find_checkpoints
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import most_detailed_window
from pipeline.data.patches import split_digest
from pipeline.nets import build_net

GALLERY_CROP = 96            # HR side of the gallery crops


def checkpoints_by_fold(exp: str, seeds: list[int] | None, folds: list[int]) -> dict[int, dict[int, Path]]:
    """fold -> seed -> best.pt; warns about folds with no checkpoint, errors when none at all."""
    found: dict[int, dict[int, Path]] = defaultdict(dict)
    for path in find_checkpoints(paths.experiment_dir(exp), seeds=seeds):
        seed, fold = int(path.parent.parent.name[4:]), int(path.parent.name[4:])
        found[fold][seed] = path
    if not found:
        which = f" for seed(s) {' '.join(map(str, seeds))}" if seeds else ""
        raise PipelineError(f"{paths.experiment_dir(exp)}: no checkpoint seed*/fold*/best.pt{which}; "
                            f"run `make train-all EXP={exp}` first")
    unknown = sorted(set(found) - set(folds))
    if unknown:
        raise PipelineError(f"{paths.experiment_dir(exp)}: checkpoints for fold(s) {unknown} that "
                            f"{paths.FOLDS} does not have (folds changed? retrain with `make train-all`)")
    seeds_seen = sorted({s for by_seed in found.values() for s in by_seed})
    gaps = [f"seed{s}/fold{f}" for f in folds for s in seeds_seen if s not in found.get(f, {})]
    if gaps:
        warnings.warn(f"{paths.experiment_dir(exp)}: no best.pt for {', '.join(gaps)}; "
                      "the CV covers only the folds that have one")
    return dict(found)



def check_splits(records: dict[int, dict[int, dict]], held_out: dict[int, list]) -> None:
    """Refuse a checkpoint (by its `checkpoint_record`) whose fold held out other scenes than
    folds.csv's fold does now (folds re-split after training): its out-of-fold score would
    include scenes it trained on. Checkpoints from before the split was recorded pass."""
    for fold, by_seed in records.items():
        split = split_digest(held_out[fold])
        for record in by_seed.values():
            if record["val_split"] not in (None, split):
                raise PipelineError(f"{record['path']}: trained with other validation scenes than fold {fold} "
                                    f"of {paths.FOLDS} holds now (folds re-split?); its out-of-fold score "
                                    f"would leak: retrain (`make train-all`)")



def start_net(cfg: dict, device) -> torch.nn.Module | None:
    """The net the recipe starts from: `model.pretrained` loaded into the configured net,
    untouched (eval mode), or None when it trains from scratch or re-initialises modules
    (then there is no meaningful starting point to score)."""
    m = cfg["model"]
    if not m.get("pretrained") or m.get("reinit"):
        return None
    net = build_net(m["name"], **m["args"])
    try:
        weights.load_pretrained(net, m["pretrained"])
    except PipelineError as exc:
        warnings.warn(f"{exc}; the out-of-fold table has no starting-point figure")
        return None
    return net.eval().to(device)



def stats(values) -> dict:
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}



def summarize(table: pd.DataFrame) -> dict:
    """CV figures of one table with columns id, fold, seed, ssim, bicubic_ssim."""
    scenes = table.groupby("id")[["ssim", "bicubic_ssim"]].mean()  # one value per scene
    out = {"cv": stats(table["ssim"]), "bicubic": stats(scenes["bicubic_ssim"]),
           "gain_over_bicubic": float(table["ssim"].mean() - scenes["bicubic_ssim"].mean()),
           "per_fold": {}}
    for fold, rows in table.groupby("fold"):
        out["per_fold"][str(fold)] = {**stats(rows["ssim"]),
                                      "bicubic_mean": float(rows["bicubic_ssim"].mean()),
                                      "gain_over_bicubic": float((rows["ssim"] - rows["bicubic_ssim"]).mean())}
    fold_means = [v["mean"] for v in out["per_fold"].values()]
    out["fold_std"] = float(np.std(fold_means))  # spread between folds, not scenes
    start = table.groupby("id")["start_ssim"].mean() if "start_ssim" in table else pd.Series(dtype=float)
    if start.notna().all() and len(start):
        out["start"] = stats(start)
        out["gain_over_start"] = float(table["ssim"].mean() - start.mean())
    return out



def plot_oof(table: pd.DataFrame, gallery: list[dict], out_path: Path, title: str) -> None:
    """Per-scene model vs bicubic SSIM, the per-scene gain, and the crop gallery."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_scene = table.groupby(["id", "fold"], as_index=False)[["ssim", "bicubic_ssim"]].mean()
    per_scene["gain"] = per_scene["ssim"] - per_scene["bicubic_ssim"]
    fig = plt.figure(figsize=(13, 4.2 + 3.3 * len(gallery)), constrained_layout=True)
    grid = fig.add_gridspec(1 + len(gallery), 4, height_ratios=[1.3] + [1] * len(gallery))
    ax = fig.add_subplot(grid[0, :2])
    for fold, rows in per_scene.groupby("fold"):
        ax.scatter(rows["bicubic_ssim"], rows["ssim"], s=22, label=f"fold {fold}")
    lo = float(min(per_scene["bicubic_ssim"].min(), per_scene["ssim"].min()))
    hi = float(max(per_scene["bicubic_ssim"].max(), per_scene["ssim"].max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="model = bicubic")
    ax.set_xlabel("bicubic SSIM")
    ax.set_ylabel("model SSIM (out of fold)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("per scene, mean over seeds", fontsize=9)
    ax = fig.add_subplot(grid[0, 2:])
    ordered = per_scene.sort_values("gain")
    colors = ["tab:red" if g < 0 else "tab:green" for g in ordered["gain"]]
    ax.bar(range(len(ordered)), ordered["gain"], color=colors)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(ordered)), [str(i) for i in ordered["id"]], fontsize=6, rotation=90)
    ax.set_xlabel("scene id (sorted by gain)")
    ax.set_ylabel("SSIM gain over bicubic")
    for row, item in enumerate(gallery, start=1):
        for col, (name, image) in enumerate(item["images"].items()):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{item['label']} {name}" + (f" {item['scores'][name]:.4f}" if name in item["scores"] else ""),
                         fontsize=9)
    fig.suptitle(title)
    with io.atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)



def gallery_item(label: str, scene, prediction: np.ndarray, bicubic: np.ndarray, scale: int,
                  scores: dict) -> dict:
    rows, cols = most_detailed_window(scene.hr, GALLERY_CROP)
    lr_rows = slice(rows.start // scale, rows.stop // scale)
    lr_cols = slice(cols.start // scale, cols.stop // scale)
    return {"label": f"{label} (scene {scene.id})", "scores": scores, "images": {
        "LR": scene.lr[lr_rows, lr_cols], "bicubic": bicubic[rows, cols],
        "prediction": prediction[rows, cols], "truth": scene.hr[rows, cols]}}
