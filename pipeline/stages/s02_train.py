"""Stage 02: train one fold of one seed of an experiment.

    data/interim + data/folds.csv + pipeline/configs/<exp>.yaml
      -> models/<exp>/seed<s>/fold<f>/{best.pt, last.pt, log.csv, curves.png, config.yaml,
                                        TensorBoard events.out.tfevents.*}

Everything comes from the experiment config: the net (optionally pretrained), paired
random crops with augmentation (pipeline.data.patches), MADGRAD or Adam with a step schedule,
the weighted loss (pipeline.train.losses), EMA of the weights, gradient clipping, the
precision the hardware runs best (`train.precision`, pipeline.core.precision: bf16, fp16 with a
gradient scaler that skips inf/NaN steps, or fp32), the nets' fast paths (`train.fast`:
SwinIR's and HAT's cached window orders, channels-last convolutions; pipeline.nets.fast.prepare), on
the CPU the batch in shards trained on threads of their own (`train.cpu_shards`;
pipeline.accel.cpu.shards), optionally torch.compile (`train.compile`). Every `val_every` steps the held-out fold's
full scenes are scored with the competition SSIM (outputs rounded to uint8 levels, EMA
weights when EMA is on); `best.pt` keeps the best of them.

Resume: `last.pt` (written atomically every `ckpt_every` steps) holds the step, the
weights, EMA, optimizer, scheduler, RNG states, best score and the log. The sample
stream is a function of (seed, fold, step) (see pipeline.data.patches), so a run killed at any
moment and restarted with `--resume auto` ends with the same weights as one that never
stopped. A finished run is not retrained unless `--force`.

Scale out: started by `torchrun --nproc_per_node N` the run uses DDP (gloo on CPU,
nccl on GPU): each rank trains on its share of every batch, validation scenes are
split between ranks, rank 0 alone writes files and shows progress.
"""
from __future__ import annotations

import bisect
import contextlib
import copy
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from pipeline.accel.cpu import shards as cpu_shards
from pipeline.core import paths, precision, weights
from pipeline.core.checkpoints import read_checkpoint, save_checkpoint
from pipeline.core.config import PRETRAINED_RECORD, RUNTIME_KEYS, add_set_argument, dump_config, load_config
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path, locked
from pipeline.core.metrics import ssim_torch
from pipeline.data import extra as extra_data
from pipeline.data import patches as data
from pipeline.infer.tiling import tiled_forward
from pipeline.nets import build_net
from pipeline.nets.fast.prepare import prepare_for_training, training_window_attention
from pipeline.train import losses
from pipeline.train.board import TrainingBoard, remove_event_files

OPTIMIZERS = ("madgrad", "adam")
PRECISIONS = precision.NAMES
MAX_SKIPPED_STEPS = 25   # fp16: consecutive inf/NaN steps (scale / 2**25) before the run stops
ARTIFACTS = ("best.pt", "last.pt", "log.csv", "curves.png", "config.yaml")


# --- distributed context -------------------------------------------------------------

