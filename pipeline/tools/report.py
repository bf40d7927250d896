"""`python -m pipeline report`: a static HTML report of the work folder -> reports/index.html.

Everything on disk that a competitor decides from, on one page that works offline from the
file system (no server, no external URL; a Content-Security-Policy in the page forbids any):
- every experiment (`models/<exp>/`) and blend (`models/blends/<name>/blend.json`) in one
  sortable table: net, recipe differences from its base (the `base:` experiment of its YAML,
  else the defaults of config.py), CV mean, std over scenes and over folds, per fold, per
  seed, the seed ensemble, TTA gain, gain over bicubic, best validation SSIM, training time;
- validation SSIM against step of every run (each fold and seed), per experiment, and two
  experiments on one plot when two rows are ticked;
- per experiment, per-scene out-of-fold SSIM against bicubic, and the best and worst scenes
  as LR (nearest-upscaled), bicubic, prediction and truth crops with a synchronised zoom;
- the submissions ledger (submissions/ledger.csv, pipeline/ledger.py) and CV against LB.

The HTML comes from Jinja2 templates (pipeline/tools/templates/), static plots are matplotlib SVGs
inlined in the page, the curves are drawn by the page's small script from the runs' log.csv
(so any two can be overlaid), and the crops are PNG files in reports/img/ beside the page.

Rerun cost: crops are keyed by what made them (the checkpoint's sha256 as stage 03 recorded
it, or of the checkpoint itself when stage 03 kept no prediction; the truth's sha256 from the
manifest) and SVG plots by their data, both kept in reports/; an unchanged work folder is
rendered again from them without running a net.

Figures that are not in the artifacts, and how they are derived:
- TTA gain: stage 03's out-of-fold SSIM (with `infer.tta` views) minus the validation SSIM
  stage 02 recorded in the same best.pt on the same held-out scenes (no TTA; tiled by
  `train.val_tile` rather than `infer.tile`, equal when both are 0); mean over scenes;
- training time: last.pt's mtime minus config.yaml's (written when a run starts), summed
  over the runs: wall time, so a run resumed after a pause counts the pause too.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml

from pipeline.core import io, ledger, locks, paths
from pipeline.core.checkpoints import run_seconds
from pipeline.core.config import DEFAULTS, PRETRAINED_RECORD, load_config
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import most_detailed_window

TEMPLATES = Path(__file__).resolve().parent / "templates"
CROP = 320                      # HR side of the scene crops (the zoom works inside it)
NOT_EXPERIMENTS = {"pretrained", "blends"}
# only what the page itself contains: inline script and style, its own folder's images
CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


# --- experiments ------------------------------------------------------------------------

def experiment_names() -> list[str]:
    """Folders of models/ that hold a training run or stage 03's output."""
    if not paths.MODELS.is_dir():
        return []
    return sorted(p.name for p in paths.MODELS.iterdir()
                  if p.is_dir() and p.name not in NOT_EXPERIMENTS and not p.name.startswith(".")
                  and (any(p.glob("seed*/fold*/log.csv")) or (p / "oof" / "summary.json").is_file()))


def _int_suffix(name: str, prefix: str) -> int | None:
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def load_runs(exp: str) -> list[dict]:
    """Every seed<s>/fold<f>/ of an experiment that has a log.csv: its curve and figures."""
    runs = []
    for log_path in sorted(paths.experiment_dir(exp).glob("seed*/fold*/log.csv")):
        run = log_path.parent
        seed, fold = _int_suffix(run.parent.name, "seed"), _int_suffix(run.name, "fold")
        if seed is None or fold is None:
            continue
        try:
            log = pd.read_csv(log_path)
        except (ValueError, pd.errors.ParserError) as exc:
            raise PipelineError(f"{log_path}: not a readable training log ({str(exc).splitlines()[0]})") from None
        if not {"step", "val_ssim"} <= set(log.columns):
            raise PipelineError(f"{log_path}: columns step and val_ssim expected")
        val = log[log["val_ssim"].notna()]
        bicubic = log["bicubic_ssim"].dropna() if "bicubic_ssim" in log else pd.Series(dtype=float)
        seconds = run_seconds(run)
        best = val.loc[val["val_ssim"].idxmax()] if len(val) else None
        runs.append({"seed": seed, "fold": fold, "dir": run,
                     "points": [[int(s), round(float(v), 6)] for s, v in zip(val["step"], val["val_ssim"])],
                     "steps": int(log["step"].max()) if len(log) else 0,
                     "best_val": None if best is None else float(best["val_ssim"]),
                     "best_step": None if best is None else int(best["step"]),
                     "bicubic": float(bicubic.iloc[0]) if len(bicubic) else None, "seconds": seconds})
    return runs


