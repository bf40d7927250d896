"""Stage 03: out-of-fold competition SSIM of an experiment, against bicubic.

    models/<exp>/seed<s>/fold<f>/best.pt + data/folds.csv + data/interim (train split)
      -> models/<exp>/oof/{oof.csv, summary.json, oof.png, pred_seed<s>/, pred_seeds/}

Each fold's best checkpoint predicts the scenes it never trained on (its held-out fold)
with the inference settings of the test set (`infer.tta`, `infer.tile`: the same
`inference.predict_scene`), and each prediction is scored with `competition_ssim`
against its high-res truth. Bicubic (the registry's `bicubic` net) is scored on the same
scenes, and so is the recipe's starting point when it has one (`model.pretrained`, untouched,
with the same inference settings): the gain over it out of fold is the CV's answer to
"what did fine-tuning buy", the figure to hold against the test's gain over the
pretrained net. With several seeds, each fold's checkpoints of all seeds are also ensembled
(averaged in float before one rounding, as stage 04 does) and scored: the CV of what
stage 04 submits.

- `oof.csv`: id, fold, seed, ssim, bicubic_ssim, start_ssim (one row per scene and seed;
  start_ssim empty without a pretrained starting point);
  `oof_seeds.csv` the same for the seed ensemble (seed = -1) when there are several seeds;
- `summary.json`: CV mean and std (over scenes) overall, per fold and per seed, bicubic's,
  the gain over bicubic, the starting point's (`start`: weights, mean, std) and the gain
  over it (`gain_over_start`), and the seed-ensemble CV;
- `oof.png`: per-scene SSIM of the model against bicubic, and crops (LR, bicubic,
  prediction, truth) of the best and the worst scene;
- `pred_seed<s>/<scene>.tif` (and `pred_seeds/` for the seed ensemble): the predictions
  that were scored, so every score can be recomputed from files;
- `pred_float/<scene>.npy`: each scene's prediction as the ensemble uses it, before the
  one clip-and-round: the float mean over the fold's seeds x TTA views, 3xHxW in [0, 1]
  units, 2 bytes a value (io.write_float_prediction: uint16 fixed point over [-0.25, 1.25],
  1/171 grey level). A blend (`python -m pipeline blend`) fits its weights on these;
  60 scenes of 1200x1500 take 648 MB (10.8 MB each).
The folder is written in a temporary folder renamed into place at the end.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.core import io, locks, paths
from pipeline.core.artifacts import checkpoint_record, load_folds
from pipeline.core.config import add_set_argument, load_config
from pipeline.core.device import pick_device
from pipeline.core.metrics import competition_ssim
from pipeline.data.patches import fold_ids, load_scenes
from pipeline.infer.ensemble import image_to_tensor, predict_float, predict_scene, tensor_to_image
from pipeline.infer.load import infer_settings, load_nets
from pipeline.infer.oof import check_splits, checkpoints_by_fold, gallery_item, plot_oof, start_net, stats, summarize
from pipeline.infer.tta import TTA_CHOICES
from pipeline.nets import build_net

SEED_ENSEMBLE = -1           # the `seed` of seed-ensemble rows in oof_seeds.csv
def pred_folder(seed: int) -> str:
    return "pred_seeds" if seed == SEED_ENSEMBLE else f"pred_seed{seed}"


def run_oof(cfg: dict, seeds: list[int] | None = None, tta: int | None = None) -> dict:
    """Score every fold's checkpoints on their held-out scenes; writes models/<exp>/oof/."""
    start = time.time()
    exp = cfg["exp"]
    scale = int(cfg["data"]["scale"])
    settings = infer_settings(cfg, tta)
    device = pick_device(cfg["device"])
    folds = sorted(int(f) for f in load_folds()["fold"].unique())
    ckpts = checkpoints_by_fold(exp, seeds, folds)
    seeds_used = sorted({s for by_seed in ckpts.values() for s in by_seed})
    multi = len(seeds_used) > 1
    bicubic = build_net("bicubic", scale=scale).to(device)
    starting_net = start_net(cfg, device)
    held_out = {f: fold_ids(f)[1] for f in ckpts}
    # each checkpoint read once up front: its record goes to summary.json and is checked here
    records = {f: {s: checkpoint_record(p) for s, p in sorted(by_seed.items())} for f, by_seed in ckpts.items()}
    check_splits(records, held_out)
    total = sum(len(ids) * len(ckpts[f]) for f, ids in held_out.items())

    rows, seed_rows = [], []
    out_dir = paths.oof_dir(exp)
    with locks.locked(out_dir), io.atomic_dir(out_dir) as tmp:
        bar = tqdm(total=total, desc=f"oof {exp} (tta {settings['tta']})", unit="pred", disable=None)
        for fold in sorted(ckpts):
            scenes = load_scenes(held_out[fold], scale)
            bicubic_ssim, start_ssim = {}, {}
            for scene in scenes:
                # bicubic needs no TTA: its views agree up to float rounding
                up = predict_scene([bicubic], scene.lr, **{**settings, "tta": 1}, device=device)
                bicubic_ssim[scene.id] = competition_ssim(up, scene.hr)
                if starting_net is not None:
                    start_ssim[scene.id] = competition_ssim(predict_scene([starting_net], scene.lr, **settings, device=device),
                                                            scene.hr)
            fold_seeds = sorted(ckpts[fold])
            nets = dict(zip(fold_seeds, load_nets([ckpts[fold][s] for s in fold_seeds], scale)))
            for scene in scenes:
                x = image_to_tensor(scene.lr)
                # the seed ensemble is the float mean of the seeds' float outputs, exactly
                # what predict_scene(all nets) computes, without running the nets twice
                floats = {s: predict_float([nets[s]], x, **settings, device=device) for s in fold_seeds}
                if len(fold_seeds) > 1:
                    floats[SEED_ENSEMBLE] = sum(floats[s] for s in fold_seeds) / len(fold_seeds)
                for seed, sr in floats.items():
                    pred = tensor_to_image(sr)
                    io.write_tif(tmp / pred_folder(seed) / f"{scene.id}.tif", pred)
                    row = {"id": scene.id, "fold": fold, "seed": seed,
                           "ssim": competition_ssim(pred, scene.hr), "bicubic_ssim": bicubic_ssim[scene.id],
                           "start_ssim": start_ssim.get(scene.id, np.nan)}
                    (seed_rows if seed == SEED_ENSEMBLE else rows).append(row)
                # what stage 04 would average for this scene: every seed's net, in float
                ensembled = floats[SEED_ENSEMBLE] if len(fold_seeds) > 1 else floats[fold_seeds[0]]
                io.write_float_prediction(tmp / paths.oof_predictions_dir(exp).name / f"{scene.id}.npy", ensembled[0])
                bar.update(len(fold_seeds))
        bar.close()

        table = pd.DataFrame(rows, columns=["id", "fold", "seed", "ssim", "bicubic_ssim", "start_ssim"])
        table.to_csv(tmp / "oof.csv", index=False, float_format="%.6f")
        summary = {"exp": exp, "seeds": seeds_used, "folds": sorted(ckpts), "n_scenes": int(table["id"].nunique()),
                   **summarize(table), "start_weights": cfg["model"]["pretrained"] if starting_net is not None else None,
                   "per_seed": {str(s): stats(r["ssim"]) for s, r in table.groupby("seed")},
                   "seed_ensemble": None,
                   "float_predictions": {"folder": paths.oof_predictions_dir(exp).name, "dtype": "uint16",
                                         "layout": "3xHxW, (value + 0.25) / 1.5 * 65535, not clipped to [0, 1] or rounded",
                                         "seeds": seeds_used}}
        if multi:
            seed_table = pd.DataFrame(seed_rows, columns=table.columns)
            seed_table.to_csv(tmp / "oof_seeds.csv", index=False, float_format="%.6f")
            if not seed_table.empty:
                summary["seed_ensemble"] = {"seeds": seeds_used, **summarize(seed_table)}
        summary.update({"inference": {**settings, "device": str(device)}, "checkpoints": [r for f in sorted(records) for r in records[f].values()],
                        "seconds": round(time.time() - start, 2)})
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))

        # gallery: the best and the worst scene by out-of-fold SSIM (first seed's prediction)
        first = table[table["seed"] == seeds_used[0]].sort_values("ssim")
        gallery = []
        for label, index in (("best", first.index[-1]), ("worst", first.index[0])):
            scene = load_scenes([table.at[index, "id"]], scale)[0]
            pred = io.read_image(tmp / pred_folder(seeds_used[0]) / f"{scene.id}.tif")
            up = predict_scene([bicubic], scene.lr, **{**settings, "tta": 1}, device=device)
            gallery.append(gallery_item(label, scene, pred, up, scale, {
                "prediction": float(table.at[index, "ssim"]), "bicubic": float(table.at[index, "bicubic_ssim"])}))
        plot_oof(table, gallery, tmp / "oof.png",
                 f"{exp}: out-of-fold SSIM {summary['cv']['mean']:.4f} vs bicubic "
                 f"{summary['bicubic']['mean']:.4f} ({len(seeds_used)} seed(s), TTA {settings['tta']})")
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("--exp", default="demo", help="experiment name or YAML path")
    parser.add_argument("--seeds", type=int, nargs="*", default=None,
                        help="seeds to score (default: every seed with checkpoints)")
    parser.add_argument("--tta", type=int, choices=TTA_CHOICES, default=None,
                        help="dihedral views per net (default: infer.tta)")
    add_set_argument(parser)


def main(args) -> int:
    cfg = load_config(args.exp, args.overrides)
    s = run_oof(cfg, seeds=args.seeds or None, tta=args.tta)
    line = (f"oof {cfg['exp']}: CV {s['cv']['mean']:.4f} ± {s['cv']['std']:.4f} over {s['n_scenes']} scenes "
            f"x {len(s['seeds'])} seed(s), bicubic {s['bicubic']['mean']:.4f} "
            f"(gain {s['gain_over_bicubic']:+.4f})")
    if "start" in s:
        line += f", start {s['start_weights']} {s['start']['mean']:.4f} (gain {s['gain_over_start']:+.4f})"
    if s["seed_ensemble"]:
        line += f", seed ensemble {s['seed_ensemble']['cv']['mean']:.4f}"
    print(f"{line}, {s['seconds']:.1f} s -> {paths.oof_dir(cfg['exp'])}")
    return 0