@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (the tensor itself when alone)."""
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
            values = values.cpu() / self.world
        return values

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
            values = values.cpu()
        return values

    def from_main(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (files are read on rank 0 only: no shared disk needed)."""
        if self.world > 1:
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            obj = box[0]
        return obj

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed() -> Dist:
    """DDP from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); alone otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world == 1:
        return Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


# --- config checks and seeding ------------------------------------------------------

def check_train_config(cfg: dict[str, Any]) -> None:
    """Refuse values the training loop cannot use, naming the config key."""
    t, source = cfg["train"], f"config '{cfg['exp']}'"

    def bad(key: str, problem: str) -> PipelineError:
        return PipelineError(f"{source}: train.{key} {problem}")

    for key in ("steps", "batch_size", "lr_patch", "val_every", "ckpt_every"):
        if isinstance(t[key], bool) or not isinstance(t[key], int) or t[key] < 1:
            raise bad(key, f"must be a positive integer, got {t[key]!r}")
    if t["optimizer"] not in OPTIMIZERS:
        raise bad("optimizer", f"'{t['optimizer']}' unknown ({' or '.join(OPTIMIZERS)})")
    if t["precision"] not in PRECISIONS:
        raise bad("precision", f"'{t['precision']}' unknown ({', '.join(PRECISIONS)})")
    for key in ("fast", "compile"):
        if not isinstance(t[key], bool):
            raise bad(key, f"must be true or false, got {t[key]!r}")
    ms, fs = list(t["milestones"]), list(t["lr_factors"])
    if ms != sorted(ms) or any(not 0 < m < 1 for m in ms):
        raise bad("milestones", f"must be increasing fractions of the steps in (0, 1), got {ms}")
    if len(fs) != len(ms) + 1:
        raise bad("lr_factors", f"needs one factor more than milestones ({len(ms) + 1}), got {fs}")
    if not 0 <= t["ema"] < 1:
        raise bad("ema", f"must be in [0, 1) (0 disables), got {t['ema']}")
    for key in ("grad_clip", "weight_decay", "val_tile"):
        if t[key] < 0:
            raise bad(key, f"must be >= 0, got {t[key]}")
    for key, least in (("num_workers", 0), ("cpu_shards", 1)):
        w = t[key]
        if w != "auto" and (isinstance(w, bool) or not isinstance(w, int) or w < least):
            raise bad(key, f"must be 'auto' or an integer >= {least}, got {w!r}")
    for key, p in t["augment"].items():
        if key != "dihedral" and not 0 <= p <= 1:
            raise bad(f"augment.{key}", f"is a probability in [0, 1], got {p}")


def run_seed(seed: int, fold: int) -> int:
    """One 32-bit seed from (seed, fold): folds of one seed differ, reruns do not."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def seed_everything(value: int) -> None:
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_net(net: nn.Module, t: dict[str, Any]) -> nn.Module:
    """The module the loop calls: `net` on its fast path (`train.fast`, in place: weights,
    gradients and optimizer state channels-last), compiled when `train.compile`
    (parameters shared, so checkpoints and the EMA see the same tensors)."""
    prepare_for_training(net, fast=t["fast"])
    return torch.compile(net) if t["compile"] else net


# --- the pieces of a run --------------------------------------------------------------

def build_model(cfg: dict[str, Any], pretrained: bool, main: bool) -> nn.Module:
    """The configured net; with its pretrained weights when asked (and `pretrained`)."""
    m = cfg["model"]
    net = build_net(m["name"], **m["args"])
    scale = cfg["data"]["scale"]
    if getattr(net, "scale", None) != scale:
        raise PipelineError(f"config '{cfg['exp']}': net '{m['name']}' upscales x{getattr(net, 'scale', '?')} "
                            f"but data.scale is {scale}; set the scale in model.args")
    if pretrained:
        load_pretrained(cfg, net, main)
    return net


def load_pretrained(cfg: dict[str, Any], net: nn.Module, main: bool) -> dict | None:
    """model.pretrained into the net, the model.reinit modules left freshly initialised
    (e.g. an upsampler for another scale); what was loaded (recorded in config.yaml), or
    None when training from scratch."""
    m = cfg["model"]
    if m["reinit"] and not m["pretrained"]:
        raise PipelineError(f"config '{cfg['exp']}': model.reinit {m['reinit']} needs model.pretrained")
    if not m["pretrained"]:
        return None
    try:
        report = weights.load_pretrained(net, m["pretrained"], reinit=m["reinit"])
    except PipelineError as exc:
        if m["pretrained_required"]:
            raise
        if main:
            warnings.warn(f"{exc}; model.pretrained_required is false, so '{m['name']}' "
                          "trains from scratch (expect a lower score)")
        return None
    if main:
        print(f"train: pretrained {m['pretrained']}: {report.summary()} (sha256 {report.sha256[:16]}...)")
    return report.record()


def build_optimizer(params, t: dict[str, Any]) -> torch.optim.Optimizer:
    if t["optimizer"] == "madgrad":
        import madgrad
        return madgrad.MADGRAD(params, lr=t["lr"], weight_decay=t["weight_decay"])
    return torch.optim.Adam(params, lr=t["lr"], weight_decay=t["weight_decay"])