def _flatten(d: dict, where: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        dotted = f"{where}.{key}" if where else str(key)
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _short_value(value: Any) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short_value(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)  # true / false / null, as in the YAML
    return str(value)


def recipe_diff(cfg: dict, base: dict) -> list[str]:
    """`key: value` for every dotted key of cfg that differs from base (or base lacks)."""
    a, b = _flatten({k: v for k, v in cfg.items() if k != "exp"}), _flatten({k: v for k, v in base.items() if k != "exp"})
    return [f"{key}: {_short_value(a[key])}" for key in sorted(a) if key not in b or a[key] != b[key]]


def experiment_recipe(exp: str, runs: list[dict]) -> tuple[dict | None, str, list[str]]:
    """(config the runs trained with, name of its base, differences from that base)."""
    cfg = None
    for run in runs:  # the resolved config a run wrote: what was trained, even if the YAML changed since
        if (run["dir"] / "config.yaml").is_file():
            cfg = yaml.safe_load((run["dir"] / "config.yaml").read_text())
            cfg.pop(PRETRAINED_RECORD, None)   # what the run loaded, not a recipe choice
            break
    source = paths.CONFIGS / f"{exp}.yaml"
    if cfg is None and source.is_file():
        cfg = load_config(exp)
    if cfg is None:
        return None, "defaults", []
    base_name, base = "defaults", DEFAULTS
    raw = yaml.safe_load(source.read_text()) if source.is_file() else None
    if isinstance(raw, dict) and raw.get("base"):
        base_name = str(raw["base"]).removesuffix(".yaml")
        try:
            base = load_config(base_name)
        except PipelineError:
            base_name, base = "defaults", DEFAULTS
    return cfg, base_name, recipe_diff(cfg, base)


def read_oof(exp: str) -> tuple[dict | None, pd.DataFrame | None]:
    folder = paths.oof_dir(exp)
    if not (folder / "summary.json").is_file():
        return None, None
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except ValueError:
        raise PipelineError(f"{folder / 'summary.json'}: not valid JSON; rerun `make oof EXP={exp}`") from None
    table = pd.read_csv(folder / "oof.csv") if (folder / "oof.csv").is_file() else None
    return summary, table


def tta_gain(summary: dict, table: pd.DataFrame | None) -> float | None:
    """Out-of-fold SSIM (with TTA) minus best.pt's own validation SSIM (no TTA), same scenes."""
    if table is None or summary.get("inference", {}).get("tta", 1) <= 1:
        return None
    val = {(c["seed"], c["fold"]): c["val_ssim"] for c in summary.get("checkpoints", [])
           if c.get("val_ssim") is not None}
    diffs = [row.ssim - val[(row.seed, row.fold)] for row in table.itertuples() if (row.seed, row.fold) in val]
    return float(np.mean(diffs)) if diffs else None


def stale_reason(exp: str, summary: dict) -> str | None:
    """Why stage 03's figures no longer describe the checkpoints on disk (None: they do)."""
    recorded = {c["path"]: c for c in summary.get("checkpoints", [])}
    for rel, record in recorded.items():
        path = paths.WORKDIR / rel
        if not path.is_file():
            return f"{rel} is gone"
        if abs(path.stat().st_mtime - record["mtime"]) > 1e-3:
            return f"{rel} changed since stage 03"
    seeds = set(summary.get("seeds", []))
    for path in sorted(paths.experiment_dir(exp).glob("seed*/fold*/best.pt")):
        rel = str(path.relative_to(paths.WORKDIR))
        if rel not in recorded and _int_suffix(path.parent.parent.name, "seed") in seeds:
            return f"{rel} is newer than stage 03"
    return None


def experiment_row(exp: str) -> dict:
    """One row of the experiments table, plus what the experiment's own card needs."""
    runs = load_runs(exp)
    cfg, base, diffs = experiment_recipe(exp, runs)
    summary, table = read_oof(exp)
    seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
    best_vals = [r["best_val"] for r in runs if r["best_val"] is not None]
    row = {"name": exp, "kind": "experiment", "net": cfg["model"]["name"] if cfg else "?",
           "pretrained": cfg["model"].get("pretrained") if cfg else None, "base": base, "diffs": diffs,
           "scale": int(cfg["data"]["scale"]) if cfg else None,
           "runs": len(runs), "seeds": sorted({r["seed"] for r in runs}), "folds": sorted({r["fold"] for r in runs}),
           "steps": max((r["steps"] for r in runs), default=None),
           "train_seconds": sum(seconds) if seconds else None,
           "best_val": float(np.mean(best_vals)) if best_vals else None,
           "cv": None, "cv_std": None, "fold_std": None, "per_fold": {}, "per_seed": {}, "seed_ensemble": None,
           "tta": None, "tta_gain": None, "bicubic": None, "gain_over_bicubic": None, "stale": None,
           "gain_over_start": None, "start_weights": None,
           "curves": [{"label": f"seed {r['seed']} fold {r['fold']}", "seed": r["seed"], "fold": r["fold"],
                       "points": r["points"], "bicubic": r["bicubic"]} for r in runs]}
    if summary:
        row.update(cv=summary["cv"]["mean"], cv_std=summary["cv"]["std"], fold_std=summary.get("fold_std"),
                   per_fold={int(f): v["mean"] for f, v in summary.get("per_fold", {}).items()},
                   per_seed={int(s): v["mean"] for s, v in summary.get("per_seed", {}).items()},
                   seed_ensemble=(summary.get("seed_ensemble") or {}).get("cv", {}).get("mean"),
                   tta=summary.get("inference", {}).get("tta"), tta_gain=tta_gain(summary, table),
                   bicubic=summary["bicubic"]["mean"], gain_over_bicubic=summary["gain_over_bicubic"],
                   gain_over_start=summary.get("gain_over_start"), start_weights=summary.get("start_weights"),
                   stale=stale_reason(exp, summary))
    return row


def _number(value: Any, *keys: str) -> float | None:
    """A float from `value` or, when it is a mapping, from its first key present (e.g. mean)."""
    if isinstance(value, dict):
        return next((_number(value[k]) for k in keys if k in value), None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def blend_rows() -> list[dict]:
    """A table row per models/blends/<name>/blend.json (written by `python -m pipeline blend`):
    its members' weights, the blend's CV (fitted weights scored out of fold, or the equal
    weights it kept) and, when the fitted weights were kept, their score on each fold."""
    rows = []
    for path in sorted((paths.MODELS / "blends").glob("*/blend.json")):
        try:
            blend = json.loads(path.read_text())
        except ValueError:
            warnings.warn(f"{path}: not valid JSON; left out of the report")
            continue
        try:
            weights = {str(m["exp"]): float(m["weight"]) for m in blend["members"]}
            cv = _number(blend["cv"]["blend"])
            fitted = blend.get("kept") == "fitted"
            per_fold = {int(k): _number(v["fitted"]) for k, v in blend.get("per_fold", {}).items()} if fitted else {}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            warnings.warn(f"{path}: not a blend file of `python -m pipeline blend` "
                          f"({type(exc).__name__}: {exc}); left out of the report")
            continue
        rows.append({"name": path.parent.name, "kind": "blend",
                     "net": "blend", "pretrained": None,
                     "base": "members", "diffs": [f"{k}: {w:.3g}" for k, w in weights.items()],
                     "scale": None, "runs": None, "seeds": [], "folds": [], "steps": None, "train_seconds": None, "best_val": None,
                     "cv": cv, "cv_std": None,
                     "fold_std": float(np.std(list(per_fold.values()))) if len(per_fold) > 1 else None,
                     "per_fold": per_fold, "per_seed": {}, "seed_ensemble": None,
                     "tta": blend.get("tta"), "tta_gain": None, "bicubic": None, "gain_over_bicubic": None,
                     "gain_over_start": None, "start_weights": None,
                     "stale": None, "curves": []})
    return rows


# --- cached artifacts of the report (plots, crops) ---------------------------------------

class Cache:
    """Files of the report keyed by what made them; the ones this render did not use are removed."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.used: set[Path] = set()
        self.hits = self.misses = 0

    def path(self, folder: str, name: str) -> Path:
        path = self.out_dir / folder / name
        self.used.add(path)
        return path

    def text(self, key: str, build: Callable[[], str]) -> str:
        path = self.path("cache", hashlib.sha256(key.encode()).hexdigest()[:24] + ".svg")
        if path.is_file():
            self.hits += 1
            return path.read_text()
        self.misses += 1
        text = build()
        with io.atomic_path(path) as tmp:
            tmp.write_text(text)
        return text

    def prune(self) -> None:
        for folder in ("cache", "img"):
            for path in (self.out_dir / folder).glob("*"):
                if path.is_file() and path not in self.used:
                    path.unlink()


def _svg(fig) -> str:
    import io as bytes_io

    import matplotlib.pyplot as plt

    buffer = bytes_io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # inline: no XML prolog or DOCTYPE


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "sr-report", "font.size": 9,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def per_scene(table: pd.DataFrame) -> pd.DataFrame:
    scenes = table.groupby(["id", "fold"], as_index=False)[["ssim", "bicubic_ssim"]].mean()
    scenes["gain"] = scenes["ssim"] - scenes["bicubic_ssim"]
    return scenes


def plot_scenes(scenes: pd.DataFrame) -> str:
    """Per-scene out-of-fold SSIM against bicubic, and each scene's gain, as an SVG."""
    plt = _pyplot()
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(10.5, 3.4), gridspec_kw={"width_ratios": [1, 1.6]})
    for fold, rows in scenes.groupby("fold"):
        ax.scatter(rows["bicubic_ssim"], rows["ssim"], s=16, label=f"fold {fold}")
    lo = float(min(scenes["bicubic_ssim"].min(), scenes["ssim"].min()))
    hi = float(max(scenes["bicubic_ssim"].max(), scenes["ssim"].max()))
    ax.plot([lo, hi], [lo, hi], color="0.4", ls="--", lw=0.8, label="= bicubic")
    ax.set(xlabel="bicubic SSIM", ylabel="out-of-fold SSIM", title="per scene (mean over seeds)")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ordered = scenes.sort_values("gain")
    bars.bar(range(len(ordered)), ordered["gain"],
             color=["#d1495b" if g < 0 else "#2a9d8f" for g in ordered["gain"]], width=0.85)
    bars.axhline(0, color="0.3", lw=0.8)
    if len(ordered) <= 60:
        bars.set_xticks(range(len(ordered)), [str(i) for i in ordered["id"]], fontsize=6, rotation=90)
    else:
        bars.set_xticks([])
    bars.set(xlabel="scene id, sorted by gain", ylabel="SSIM gain over bicubic",
             title=f"gain over bicubic: {(ordered['gain'] > 0).sum()} of {len(ordered)} scenes better")
    fig.tight_layout()
    return _svg(fig)


def plot_cv_lb(table: pd.DataFrame, corr: dict | None) -> str:
    """CV against public LB of every scored zip, with the y = x line."""
    plt = _pyplot()
    both = table.dropna(subset=["cv", "lb"])
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(both["cv"], both["lb"], s=28, color="#3d5a80", zorder=3)
    for r in both.itertuples():
        ax.annotate(r.experiments, (r.cv, r.lb), fontsize=7, xytext=(4, 3), textcoords="offset points")
    values = np.concatenate([both["cv"].to_numpy(float), both["lb"].to_numpy(float)])
    lo, hi = float(values.min()), float(values.max())
    pad = max((hi - lo) * 0.1, 1e-3)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", ls="--", lw=0.8, label="LB = CV")
    ax.set(xlabel="CV (out of fold)", ylabel="public LB", xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad))
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.set_aspect("equal")
    title = (f"Pearson {corr['pearson']:+.2f}, Spearman {corr['spearman']:+.2f} over {corr['n']} zips"
             if corr else f"{len(both)} zip(s) scored: correlation needs 3")
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    fig.tight_layout()
    return _svg(fig)


