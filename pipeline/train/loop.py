"""The training loop: one fold of one seed, from the config to best.pt, resumable at any step.

    models/<exp>/seed<s>/fold<f>/{best.pt, last.pt, log.csv, curves.png, config.yaml,
                                  TensorBoard events.out.tfevents.*}

`train(cfg, fold, seed)` builds the run from the config (`pipeline.train.recipe`: the net,
optionally pretrained, MADGRAD or Adam with a step schedule, EMA; `pipeline.train.losses`;
the precision the hardware runs best, `pipeline.infer.precision`; paired random crops,
`pipeline.data.patches`) and repeats one `TrainStep` (`pipeline.train.step`). Every
`val_every` steps the held-out fold's full scenes are scored with the competition SSIM
(EMA weights when EMA is on); `best.pt` keeps the best of them, the starting point included.

Resume: `last.pt` (written atomically every `ckpt_every` steps) holds the step, the
weights, EMA, optimizer, scheduler, RNG states, best score and the log. The sample stream is
a function of (seed, fold, step), so a run killed at any moment and restarted with
`resume="auto"` ends with the same weights as one that never stopped. A finished run is
skipped unless `force`; a run whose config changed (but for `RUNTIME_KEYS`) is refused.

Devices: the step is device-independent; on the CPU `pipeline.accel` may cut each batch into
shards on threads of their own (`train.cpu_shards`), and under torchrun the ranks share each
batch through DDP (`pipeline.train.distributed`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline import accel
from pipeline.core import paths
from pipeline.core.checkpoints import save_checkpoint
from pipeline.core.config import PRETRAINED_RECORD, RUNTIME_KEYS, check_values, dump_config
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path
from pipeline.core.locks import locked
from pipeline.data import extra as extra_data
from pipeline.data import patches as data
from pipeline.nets import build_net
from pipeline.train.board import TrainingBoard
from pipeline.train.distributed import Dist, init_distributed
from pipeline.train.recipe import build_model, load_pretrained, optimisation, training_net
from pipeline.train.records import plot_curves, write_log
from pipeline.train.resume import (
    clean_run_dir,
    config_diff,
    read_run_state,
    remove_stale_temporaries,
    rng_state,
    run_seed,
    seed_everything,
    set_rng_state,
)
from pipeline.train.step import Gradients, NonFiniteStep, TrainStep
from pipeline.train.validate import validate

MAX_SKIPPED_STEPS = 25   # fp16: consecutive inf/NaN steps (scale / 2**25) before the run stops


@dataclass
class Result:
    """What a run leaves in memory (the files are in `run`)."""
    run: Path
    net: nn.Module                  # trained weights (raw, not EMA)
    ema: nn.Module | None           # EMA weights (None when EMA is off)
    best_ssim: float | None
    best_step: int | None
    bicubic_ssim: float | None
    steps_done: int                 # steps trained by this call (0: already finished)
    log: list[dict]


def train(cfg: dict[str, Any], fold: int | str, seed: int, resume: str = "auto", force: bool = False) -> Result:
    """Train (or resume, or skip if finished) one fold of one seed, or with `fold="all"`
    (`paths.FULL`) the seed's full-data fit; see the module docstring."""
    d = init_distributed(cfg["device"])
    try:
        # one writer per run folder (rank 0 writes; another trainer of this fold stops at once)
        with locked(paths.run_dir(cfg["exp"], seed, fold)) if d.main else contextlib.nullcontext():
            return _train(cfg, fold, seed, resume, force, d)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _earlier_run(cfg: dict, run: Path, fold: int | str, split: str, resume: str, force: bool, d: Dist) -> dict | None:
    """An earlier run's last.pt to resume or to skip as finished (None: start afresh); a
    changed config or split is refused."""
    state = d.from_main(read_run_state(run, resume, force) if d.main else None)
    if state is None or force:
        return None
    changed = [k for k in config_diff(state["config"], cfg) if k not in RUNTIME_KEYS]
    finished = state["finished"]
    what = "was trained" if finished else "was started"
    if changed and (finished or resume == "auto"):
        raise PipelineError(f"{run}: {what} with a different config ({', '.join(changed[:6])}); "
                            f"--force retrains from scratch")
    # checkpoints from before the split was recorded have none: nothing to compare
    if state.get("val_split") not in (None, split) and (finished or resume == "auto"):
        raise PipelineError(f"{run}: {what} on another split of {paths.FOLDS} (fold {fold} holds "
                            f"other validation scenes now); --force retrains from scratch")
    return state if finished or resume == "auto" else None


