"""`python -m pipeline blend`: weights over experiments, fitted on their out-of-fold predictions.

    python -m pipeline blend --exps aerial aerial_rfdn aerial_safmn --name trio
      models/<exp>/oof/pred_float/<id>.npy (stage 03) + data/folds.csv + the training truths
        -> models/blends/<name>/blend.json

A blend is a weighted mean of experiments: each member's fold x seed checkpoints x TTA
views are averaged (as stage 04 does for one experiment), the members' means are
weighted, and the result is clipped and rounded once. Its weights are fitted on what
stage 03 kept: each training scene's out-of-fold float prediction per member, blended,
rounded and scored with the competition SSIM.

Weights: greedy forward selection with replacement (Caruana et al., "Ensemble selection
from libraries of models", ICML 2004): start from the best member alone, then `MAX_STEPS`
times add the member (any, again and again) whose addition gives the highest mean SSIM,
and keep the best ensemble met on the way; the weights are its counts over the total. Chosen
over continuous hill climbing or a solver because the weights are non-negative and sum
to 1 by construction, a member that does not help never enters, the steps are coarse
(1/20 at the finest) so a fit on a few dozen scenes has little room to overfit, and every
candidate is a count vector whose per-scene scores are cached and shared between folds.

Honest figures: each member's CV, the equal-weight CV (nothing fitted), and the fitted
CV measured out of fold: for each fold k, weights fitted on the other folds' scenes only,
scored on fold k's (`nested_cv`). When that fitted CV does not beat equal weights, the
scenes are too few for a fit to pay off out of fold: the blend says so and keeps equal
weights. Every score, in the search and in the report, is `competition_ssim` of the
rounded blend, cached per (mix, scene). Cost: one SSIM per scene and mix tried; a fit
stops after `PATIENCE` additions without a new best, and the folds' fits mostly walk the
same mixes, so a 3-member blend scores some tens of mixes.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.core import io, paths
from pipeline.core.artifacts import BLEND_FORMAT, BLEND_JSON
from pipeline.core.config import config_path, load_config
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import competition_ssim

MAX_STEPS = 20       # additions of the greedy selection: weights in steps of at least 1/20
PATIENCE = 5         # ... and it stops after this many additions without a new best
WEIGHTINGS = ("fit", "equal")   # blend --weights

# A score function: (member counts, scene positions) -> SSIM of each of those scenes.
ScoreFn = Callable[[tuple, np.ndarray], np.ndarray]


# --- the fit: pure functions of a score function -------------------------------------------

def greedy_selection(score: ScoreFn, n_members: int, scenes: np.ndarray,
                     max_steps: int = MAX_STEPS) -> tuple[int, ...]:
    """Counts of each member (greedy forward selection with replacement) on `scenes` only.

    As Caruana et al. run it: `max_steps` additions, each the best one even when it scores
    lower than the step before (weights like 0.6/0.3/0.1 are only reached through coarser
    points that may score less), stopping after `PATIENCE` additions without a new best;
    the best ensemble along the way is returned."""
    def mean(counts: tuple) -> float:
        return float(np.mean(score(counts, scenes)))

    singles = [tuple(int(i == m) for i in range(n_members)) for m in range(n_members)]
    counts = max(singles, key=mean)                      # first best on ties
    best, best_counts, since_best = mean(counts), counts, 0
    for _ in range(max_steps - 1):
        if since_best >= PATIENCE:
            break
        candidates = [tuple(c + (i == m) for i, c in enumerate(counts)) for m in range(n_members)]
        values = [mean(c) for c in candidates]
        pick = int(np.argmax(values))                    # first best on ties
        counts = candidates[pick]
        since_best += 1
        if values[pick] > best:
            best, best_counts, since_best = values[pick], counts, 0
    return reduced(best_counts)


def reduced(counts: tuple) -> tuple[int, ...]:
    """Counts over their greatest common divisor: (2, 2) and (1, 1) are one blend."""
    divisor = np.gcd.reduce(np.asarray(counts, dtype=int))
    return tuple(int(c) // int(divisor) for c in counts)


def weights_of(counts: tuple) -> np.ndarray:
    counts = np.asarray(counts, dtype=float)
    return counts / counts.sum()


def nested_cv(score: ScoreFn, n_members: int, folds: np.ndarray,
              fit: Callable = greedy_selection) -> dict:
    """Out-of-fold figures of the fit: for each fold k, counts fitted on the scenes of the
    other folds only, scored on fold k. Returns per-scene scores and per-fold details."""
    per_scene = np.empty(len(folds))
    per_fold = {}
    for k in sorted(set(folds.tolist())):
        held_out = np.flatnonzero(folds == k)
        counts = fit(score, n_members, np.flatnonzero(folds != k))
        per_scene[held_out] = score(counts, held_out)
        per_fold[str(k)] = {"counts": list(counts), "weights": weights_of(counts).round(6).tolist(),
                            "fitted": float(per_scene[held_out].mean()), "n": int(len(held_out))}
    return {"per_scene": per_scene, "per_fold": per_fold, "cv": float(per_scene.mean())}


# --- the data: members' out-of-fold float predictions ------------------------------------

class OOFPredictions:
    """Every member's out-of-fold float prediction and the truth of each training scene,
    scored for any count vector (blend = counts-weighted mean, clipped, rounded once)."""

    def __init__(self, exps: list[str], ids: list[int], truths: list[np.ndarray]):
        self.exps, self.ids = exps, ids
        self.floats = [[io.read_float_prediction(paths.oof_predictions_dir(e) / f"{i}.npy") for i in ids]
                       for e in tqdm(exps, desc="blend: reading OOF predictions", unit="exp", disable=None)]
        for exp, preds in zip(exps, self.floats):
            for scene_id, pred, truth in zip(ids, preds, truths):
                if pred.shape != (3, *truth.shape[:2]):
                    raise PipelineError(f"{paths.oof_predictions_dir(exp) / f'{scene_id}.npy'}: shape "
                                        f"{pred.shape}, but scene {scene_id}'s truth is {truth.shape}")
        self.truths = truths
        self._scores: dict[tuple, float] = {}

    def blended(self, counts: tuple, pos: int) -> np.ndarray:
        """uint8 HxWx3 of scene `pos`: the counts-weighted float mean, clipped, x255, rounded once."""
        w = weights_of(counts)
        total = sum(float(wm) * self.floats[m][pos] for m, wm in enumerate(w) if wm > 0)
        return (np.clip(total, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)

    def score(self, counts: tuple, scenes: np.ndarray) -> np.ndarray:
        """Per-scene competition SSIM (the organiser's scorer) of the blend on `scenes`, cached
        per (reduced counts, scene): the folds' fits and the report share every evaluation."""
        out, counts = [], reduced(counts)
        for pos in map(int, scenes):
            key = (counts, pos)
            if key not in self._scores:
                self._scores[key] = competition_ssim(self.blended(counts, pos), self.truths[pos])
            out.append(self._scores[key])
        return np.asarray(out)


def _oof_summary(exp: str) -> dict:
    path = paths.oof_dir(exp) / "summary.json"
    if not path.is_file():
        raise PipelineError(f"{path}: missing; run stage 03 first (`make oof EXP={exp}`)")
    summary = json.loads(path.read_text())
    if "float_predictions" not in summary:
        raise PipelineError(f"{path}: made before stage 03 kept its float predictions; rerun `make oof EXP={exp}`")
    return summary


def check_members(exps: list[str], folds: pd.DataFrame) -> list[dict]:
    """Each member's OOF summary, refused unless it covers every scene of folds.csv with
    the fold it has there now, and every member predicts at the same scale and TTA."""
    if len(exps) < 2:
        raise PipelineError("blend: give at least two experiments (--exps A B ...)")
    if len(set(exps)) != len(exps):
        raise PipelineError(f"blend: an experiment is listed twice ({' '.join(exps)})")
    want = folds.set_index("id")["fold"]
    summaries = []
    for exp in exps:
        summary = _oof_summary(exp)
        table = pd.read_csv(paths.oof_dir(exp) / "oof.csv")
        scored = table.groupby("id")["fold"].first()
        if sorted(scored.index) != sorted(want.index) or (scored.loc[want.index] != want).any():
            raise PipelineError(f"{paths.oof_dir(exp)}: out-of-fold scores of other scenes or folds than "
                                f"{paths.FOLDS} holds now (folds re-split or a fold untrained); rerun "
                                f"`make train-all oof EXP={exp}`")
        summaries.append(summary)
    for key in ("tta",):
        values = {s["exp"]: s["inference"][key] for s in summaries}
        if len(set(values.values())) > 1:
            raise PipelineError(f"blend: members scored with different {key} ({values}); rerun their "
                                f"stage 03 with one (`python -m pipeline oof --exp E --{key} N`)")
    scales = {e: load_config(e)["data"]["scale"] for e in exps}
    if len(set(scales.values())) > 1:
        raise PipelineError(f"blend: members of different scales ({scales})")
    return summaries


def fit_blend(exps: list[str], name: str, weighting: str = "fit") -> dict:
    """Fit the blend of `exps` and write models/blends/<name>/blend.json; returns its record.

    weighting "fit" keeps the fitted weights when they beat equal weights out of fold (else
    equal); "equal" keeps equal weights whatever the fit says (the figures are the same)."""
    if weighting not in WEIGHTINGS:
        raise PipelineError(f"blend --weights {weighting}: one of {', '.join(WEIGHTINGS)} expected")
    from pipeline.core.artifacts import load_folds
    from pipeline.data.patches import load_scenes

    start = time.time()
    if config_path(name).exists():
        raise PipelineError(f"--name {name}: an experiment of that name exists ({config_path(name)}); "
                            "its predictions would share a folder with the blend's: pick another name")
    folds = load_folds().sort_values("id")
    summaries = check_members(exps, folds)
    ids = folds["id"].astype(int).tolist()
    scale = int(load_config(exps[0])["data"]["scale"])
    truths = [scene.hr for scene in load_scenes(ids, scale)]
    oof = OOFPredictions(exps, ids, truths)
    fold_of = folds["fold"].to_numpy()
    n = len(exps)
    everything = np.arange(len(ids))

    with tqdm(total=len(set(fold_of.tolist())) + 1, desc=f"blend {name}: greedy fits", unit="fit",
              disable=None) as bar:
        def fit(score, n_members, scenes):
            counts = greedy_selection(score, n_members, scenes)
            bar.update(1)
            return counts
        nested = nested_cv(oof.score, n, fold_of, fit=fit)
        fitted_counts = fit(oof.score, n, everything)

    equal = tuple([1] * n)
    members_cv = {e: float(oof.score(tuple(int(i == m) for i in range(n)), everything).mean())
                  for m, e in enumerate(exps)}
    equal_cv = float(oof.score(equal, everything).mean())
    for k, detail in nested["per_fold"].items():
        detail["equal"] = float(oof.score(equal, np.flatnonzero(fold_of == int(k))).mean())
    fitted_cv = nested["cv"]
    in_sample = float(oof.score(fitted_counts, everything).mean())
    keep_fitted = weighting == "fit" and fitted_cv > equal_cv
    weights = weights_of(fitted_counts if keep_fitted else equal)
    if weighting == "equal":
        verdict = (f"equal weights, as asked (--weights equal); out of fold the fit scores {fitted_cv:.4f} "
                   f"vs equal {equal_cv:.4f}")
    elif keep_fitted:
        verdict = (f"fitted weights kept: out of fold they beat equal weights by {fitted_cv - equal_cv:+.4f} "
                   f"over {len(ids)} scenes")
    else:
        verdict = (f"too few scenes for a weight fit to beat equal weights out of fold ({len(ids)} scenes: "
                   f"fitted {fitted_cv:.4f} vs equal {equal_cv:.4f}); keeping equal weights")
    record = {
        "format": BLEND_FORMAT, "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": f"greedy forward selection with replacement (Caruana et al. 2004), at most {MAX_STEPS} additions",
        "members": [{"exp": e, "weight": float(w), "seeds": s["float_predictions"]["seeds"],
                     "oof_cv": float((s["seed_ensemble"] or s)["cv"]["mean"]), "cv": members_cv[e]}
                    for e, w, s in zip(exps, weights, summaries)],
        "kept": "fitted" if keep_fitted else "equal", "weighting": weighting,
        "verdict": verdict,
        "cv": {"members": members_cv, "equal": equal_cv, "fitted_out_of_fold": fitted_cv,
               "fitted_in_sample": in_sample, "blend": fitted_cv if keep_fitted else equal_cv},
        "fitted_weights": dict(zip(exps, weights_of(fitted_counts).round(6).tolist())),
        "per_fold": nested["per_fold"],
        "n_scenes": len(ids), "tta": int(summaries[0]["inference"]["tta"]),
        "seconds": round(time.time() - start, 1),
    }
    out = paths.blend_dir(name) / BLEND_JSON
    with io.atomic_path(out) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return record