# --- scene crops ---------------------------------------------------------------------------

def crop_window(truth: np.ndarray, scale: int, side: int = CROP) -> tuple[int, int, int]:
    """(y, x, side) of the most detailed HR window, on the LR grid so LR and HR crops align."""
    h, w = truth.shape[:2]
    side = max(scale, min(side, h, w) // scale * scale)
    rows, cols = most_detailed_window(truth, side)
    y = min(rows.start // scale * scale, (h - side) // scale * scale)
    x = min(cols.start // scale * scale, (w - side) // scale * scale)
    return y, x, side


class SceneImages:
    """PNG crops of training scenes for the report, written once per input (see Cache)."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self._manifest = None
        self._device = None
        self._nets: dict[int, Any] = {}

    def manifest(self) -> pd.DataFrame:
        if self._manifest is None:
            from pipeline.core.artifacts import load_manifest
            self._manifest = load_manifest("train").set_index("id")
        return self._manifest

    def _png(self, name: str, make: Callable[[], np.ndarray]) -> str:
        path = self.cache.path("img", name)
        if path.is_file():
            self.cache.hits += 1
        else:
            self.cache.misses += 1
            io.write_image(path, make())
        return f"img/{name}"

    def _prediction(self, exp: str, summary: dict, seed: int, fold: int, scene_id, lr: np.ndarray) -> np.ndarray:
        """Stage 03's kept prediction when there is one, else the fold's checkpoint predicts it now."""
        kept = paths.oof_dir(exp) / f"pred_seed{seed}" / f"{scene_id}.tif"
        if kept.is_file():
            return io.read_image(kept)
        from pipeline.core.device import pick_device
        from pipeline.infer.ensemble import predict_scene
        from pipeline.nets import net_from_checkpoint

        ckpt = paths.run_dir(exp, seed, fold) / "best.pt"
        settings = {k: v for k, v in summary.get("inference", {}).items()
                    if k in ("tta", "tile", "overlap", "batch", "precision")}
        self._device = self._device or pick_device()
        return predict_scene([net_from_checkpoint(ckpt)], lr, **settings, device=self._device)

    def _bicubic(self, lr: np.ndarray, scale: int) -> np.ndarray:
        from pipeline.infer.ensemble import predict_scene
        from pipeline.nets import build_net

        if scale not in self._nets:
            self._nets[scale] = build_net("bicubic", scale=scale)
        return predict_scene([self._nets[scale]], lr, tta=1, device="cpu")

    def crops(self, exp: str, summary: dict, scene_id, seed: int, fold: int, scale: int) -> dict:
        """{"lr", "bicubic", "prediction", "truth"}: relative image paths, plus the window."""
        manifest = self.manifest()
        if scene_id not in manifest.index:
            raise PipelineError(f"{paths.MANIFEST}: scene {scene_id} of {paths.oof_dir(exp)} is not in the "
                                "manifest (data re-extracted since stage 03?); rerun `make oof`")
        entry = manifest.loc[scene_id]
        truth_key = entry["high_sha256"][:16]
        ckpt = paths.run_dir(exp, seed, fold) / "best.pt"
        recorded = next((c for c in summary.get("checkpoints", []) if c["seed"] == seed and c["fold"] == fold), None)
        kept = (paths.oof_dir(exp) / f"pred_seed{seed}" / f"{scene_id}.tif").is_file()
        # what made the prediction: the recorded checkpoint for stage 03's kept file, else the file now on disk
        model_key = (recorded["sha256"] if kept and recorded else io.sha256_file(ckpt) if ckpt.is_file() else None)
        if model_key is None:
            raise PipelineError(f"{ckpt}: checkpoint gone and stage 03 kept no prediction of scene {scene_id}")
        tta = summary.get("inference", {}).get("tta", 1)
        loaded: dict[str, np.ndarray] = {}

        def images() -> dict[str, np.ndarray]:
            if not loaded:
                loaded["hr"], loaded["lr"] = io.read_image(entry["high_path"]), io.read_image(entry["low_path"])
                loaded["y_x_side"] = crop_window(loaded["hr"], scale)
            return loaded

        def window(image: np.ndarray, factor: int = 1) -> np.ndarray:
            y, x, side = images()["y_x_side"]
            return image[y // factor:(y + side) // factor, x // factor:(x + side) // factor]

        def nearest() -> np.ndarray:
            small = window(images()["lr"], scale)
            return np.repeat(np.repeat(small, scale, axis=0), scale, axis=1)

        stem = f"{scene_id}-{truth_key}-{CROP}"
        out = {"truth": self._png(f"{stem}-truth.png", lambda: window(images()["hr"])),
               "lr": self._png(f"{stem}-lr.png", nearest),
               "bicubic": self._png(f"{stem}-bicubic.png", lambda: window(self._bicubic(images()["lr"], scale))),
               "prediction": self._png(f"{stem}-pred-{model_key[:16]}-tta{tta}.png", lambda: window(
                   self._prediction(exp, summary, seed, fold, scene_id, images()["lr"])))}
        return out


def scene_gallery(exp: str, summary: dict, table: pd.DataFrame, scale: int, images: SceneImages) -> list[dict]:
    """The best and the worst scene by out-of-fold SSIM of the first seed (as stage 03's oof.png)."""
    first = table[table["seed"] == summary["seeds"][0]].sort_values("ssim")
    if first.empty:
        return []
    picks = [("worst", first.iloc[0]), ("best", first.iloc[-1])] if len(first) > 1 else [("only", first.iloc[0])]
    gallery = []
    for label, row in picks:
        scene_id = first.loc[row.name, "id"]   # the column's own dtype (a row Series upcasts ints)
        scene_id = scene_id.item() if hasattr(scene_id, "item") else scene_id
        gallery.append({"label": label, "id": scene_id, "fold": int(row["fold"]), "seed": int(row["seed"]),
                        "ssim": float(row["ssim"]), "bicubic_ssim": float(row["bicubic_ssim"]),
                        "images": images.crops(exp, summary, scene_id, int(row["seed"]), int(row["fold"]), scale)})
    return gallery


# --- submissions ---------------------------------------------------------------------------

def submission_rows(cache: Cache) -> tuple[list[dict], dict | None, pd.DataFrame]:
    """The ledger, plus zips in submissions/ it does not list (sha256 cached by size and mtime)."""
    table = ledger.read_ledger()
    listed = set(table["zip"])
    hashes_path = cache.path("cache", "zip-sha256.json")
    known = json.loads(hashes_path.read_text()) if hashes_path.is_file() else {}
    extra, fresh = [], {}
    for path in sorted(paths.SUBMISSIONS.glob("*.zip")) if paths.SUBMISSIONS.is_dir() else []:
        if path.name in listed:
            continue
        stat = path.stat()
        key = f"{path.name}|{stat.st_size}|{stat.st_mtime}"
        fresh[key] = known.get(key) or io.sha256_file(path)
        extra.append({"zip": path.name, "experiments": ledger.experiment_of_zip(path.name), "cv": float("nan"),
                      "created": datetime.fromtimestamp(stat.st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                      "sha256": fresh[key], "lb": float("nan"), "lb_recorded": "", "note": "not in the ledger"})
    with io.atomic_path(hashes_path) as tmp:
        tmp.write_text(json.dumps(fresh))
    rows = []
    for r in table.to_dict("records"):
        r["note"] = "" if (paths.SUBMISSIONS / r["zip"]).is_file() else "zip no longer in submissions/"
        rows.append(r)
    rows += extra
    for r in rows:
        for k in ("cv", "lb"):
            r[k] = None if r[k] is None or (isinstance(r[k], float) and math.isnan(r[k])) else float(r[k])
        r["diff"] = r["lb"] - r["cv"] if r["lb"] is not None and r["cv"] is not None else None
    return rows, ledger.correlation(table), table


# --- the page --------------------------------------------------------------------------------

def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _script_json(data: Any) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


def render(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=_fmt, duration=_duration, script_json=_script_json)
    return env.get_template("report.html.j2").render(**context)


def collect(images: SceneImages | None = None, cache: Cache | None = None) -> dict:
    """Everything the page shows, as plain data (the table rows are what the tests check)."""
    rows = [experiment_row(exp) for exp in experiment_names()] + blend_rows()
    rows.sort(key=lambda r: (r["cv"] is None, -(r["cv"] or 0.0), r["name"]))  # best CV first
    cards = []
    for row in rows:
        if row["kind"] != "experiment":
            continue
        summary, table = read_oof(row["name"])
        card = {"name": row["name"], "scenes_svg": None, "gallery": [], "note": None}
        if summary and table is not None and len(table):
            scenes = per_scene(table)
            if cache is not None:
                card["scenes_svg"] = cache.text("scenes|" + scenes.to_csv(index=False), lambda: plot_scenes(scenes))
            if images is not None and row["scale"]:
                try:
                    card["gallery"] = scene_gallery(row["name"], summary, table, row["scale"], images)
                except PipelineError as exc:
                    card["note"] = f"no scene crops: {exc}"
        else:
            card["note"] = f"no out-of-fold scores yet: `make oof EXP={row['name']}`"
        cards.append(card)
    return {"rows": rows, "cards": cards}


def build_report(out_dir: Path | None = None) -> dict:
    """Write reports/index.html (and its images); returns what it wrote and how long it took."""
    start = time.time()
    out_dir = Path(out_dir or paths.REPORTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    with locks.locked(out_dir, what=f"{out_dir} (the report)"):   # two renders would prune each other's cache
        return _render_report(out_dir, start)


def _render_report(out_dir: Path, start: float) -> dict:
    cache = Cache(out_dir)
    data = collect(SceneImages(cache), cache)
    submissions, corr, table = submission_rows(cache)
    cv_lb_svg = (cache.text("cvlb|" + table.to_csv(index=False), lambda: plot_cv_lb(table, corr))
                 if table.dropna(subset=["cv", "lb"]).shape[0] else None)
    scored = [r for r in data["rows"] if r["cv"] is not None]
    context = {
        "csp": CSP, "workdir": str(paths.WORKDIR),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "rows": data["rows"], "cards": data["cards"], "submissions": submissions, "corr": corr,
        "cv_lb_svg": cv_lb_svg, "best": max(scored, key=lambda r: r["cv"]) if scored else None,
        "fold_ids": sorted({f for r in data["rows"] for f in r["per_fold"]}, key=str),
        "show_seeds": any(len(r["per_seed"]) > 1 or r["seed_ensemble"] is not None for r in data["rows"]),
        "curves": {r["name"]: r["curves"] for r in data["rows"] if r["curves"]},
        "script": (TEMPLATES / "report.js").read_text(), "style": (TEMPLATES / "report.css").read_text(),
    }
    html = render(context)
    index = out_dir / "index.html"
    with io.atomic_path(index) as tmp:
        tmp.write_text(html)
    cache.used.add(index)
    cache.prune()
    return {"path": index, "experiments": sum(r["kind"] == "experiment" for r in data["rows"]),
            "blends": sum(r["kind"] == "blend" for r in data["rows"]), "submissions": len(submissions),
            "written": cache.misses, "reused": cache.hits, "seconds": time.time() - start}


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=None, help="output folder (default: reports/ of the work folder)")


def main(args) -> int:
    result = build_report(Path(args.out) if args.out else None)
    print(f"report: {result['experiments']} experiment(s), {result['blends']} blend(s), "
          f"{result['submissions']} submission(s); {result['written']} image(s)/plot(s) made, "
          f"{result['reused']} reused, {result['seconds']:.1f} s -> {result['path']}")
    return 0