def _train(cfg: dict[str, Any], fold: int | str, seed: int, resume: str, force: bool, d: Dist) -> Result:
    began = time.perf_counter()
    check_values(cfg)        # a config built in code (tests) is checked as a loaded one
    t, scale = cfg["train"], cfg["data"]["scale"]
    exp = cfg["exp"]
    run = paths.run_dir(exp, seed, fold)
    last_path, best_path = run / "last.pt", run / "best.pt"
    full = fold == paths.FULL        # a full-data fit: every training scene, nothing to validate on
    name = f"{exp} {'full fit' if full else f'fold {fold}'} seed {seed}"

    # what is on disk decides: skip (finished), resume (unfinished) or start over; a fold's run
    # records its validation scenes, a full fit its training scenes
    split = data.split_digest(data.fold_ids(fold)[0 if full else 1])
    state = _earlier_run(cfg, run, fold, split, resume, force, d)
    if state is not None and state["finished"]:
        ts = state["train_state"]
        if d.main:
            done = f"{ts['best_ssim']:.4f} val SSIM at step {ts['best_step']}" if not full else f"{state['step']} steps"
            print(f"train {name}: already trained ({done}) -> {run}; --force retrains")
        return Result(run, _net_from_state(cfg, ts["net"]), None, ts["best_ssim"],
                      ts["best_step"], ts["bicubic_ssim"], 0, ts["log"])
    resuming = state is not None

    seed_everything(run_seed(seed, fold))
    train_scenes, val_scenes = data.load_fold(fold, scale)
    extra_scenes = extra_data.training_scenes(cfg, t["lr_patch"])   # training only, never validated
    if extra_scenes and d.main:
        print(f"train {name}: + {extra_data.describe(cfg, extra_scenes)}")
    stream = data.PairedPatches(train_scenes, scale=scale, lr_patch=t["lr_patch"],
                                batch_size=t["batch_size"], steps=t["steps"], augment=t["augment"],
                                seed=seed, fold=fold, rank=d.rank, world_size=d.world,
                                extra_scenes=extra_scenes, extra_weight=cfg["data"]["extra_weight"])

    net = build_model(cfg, pretrained=False, main=d.main)
    loaded = None if resuming else load_pretrained(cfg, net, d.main)
    net = net.to(d.device)
    forward_net = training_net(net, t)
    optimizer, scheduler, loss_fn, prec, scaler, ema = optimisation(net, cfg, d.device)
    model = DistributedDataParallel(forward_net) if d.world > 1 else forward_net
    gradients, how = accel.training_gradients(Gradients(model, loss_fn, prec.dtype, d.device), net,
                                              t["cpu_shards"], t["batch_size"] // d.world, d.world, t["compile"])
    if d.main:
        print(f"train {name}: precision {prec.name} ({prec.reason}); {how}")
    overlap = cfg["infer"]["tile_overlap"]

    if resuming:
        ts = state["train_state"]
        net.load_state_dict(ts["net"])
        if ema is not None:
            ema.load_state_dict(ts["ema"])
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        if prec.scaler and ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        set_rng_state(ts["rng"])
        start, log = state["step"], ts["log"]
        saved_step = start
        best_ssim, best_step, bicubic_ssim = ts["best_ssim"], ts["best_step"], ts["bicubic_ssim"]
        last_val = next((r["val_ssim"] for r in reversed(log) if r.get("val_ssim") is not None), None)
    else:
        if d.main:
            clean_run_dir(run)
            run.mkdir(parents=True, exist_ok=True)
            with atomic_path(run / "config.yaml") as tmp:
                tmp.write_text(dump_config(cfg) + (dump_config({PRETRAINED_RECORD: loaded}) if loaded else ""))
        bicubic_ssim = last_val = None
        if not full:
            bicubic_ssim = validate(build_net("bicubic", scale=scale).to(d.device), val_scenes, d,
                                    t["val_tile"], overlap)
            # the starting point counts as a candidate: a pretrained net may already be the best
            last_val = validate(net, val_scenes, d, t["val_tile"], overlap)
        start, best_ssim, best_step, saved_step = 0, last_val, 0, None
        log = [{"step": 0, "loss": None, "lr": None, "val_ssim": last_val, "bicubic_ssim": bicubic_ssim}]
    if d.main:
        remove_stale_temporaries(run)

    eval_net = ema.module if ema is not None else net
    shown = val_scenes[0] if val_scenes else train_scenes[0]        # the board's crop
    board = TrainingBoard(run, start, shown, scale, d.device) if d.main else None
    if board is not None and not resuming:
        board.log_row(log[0])
        board.log_crop(0, eval_net)

    def save_best(step: int, val: float) -> None:
        save_checkpoint(best_path, net_name=cfg["model"]["name"], net_args=cfg["model"]["args"],
                        state_dict=eval_net.state_dict(), exp=exp, seed=seed, fold=fold, step=step,
                        val_ssim=val, bicubic_ssim=bicubic_ssim, config=cfg, val_split=split)

    def save_last(step: int) -> None:
        train_state = {"net": net.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                       "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "scaler": scaler.state_dict() if prec.scaler else None, "rng": rng_state(),
                       "best_ssim": best_ssim, "best_step": best_step, "bicubic_ssim": bicubic_ssim, "log": log}
        write_log(log, run)  # before last.pt: a kill in between never leaves a finished run's log behind
        save_checkpoint(last_path, net_name=cfg["model"]["name"], net_args=cfg["model"]["args"],
                        state_dict=eval_net.state_dict(), exp=exp, seed=seed, fold=fold, step=step,
                        val_ssim=last_val, config=cfg, finished=step == t["steps"],
                        train_state=train_state, val_split=split)

    if not resuming and d.main:
        save_best(0, last_val)

    loop_began = time.perf_counter()
    bar = tqdm(total=t["steps"], initial=start, desc=f"train {name}", unit="step",
               disable=not d.main or None, dynamic_ncols=True)
    model.train()
    skipped_in_a_row = 0
    with gradients:
        step = TrainStep(net, gradients, optimizer, scheduler, scaler, ema, t["grad_clip"], d.all_mean)
        for index, (lr_u8, hr_u8) in zip(range(start, t["steps"]), data.batches(stream, start, t["num_workers"], d.device)):
            done = index + 1
            try:
                outcome = step(data.to_float(lr_u8, d.device), data.to_float(hr_u8, d.device))
            except NonFiniteStep as exc:    # before the bad update reached the weights
                _stop_non_finite(str(exc), done, saved_step, run, log, d)
            skipped_in_a_row = skipped_in_a_row + 1 if outcome.skipped else 0
            if skipped_in_a_row > MAX_SKIPPED_STEPS:
                _stop_non_finite(f"{skipped_in_a_row} fp16 steps in a row had inf/NaN values (loss {outcome.loss})",
                                 done, saved_step, run, log, d)

            row = {"step": done, "loss": outcome.loss, "lr": outcome.lr, "val_ssim": None, "bicubic_ssim": None,
                   "precision": prec.name}
            # why, at the first step and where a resume (other hardware) changed the precision:
            # a resume on the same machine logs exactly what an uninterrupted run does
            if done == 1 or (done == start + 1 and log[-1].get("precision") != prec.name):
                row["precision_reason"] = prec.reason
            if prec.scaler:
                row.update(skipped=int(outcome.skipped), grad_scale=outcome.grad_scale)
            if len(outcome.terms) > 1:
                row.update({f"loss_{k}": v for k, v in outcome.terms.items()})
            if not full and (done % t["val_every"] == 0 or done == t["steps"]):
                last_val = row["val_ssim"] = validate(eval_net, val_scenes, d, t["val_tile"], overlap)
                row["bicubic_ssim"] = bicubic_ssim
                if last_val > best_ssim:
                    best_ssim, best_step = last_val, done
                    if d.main:
                        save_best(done, last_val)
            log.append(row)
            if d.main:
                board.log_row(row)
                if row["val_ssim"] is not None:
                    board.log_crop(done, eval_net)
                # the plot before last.pt: once last.pt says finished, every artifact is complete
                if row["val_ssim"] is not None or done == t["steps"]:
                    plot_curves(log, bicubic_ssim, run, f"{name}: full fit, {done} steps" if full
                                else f"{name}: best {best_ssim:.4f} at step {best_step}")
                if done % t["ckpt_every"] == 0 or done == t["steps"]:
                    board.flush()   # the events of every step up to the checkpoint are on disk
                    if full:        # nothing to select on: best.pt is the (EMA) weights of the last checkpoint
                        best_step = done
                        save_best(done, None)
                    save_last(done)
                    saved_step = done
                bar.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{outcome.lr:.2e}",
                                **({} if full else {"val": f"{last_val:.4f}"}), refresh=False)
                bar.update(1)
    bar.close()
    if board is not None:
        board.close()
    d.barrier()

    loop_seconds = time.perf_counter() - loop_began
    seconds = time.perf_counter() - began
    steps_done = t["steps"] - start
    if d.main:
        resumed = f", resumed at step {start}" if start else ""
        scored = (f"best val SSIM {best_ssim:.4f} at step {best_step} (bicubic {bicubic_ssim:.4f}, "
                  f"{best_ssim - bicubic_ssim:+.4f})" if not full else
                  f"full-data fit on {len(train_scenes)} scenes, best.pt = the weights at step {best_step}")
        print(f"train {name}: {scored}; {steps_done} steps in "
              f"{seconds:.1f} s ({steps_done / max(loop_seconds, 1e-9):.2f} steps/s{resumed}) -> {run}")
    return Result(run, net, ema.module if ema is not None else None, best_ssim, best_step,
                  bicubic_ssim, steps_done, log)


def _stop_non_finite(what: str, step: int, saved_step: int | None, run: Path, log: list[dict],
                     d: Dist) -> NoReturn:
    """Stop before the bad update reaches the weights; last.pt stays the last good state."""
    where = (f"the last good checkpoint {run / 'last.pt'} (step {saved_step}) was kept"
             if saved_step is not None else "no checkpoint had been written yet")
    if d.main and log:
        write_log(log, run)
    raise PipelineError(f"{run}: {what} at step {step}; training stopped, {where}. "
                        "Lower train.lr or train.grad_clip, or use precision fp32, and retrain "
                        "(--force)")


def _net_from_state(cfg: dict[str, Any], state_dict: dict) -> nn.Module:
    net = build_net(cfg["model"]["name"], **cfg["model"]["args"])
    net.load_state_dict(state_dict)
    return net