def ema_update(decay: float):
    """AveragedModel's multi_avg_fn: an EMA whose decay warms up as min(decay, (1+n)/(10+n))
    after n updates (TensorFlow's/timm's warm-up), so a short fine-tuning run is not
    dominated by its starting weights. It depends only on n, which the EMA state holds."""
    @torch.no_grad()
    def update(ema_params, params, num_averaged) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1 + n) / (10 + n))
        for e, p in zip(ema_params, params):
            if e.is_floating_point():
                e.lerp_(p.detach(), weight)
            else:  # integer buffers (SwinIR's relative position index) are copied, not averaged
                e.copy_(p)
    return update


def lr_factor_at(step: int, t: dict[str, Any]) -> float:
    """Step schedule: lr_factors[i] between the (i-1)th and ith milestone (fractions of steps)."""
    bounds = [round(m * t["steps"]) for m in t["milestones"]]
    return t["lr_factors"][bisect.bisect_right(bounds, step)]


@torch.no_grad()
def validate(net: nn.Module, scenes: list[data.Scene], d: Dist, tile: int, overlap: int) -> float:
    """Mean competition SSIM over the scenes, outputs rounded to uint8 levels as submitted.

    fp32 always (the figure must be the score, not a bf16 approximation); ranks score
    every world-th scene and the sums are combined.
    """
    was_training = net.training
    net.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for scene in scenes[d.rank::d.world]:
        lr, hr = data.scene_tensors(scene)
        sr = tiled_forward(net, data.to_float(lr, d.device), net.scale, tile, overlap)
        sr = (sr.clamp(0, 1) * 255).round()
        total += torch.tensor([float(ssim_torch(sr.double(), hr.to(d.device).double(), data_range=255.0)), 1.0])
    net.train(was_training)
    total = d.all_sum(total)
    return float(total[0] / total[1])


def write_log(rows: list[dict], run: Path) -> None:
    with atomic_path(run / "log.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def plot_curves(rows: list[dict], bicubic_ssim: float | None, run: Path, title: str) -> None:
    """curves.png: training loss and validation SSIM against step (bicubic as a reference line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = pd.DataFrame(rows)
    # fixed margins, no layout engine: it measured ~0.4 s of text layout per plot
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.85, wspace=0.25)
    train_rows = log[log["loss"].notna()]
    window = len(train_rows) // 50  # a running mean once there are enough steps to smooth
    ax_loss.plot(train_rows["step"], train_rows["loss"], lw=0.6 if window > 1 else 1.2,
                 alpha=0.4 if window > 1 else 1.0, label="per step")
    if window > 1:
        ax_loss.plot(train_rows["step"], train_rows["loss"].rolling(window, min_periods=1).mean(),
                     lw=1.5, label=f"mean of {window} steps")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_loss.legend()
    val = log[log["val_ssim"].notna()]
    ax_val.plot(val["step"], val["val_ssim"], "o-", label="model (held-out fold)")
    if bicubic_ssim is not None:
        ax_val.axhline(bicubic_ssim, color="grey", ls="--", label=f"bicubic {bicubic_ssim:.4f}")
    ax_val.set(xlabel="step", ylabel="SSIM", title="validation SSIM")
    ax_val.legend()
    fig.suptitle(title)
    with atomic_path(run / "curves.png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def config_diff(a: dict, b: dict, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    keys = []
    for k in sorted(set(a) | set(b), key=str):
        dotted = f"{where}.{k}" if where else str(k)
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and dotted != "model.args":
            keys += config_diff(va, vb, dotted)
        elif va != vb:
            keys.append(dotted)
    return keys


def clean_run_dir(run: Path) -> None:
    """Start over: drop the artifacts of an earlier run and temporary files a kill left."""
    for name in ARTIFACTS:
        (run / name).unlink(missing_ok=True)
    remove_event_files(run)
    remove_stale_temporaries(run)


def read_run_state(run: Path, resume: str, force: bool) -> dict | None:
    """The last.pt of an earlier run of this folder (None: there is none). An unreadable
    last.pt, or best.pt beside a last.pt that would be kept, stops with the remedy;
    with --force or --resume never the run starts afresh over it (with a warning)."""
    last_path, best_path = run / "last.pt", run / "best.pt"
    afresh = "--force" if force else "--resume never" if resume == "never" else None
    try:
        state = read_checkpoint(last_path) if last_path.is_file() else None
        if state is not None and not force and best_path.is_file():
            read_checkpoint(best_path)  # kept by a skip or a resume: it must be readable
    except PipelineError as exc:
        if afresh is None:
            raise PipelineError(f"{exc}; rerun with --force (or --resume never) to start this run afresh "
                                "over it") from None
        warnings.warn(f"{exc}; starting afresh ({afresh})")
        return None
    return state


def remove_stale_temporaries(run: Path) -> None:
    for tmp in run.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


# --- the run ----------------------------------------------------------------------------

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


def train(cfg: dict[str, Any], fold: int, seed: int, resume: str = "auto", force: bool = False) -> Result:
    """Train (or resume, or skip if finished) one fold of one seed; see the module docstring."""
    d = init_distributed()
    try:
        # one writer per run folder (rank 0 writes; another trainer of this fold stops at once)
        with locked(paths.run_dir(cfg["exp"], seed, fold)) if d.main else contextlib.nullcontext():
            return _train(cfg, fold, seed, resume, force, d)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: dict[str, Any], fold: int, seed: int, resume: str, force: bool, d: Dist) -> Result:
    began = time.perf_counter()
    check_train_config(cfg)
    t, scale = cfg["train"], cfg["data"]["scale"]
    exp = cfg["exp"]
    run = paths.run_dir(exp, seed, fold)
    last_path, best_path = run / "last.pt", run / "best.pt"
    name = f"{exp} fold {fold} seed {seed}"

    # what is on disk decides: skip (finished), resume (unfinished) or start over
    split = data.split_digest(data.fold_ids(fold)[1])
    state = d.from_main(read_run_state(run, resume, force) if d.main else None)
    if state is not None and not force:
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
        if finished:
            ts = state["train_state"]
            if d.main:
                print(f"train {name}: already trained ({ts['best_ssim']:.4f} val SSIM at step "
                      f"{ts['best_step']}) -> {run}; --force retrains")
            return Result(run, _net_from_state(cfg, ts["net"]), None, ts["best_ssim"],
                          ts["best_step"], ts["bicubic_ssim"], 0, ts["log"])
    resuming = state is not None and not force and resume == "auto"

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
    ema = (AveragedModel(net, multi_avg_fn=ema_update(t["ema"]), use_buffers=True)
           if t["ema"] > 0 else None)
    optimizer = build_optimizer(net.parameters(), t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor_at(s, t))
    loss_fn = losses.build_loss(cfg["loss"]).to(d.device)
    prec = precision.choose(t["precision"], d.device, net)
    amp_dtype = prec.dtype
    # fp16: loss scaled up for the backward, inf/NaN steps skipped (never reach the weights)
    scaler = torch.amp.GradScaler(d.device.type, enabled=prec.scaler)
    shards = cpu_shards.plan(t["cpu_shards"], d.device, net, t["batch_size"] // d.world, d.world, t["compile"])
    if d.main:
        print(f"train {name}: precision {prec.name} ({prec.reason}); {shards.reason}")
    if d.device.type == "cpu" and t["fast"] and not t["compile"]:
        # the kernel is loaded here, once, before the shards fork: they inherit it
        threads = cpu_shards.threads_per_shard(shards.shards) if shards.shards > 1 else torch.get_num_threads()
        attention = training_window_attention(net, amp_dtype or torch.float32, threads)
        if attention and d.main:
            print(f"train {name}: window attention: {attention}")
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
        bicubic_ssim = validate(build_net("bicubic", scale=scale).to(d.device), val_scenes, d,
                                t["val_tile"], overlap)
        # the starting point counts as a candidate: a pretrained net may already be the best
        last_val = validate(net, val_scenes, d, t["val_tile"], overlap)
        start, best_ssim, best_step, saved_step = 0, last_val, 0, None
        log = [{"step": 0, "loss": None, "lr": None, "val_ssim": last_val, "bicubic_ssim": bicubic_ssim}]
    if d.main:
        remove_stale_temporaries(run)

    model = DistributedDataParallel(forward_net) if d.world > 1 else forward_net
    eval_net = ema.module if ema is not None else net
    board = TrainingBoard(run, start, val_scenes[0], scale, d.device) if d.main else None
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
    with cpu_shards.ShardedStep(model, loss_fn, shards.shards, amp_dtype, d.device, shards.processes) as sharded:
        for step, (lr_u8, hr_u8) in zip(range(start, t["steps"]), data.batches(stream, start, t["num_workers"], d.device)):
            lr_img, hr_img = data.to_float(lr_u8, d.device), data.to_float(hr_u8, d.device)
            optimizer.zero_grad(set_to_none=True)
            # forward + backward (in shards on the CPU's threads); the weights are not touched yet
            loss, terms = sharded.step(lr_img, hr_img, scaler)
            # every rank sees the same (mean) loss: they stop together and log the global figure
            reported = d.all_mean(torch.tensor([float(loss)] + list(terms.values()), dtype=torch.float64))
            loss_value = float(reported[0])
            done = step + 1
            if not math.isfinite(loss_value) and not prec.scaler:
                _stop_non_finite(f"loss is {loss_value}", done, saved_step, run, log, d)
            scaler.unscale_(optimizer)              # true gradients for clipping (no-op without fp16)
            if t["grad_clip"] > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), t["grad_clip"]))
                if not math.isfinite(norm) and not prec.scaler:
                    _stop_non_finite(f"gradient norm is {norm}", done, saved_step, run, log, d)
            lr_now = optimizer.param_groups[0]["lr"]
            scale_before = scaler.get_scale() if prec.scaler else None
            scaler.step(optimizer)                  # fp16: skipped when a gradient is inf/NaN
            scaler.update()                         # ... and the scale halved
            skipped = prec.scaler and scaler.get_scale() < scale_before
            with warnings.catch_warnings():         # a skipped first step makes the scheduler warn
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`")
                scheduler.step()
            if ema is not None and not skipped:     # a skipped step changed nothing to average
                ema.update_parameters(net)
            skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
            if skipped_in_a_row > MAX_SKIPPED_STEPS:
                _stop_non_finite(f"{skipped_in_a_row} fp16 steps in a row had inf/NaN values (loss {loss_value})",
                                 done, saved_step, run, log, d)

            row = {"step": done, "loss": loss_value, "lr": lr_now, "val_ssim": None, "bicubic_ssim": None,
                   "precision": prec.name}
            # why, at the first step and where a resume (other hardware) changed the precision:
            # a resume on the same machine logs exactly what an uninterrupted run does
            if done == 1 or (done == start + 1 and log[-1].get("precision") != prec.name):
                row["precision_reason"] = prec.reason
            if prec.scaler:
                row.update(skipped=int(skipped), grad_scale=scaler.get_scale())
            if len(terms) > 1:
                row.update({f"loss_{k}": float(v) for k, v in zip(terms, reported[1:])})
            if done % t["val_every"] == 0 or done == t["steps"]:
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
                    plot_curves(log, bicubic_ssim, run, f"{name}: best {best_ssim:.4f} at step {best_step}")
                if done % t["ckpt_every"] == 0 or done == t["steps"]:
                    board.flush()   # the events of every step up to the checkpoint are on disk
                    save_last(done)
                    saved_step = done
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}",
                                val=f"{last_val:.4f}", refresh=False)
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
        print(f"train {name}: best val SSIM {best_ssim:.4f} at step {best_step} (bicubic "
              f"{bicubic_ssim:.4f}, {best_ssim - bicubic_ssim:+.4f}); {steps_done} steps in "
              f"{seconds:.1f} s ({steps_done / max(loop_seconds, 1e-9):.2f} steps/s{resumed}) -> {run}")
    return Result(run, net, ema.module if ema is not None else None, best_ssim, best_step,
                  bicubic_ssim, steps_done, log)


def _stop_non_finite(what: str, step: int, saved_step: int | None, run: Path, log: list[dict],
                     d: Dist) -> None:
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


# --- command line -------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--exp", default="demo", help="experiment name (pipeline/configs/<exp>.yaml) or YAML path")
    parser.add_argument("--fold", type=int, required=True, help="held-out fold (validation)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--resume", choices=("auto", "never"), default="auto",
                        help="auto: continue from last.pt when there is one (default); never: start over")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (= --set train.steps=N)")
    parser.add_argument("--force", action="store_true", help="retrain even a finished run, from scratch")
    add_set_argument(parser)


def main(args) -> int:
    steps = [f"train.steps={args.steps}"] if args.steps is not None else []
    cfg = load_config(args.exp, args.overrides + steps)
    train(cfg, args.fold, args.seed, resume=args.resume, force=args.force)
    return 0
