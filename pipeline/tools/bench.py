"""`python -m pipeline bench` (`make bench`): speed and peak memory of inference and training.

Rows (see ROWS), each the median of `--repeats` timed runs after a warm-up, with the
throughput in output megapixels per second and the peak resident memory of the process
that ran it:
- SwinIR-S x4, RLFN x4 and HAT-S on one competition scene (300x375 -> 1200x1500; HAT-S a
  96x128 crop) through `infer.ensemble.predict_scene`: the reference path (`fast=False`, the
  equivalence reference) against the fast path, fp32 and bf16, whole scene and tiled, and
  8-way TTA; `-noaccel` rows the fast path with the CPU speed-ups off (`pipeline.accel`);
- one training step as stage 02 takes it (`train.step.TrainStep` with the recipe's loss,
  optimizer, schedule, EMA and gradient clipping, on ready tensors): `<net>-train-ref` the
  plain way (fp32, reference path, the whole batch on one thread's operations, no CPU
  speed-ups), `<net>-train` stage 02's default on this machine (`train.precision: auto`,
  fast path, CPU speed-ups), `-noaccel` the same without the CPU speed-ups, `-shards` /
  `-memory` (training) and `-attention` / `-jobs` (SwinIR-S inference) with that one alone,
  `-fp32`/`-bf16`/`-fp16` one precision (bf16/fp16 only where the hardware runs them
  natively), `-p48` the default recipe's 48 -> 192 crops, `-compile` with `train.compile`
  (its warm-up, `warmup_s`, is the compile time), `-loader` with the real sample stream
  (`data.patches.PairedPatches` through the DataLoader), which also times the wait for each
  batch (`loader_s`, its share of the step);
- stage 04 as a user runs it (`python -m pipeline ensemble`, a fresh process) for one scene
  with 2 checkpoints and 8 TTA views.
Weights are random (speed does not depend on them). Every row runs in its own child
process (forked where possible, so torch is imported once), so its peak memory is its own.
bf16/fp16 rows run only where the precision is native (pipeline.infer.precision): emulated,
they are 10-90x slower than fp32 and say nothing about the hardware that has them.

Before and after the rows a cores probe (`cores_probe`) times fp32 matrix products on one core
alone and on every core at once: on a shared (virtualised) machine its share falls while other
work takes the cores, so a run says whether its figures were disturbed.
Writes `bench/results.csv` and `bench/results.md` (the table, the machine, the probe, the
command); docs/benchmarks.md keeps the latest full run. `--quick` is a smoke run on tiny inputs.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from pipeline import accel
from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path
from pipeline.core.locks import locked
from pipeline.infer.precision import hardware, native

SCENE_LR = (300, 375)          # the competition's low-res scene (rows, columns)
QUICK_LR = (40, 48)
TILE, OVERLAP = 160, 16        # LR pixels, tiled rows: 2 x 3 tiles cover 300x375 (1.37x its pixels)
QUICK_TILE, QUICK_OVERLAP = 24, 4
TRAIN_PATCH = 32
PROBE_SIZE, PROBE_SECONDS = 512, 0.3   # the cores probe: fp32 (512 x 512) products, 0.3 s a measure
QUICK_BATCH = 2
CONFIGS = {"swinir_s": "swinir_s", "rlfn": "aerial", "rfdn": "aerial_rfdn", "hat_s": "hat_s"}   # a row's recipe
COLUMNS = ["row", "net", "path", "precision", "shards", "mode", "input", "tile", "tta", "batch", "repeats",
           "median_s", "min_s", "max_s", "mpix_per_s", "peak_rss_mb", "peak_gpu_mb", "baseline",
           "ratio", "loader_s", "loader_share", "warmup_s", "status", "load_1min"]


@dataclass(frozen=True)
class Row:
    name: str
    kind: str                   # infer | train | ensemble
    net: str
    path: str = "fast"          # fast | reference
    precision: str = "fp32"
    mode: str = "whole"         # whole | tiled | tta8 | tta8-tiled | ready | loader | compile | ensemble
    baseline: str = ""          # the row this one is compared with (ratio = its time / ours)
    repeats: int | None = None  # overrides --repeats (long rows)
    args: dict = field(default_factory=dict)   # inference: tile (bool), batch


NO_ACCEL: frozenset[str] = frozenset()


def _rows() -> list[Row]:
    rows = []
    for net in ("swinir_s", "rlfn"):
        rows += [
            Row(f"{net}-ref-fp32", "infer", net, "reference", args={"accel": NO_ACCEL}),
            Row(f"{net}-fast-fp32", "infer", net, baseline=f"{net}-ref-fp32"),
            Row(f"{net}-fast-fp32-noaccel", "infer", net, baseline=f"{net}-ref-fp32", args={"accel": NO_ACCEL}),
            Row(f"{net}-ref-bf16", "infer", net, "reference", "bf16", baseline=f"{net}-ref-fp32",
                args={"accel": NO_ACCEL}),
            Row(f"{net}-fast-bf16", "infer", net, precision="bf16", baseline=f"{net}-ref-fp32"),
            Row(f"{net}-fast-fp32-tiled", "infer", net, mode="tiled", baseline=f"{net}-fast-fp32"),
            Row(f"{net}-fast-fp32-tta8", "infer", net, mode="tta8", baseline=f"{net}-fast-fp32",
                args={"tile": False, "batch": 2}),
            Row(f"{net}-fast-fp32-tta8-tiled", "infer", net, mode="tta8-tiled", baseline=f"{net}-fast-fp32-tta8",
                args={"tile": True, "batch": 8}),
        ]
    for net in ("rlfn", "rfdn", "swinir_s"):
        ref = f"{net}-train-ref"
        rows += [Row(ref, "train", net, "reference", "fp32", "ready", args={"accel": NO_ACCEL}),
                 Row(f"{net}-train", "train", net, precision="auto", mode="ready", baseline=ref),
                 Row(f"{net}-train-noaccel", "train", net, precision="auto", mode="ready", baseline=ref,
                     args={"accel": NO_ACCEL})]
        if net != "rfdn":
            rows += [Row(f"{net}-train-{p}", "train", net, precision=p, mode="ready", baseline=ref)
                     for p in ("fp32", "bf16", "fp16")]
        rows += [Row(f"{net}-train-loader", "train", net, precision="auto", mode="loader", baseline=f"{net}-train")]
    # what each CPU speed-up buys alone: training (shards, memory) and SwinIR inference (attention, jobs)
    rows += [Row(f"rlfn-train-{part}", "train", "rlfn", precision="auto", mode="ready", baseline="rlfn-train-noaccel",
                 args={"accel": frozenset({part})}) for part in ("shards", "memory")]
    rows += [Row(f"swinir_s-fast-fp32-{part}", "infer", "swinir_s", baseline="swinir_s-fast-fp32-noaccel",
                 args={"accel": frozenset({part})}) for part in ("attention", "jobs")]
    # the default recipe's 48 -> 192 crops
    rows += [Row("rlfn-train-p48", "train", "rlfn", precision="auto", mode="ready", args={"patch": 48}),
             Row("rlfn-train-p48-noaccel", "train", "rlfn", precision="auto", mode="ready",
                 baseline="rlfn-train-p48", args={"patch": 48, "accel": NO_ACCEL})]
    rows += [Row("rlfn-train-compile", "train", "rlfn", precision="auto", mode="compile",
                 baseline="rlfn-train")]
    rows += [Row("ensemble-rlfn", "ensemble", "rlfn", mode="ensemble"),
             Row("ensemble-swinir_s", "ensemble", "swinir_s", mode="ensemble", repeats=1)]
    # HAT-S: ~10x SwinIR-S's work per pixel, so one timed run per row; training on the recipe's
    # 64 -> 256 crops (batch 2 here, 8 in hat_s.yaml)
    hat_crops = {"batch": 2, "patch": 64}
    rows += [Row("hat_s-ref-fp32", "infer", "hat_s", "reference", repeats=1, args={"accel": NO_ACCEL}),
             Row("hat_s-fast-fp32", "infer", "hat_s", baseline="hat_s-ref-fp32", repeats=1),
             Row("hat_s-fast-fp32-noaccel", "infer", "hat_s", baseline="hat_s-ref-fp32", repeats=1,
                 args={"accel": NO_ACCEL}),
             Row("hat_s-fast-bf16", "infer", "hat_s", precision="bf16", baseline="hat_s-fast-fp32", repeats=1),
             Row("hat_s-fast-fp32-tiled", "infer", "hat_s", mode="tiled", baseline="hat_s-fast-fp32", repeats=1),
             Row("hat_s-train-ref", "train", "hat_s", "reference", "fp32", "ready", repeats=1,
                 args={**hat_crops, "accel": NO_ACCEL})]
    rows += [Row(f"hat_s-train{suffix}", "train", "hat_s", precision=p, mode="ready", repeats=1,
                 baseline="hat_s-train-ref", args=hat_crops) for suffix, p in (("", "auto"), ("-fp32", "fp32"))]
    return rows


ROWS = {r.name: r for r in _rows()}


@dataclass
class Setup:
    """A row ready to run: `warmup()` once, then `run()` is timed; `meta` describes it;
    `loader_waits`, on loader rows, collects each run's wait for its batch."""
    warmup: Callable[[], Any]
    run: Callable[[], Any]
    meta: dict
    loader_waits: list[float] | None = None


# --- measuring -------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _scene(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _setup_infer(row: Row, quick: bool, device: torch.device, stack: ExitStack) -> Setup:
    from pipeline.infer.ensemble import predict_scene
    from pipeline.nets import build_net

    torch.manual_seed(0)
    net = build_net(row.net)
    lr = _scene(QUICK_LR if quick else SCENE_LR)
    tile, overlap = (QUICK_TILE, QUICK_OVERLAP) if quick else (TILE, OVERLAP)
    tiled = row.args.get("tile", row.mode == "tiled")
    settings = {"tta": 8 if row.mode.startswith("tta8") else 1, "tile": tile if tiled else 0,
                "overlap": overlap, "batch": row.args.get("batch", 8), "device": device,
                "precision": row.precision, "fast": row.path == "fast"}
    return Setup(warmup=lambda: predict_scene([net], lr[:24, :24], **settings),   # kernels, caches
                 run=lambda: predict_scene([net], lr, **settings),
                 meta={"out_mpix": lr.shape[0] * lr.shape[1] * net.scale ** 2 / 1e6,
                       "input": f"{lr.shape[0]}x{lr.shape[1]}", "tile": settings["tile"],
                       "tta": settings["tta"], "batch": settings["batch"]})


def _setup_train(row: Row, quick: bool, device: torch.device, stack: ExitStack) -> Setup:
    """Stage 02's step for one experiment (random init), the recipe's batch of 32 -> 128 crops."""
    from pipeline.core.config import load_config
    from pipeline.data import patches as data
    from pipeline.train.recipe import build_model, optimisation, training_net
    from pipeline.train.resume import seed_everything
    from pipeline.train.step import Gradients, TrainStep

    cfg = load_config(CONFIGS[row.net])
    t = cfg["train"]
    if quick:
        t["batch_size"] = QUICK_BATCH
    elif "batch" in row.args:      # a row's own batch (HAT-S: 2 here, the recipe's 8 on a GPU)
        t["batch_size"] = row.args["batch"]
    t.update(lr_patch=TRAIN_PATCH if quick else row.args.get("patch", TRAIN_PATCH),
             precision=row.precision, fast=row.path == "fast", compile=row.mode == "compile",
             cpu_shards=t["cpu_shards"] if row.path == "fast" else 1)
    seed_everything(0)
    net = build_model(cfg, pretrained=False, main=True).to(device).train()
    forward_net = training_net(net, t)
    optimizer, scheduler, loss_fn, prec, scaler, ema = optimisation(net, cfg, device)
    gradients, _ = accel.training_gradients(Gradients(forward_net, loss_fn, prec.dtype, device), net,
                                            t["cpu_shards"], t["batch_size"], compiled=t["compile"])
    stack.enter_context(gradients)
    step = TrainStep(net, gradients, optimizer, scheduler, scaler, ema, t["grad_clip"])
    scale = cfg["data"]["scale"]
    lr_shape = QUICK_LR if quick else SCENE_LR
    scenes = [data.Scene(str(i), _scene(lr_shape, i), _scene((lr_shape[0] * scale, lr_shape[1] * scale), 100 + i))
              for i in range(4)]
    stream = data.PairedPatches(scenes, scale=scale, lr_patch=t["lr_patch"], batch_size=t["batch_size"],
                                steps=10_000, augment=t["augment"], seed=0, fold=0)

    def train_step(lr_u8: torch.Tensor, hr_u8: torch.Tensor) -> None:
        step(data.to_float(lr_u8, device), data.to_float(hr_u8, device))

    waits: list[float] = []   # loader row: seconds spent waiting for each batch

    if row.mode != "loader":
        batch = stream[0]
        run = lambda: train_step(*batch)                  # noqa: E731
    else:   # the real stream: crops + augmentation through the DataLoader, as stage 02 reads it
        batches = iter(data.batches(stream, 0, t["num_workers"]))

        def run() -> None:
            start = time.perf_counter()
            lr_u8, hr_u8 = next(batches)
            waits.append(time.perf_counter() - start)
            train_step(lr_u8, hr_u8)
    side = t["lr_patch"] * scale
    return Setup(warmup=run, run=run,   # warm-up: optimizer state, kernels
                 meta={"out_mpix": t["batch_size"] * side * side / 1e6,
                       "precision": prec.name, "shards": getattr(gradients, "shards", 1),
                       "input": f"{t['batch_size']}x{t['lr_patch']}x{t['lr_patch']}", "batch": t["batch_size"]},
                 loader_waits=waits if row.mode == "loader" else None)


def _setup_ensemble(row: Row, quick: bool, device: torch.device, stack: ExitStack) -> Setup:
    """Stage 04 as a user runs it (`python -m pipeline ensemble`, a fresh process) in a temporary
    work folder: one test scene, 2 checkpoints (folds 0, 1), 8 views."""
    from pipeline.core.checkpoints import save_checkpoint
    from pipeline.core.config import load_config
    from pipeline.data.competition import tif_bytes, zip_bytes
    from pipeline.nets import build_net

    lr_shape = QUICK_LR if quick else SCENE_LR
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sr-bench-")))
    exp_file = tmp / "bench.yaml"
    exp_file.write_text(f"model: {{name: {row.net}}}\ninfer: {{tta: 8, precision: {row.precision}}}\n")
    cfg = load_config(exp_file)
    d, scale = cfg["data"], cfg["data"]["scale"]
    (tmp / "data" / "raw").mkdir(parents=True)
    low = _scene(lr_shape)
    high = _scene((lr_shape[0] * scale, lr_shape[1] * scale), 1)
    (tmp / "data" / "raw" / "train.zip").write_bytes(zip_bytes([(d["train_low"].format(i=0), tif_bytes(low)),
                                                                 (d["train_high"].format(i=0), tif_bytes(high))]))
    (tmp / "data" / "raw" / "evaluation.zip").write_bytes(zip_bytes([(d["test_low"].format(i=0), tif_bytes(low))]))
    env = {**os.environ, "SR_WORKDIR": str(tmp), "TQDM_DISABLE": "1"}
    if torch.get_num_threads() != os.cpu_count():
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    command = [sys.executable, "-m", "pipeline"]
    subprocess.run([*command, "unzip", "--exp", str(exp_file)], env=env, check=True, capture_output=True)
    for fold in (0, 1):
        torch.manual_seed(fold)
        net = build_net(row.net)
        save_checkpoint(tmp / "models" / cfg["exp"] / "seed0" / f"fold{fold}" / "best.pt", net_name=row.net,
                        net_args={}, state_dict=net.state_dict(), exp=cfg["exp"], seed=0, fold=fold, step=0,
                        val_ssim=None)

    def run() -> None:
        done = subprocess.run([*command, "ensemble", "--exp", str(exp_file)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "ensemble failed")

    # no warm-up: every `make ensemble` is a fresh process that pays its first-call costs
    return Setup(warmup=lambda: None, run=run,
                 meta={"out_mpix": lr_shape[0] * lr_shape[1] * scale ** 2 / 1e6,
                       "input": f"{lr_shape[0]}x{lr_shape[1]}", "tile": cfg["infer"]["tile"], "tta": 8,
                       "batch": cfg["infer"]["batch"], "in_subprocess": True})


SETUPS = {"infer": _setup_infer, "train": _setup_train, "ensemble": _setup_ensemble}


def _profile(fn: Callable[[], Any], device: torch.device) -> str:
    """Top operators of one run, by self time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)


def _use_accel(row: Row) -> None:
    """The row's CPU speed-ups in this process (default: all of them), for its setup and runs."""
    chosen = row.args.get("accel", frozenset(accel.PARTS))
    os.environ[accel.SWITCH] = ",".join(sorted(chosen)) or "0"     # shards: read when a step is set up
    accel.enable(chosen)                                           # memory, attention, jobs


def peak_rss_mb(children: bool = False) -> float | None:
    """Peak resident memory (MB) of this process, or of its finished child processes; None where
    the OS does not tell."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10   # bytes on macOS, KiB on Linux


def _worker(rows: list[Row], quick: bool, repeats: int, device: str, threads: int | None, profile: bool,
            conn) -> None:
    """Child process: set up the rows, warm each up, time `repeats` runs of each (several rows:
    one run of each in turn, so a change of the machine's load hits them alike), profile one
    more on request; send back one result (figures or the error) per row."""
    try:
        import warnings
        warnings.simplefilter("ignore")                   # e.g. the emulated-bf16 warning
        os.environ["TQDM_DISABLE"] = "1"                  # the stages' progress bars
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")    # the profiler's start/stop chatter
        if threads:
            torch.set_num_threads(threads)
        dev = torch.device(device)
        with ExitStack() as stack:
            setups, results = [], []
            for row in rows:
                _use_accel(row)
                setup = SETUPS[row.kind](row, quick, dev, stack)
                began = time.perf_counter()
                setup.warmup()
                results.append(dict(setup.meta, warmup_s=time.perf_counter() - began, times=[]))
                if setup.loader_waits is not None:
                    setup.loader_waits.clear()            # the warm-up's batch
                setups.append(setup)
            for _ in range(repeats):
                for row, setup, result in zip(rows, setups, results):
                    _use_accel(row)
                    result["times"] += _timed(setup.run, 1, dev)
            for row, setup, result in zip(rows, setups, results):
                if setup.loader_waits:
                    result["loader_s"] = statistics.median(setup.loader_waits)
                result["peak_rss_mb"] = peak_rss_mb(children=result.pop("in_subprocess", False))
                if profile:
                    _use_accel(row)
                    result["profile"] = _profile(setup.run, dev)
                if dev.type == "cuda":
                    result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
        conn.send(results)
    except BaseException as exc:  # reported as the row's status; the parent carries on
        conn.send([{"error": f"{type(exc).__name__}: {exc}"}] * len(rows))
    finally:
        conn.close()


def run_rows(rows: list[Row], quick: bool, repeats: int, device: str, threads: int | None,
             profile: bool = False) -> list[dict]:
    """Run rows in one child process (fork on Linux CPU: torch stays imported; else spawn)."""
    method = "fork" if sys.platform == "linux" and device == "cpu" else "spawn"
    ctx = multiprocessing.get_context(method)
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(rows, quick, repeats, device, threads, profile, child))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = [{"error": f"worker died (exit code {proc.join() or proc.exitcode})"}] * len(rows)
    proc.join()
    return result


# --- the table ----------------------------------------------------------------------------

def _skip_reason(row: Row, device: str) -> str | None:
    if row.precision in ("bf16", "fp16") and not native(row.precision, hardware(device)):
        return f"skipped: no native {row.precision} on this device (emulated: 10-90x slower than fp32)"
    return None


def measure(rows: list[Row], quick: bool, repeats: int, device: str, threads: int | None,
            profile: bool = False, progress: Callable[[str], None] = print,
            interleave: bool = False) -> pd.DataFrame:
    """One record per row (skipped rows say why); `profile`: bench/profiles/<row>.txt;
    `interleave`: every row in one process, one run of each in turn (ratios that hold on a
    machine whose load changes; the peak memory is then the whole process's)."""
    records = []
    together = {}
    if interleave:
        runnable = [r for r in rows if not _skip_reason(r, device)]
        n = 1 if quick else repeats
        progress(f"bench: {len(runnable)} rows interleaved ({n} rounds) ...")
        together = dict(zip([r.name for r in runnable], run_rows(runnable, quick, n, device, threads, profile)))
    for row in rows:
        record = {"row": row.name, "net": row.net, "path": row.path, "precision": row.precision,
                  "mode": row.mode, "baseline": row.baseline, "load_1min": _load()}
        skip = _skip_reason(row, device)
        n = 1 if quick else (row.repeats or repeats)
        if skip:
            record["status"] = skip
        else:
            if row.name in together:
                result = together[row.name]
            else:
                progress(f"bench: {row.name} ({n} run{'s' * (n > 1)}) ...")
                result = run_rows([row], quick, n, device, threads, profile)[0]
            if "profile" in result:
                folder = paths.BENCH / "profiles"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{row.name}.txt").write_text(result.pop("profile"))
            if "error" in result:
                record["status"] = f"error: {result['error']}"
            else:
                times = result.pop("times")
                median = statistics.median(times)
                record.update(result, repeats=len(times), median_s=median, min_s=min(times), max_s=max(times),
                              mpix_per_s=result["out_mpix"] / median, status="ok")
                if "loader_s" in result:
                    record["loader_share"] = result["loader_s"] / median
        records.append(record)
    table = pd.DataFrame(records)
    for col in COLUMNS:
        if col not in table:
            table[col] = None
    by_name = dict(zip(table["row"], table["median_s"]))
    table["ratio"] = [by_name.get(b) / m if b and by_name.get(b) and m == m and m else None
                      for b, m in zip(table["baseline"], table["median_s"])]
    return table[COLUMNS]


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in (platform.processor(), platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "simd": " ".join(simd) or "unknown", "cpu_bf16": hardware("cpu").cpu_bf16,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": (f"{torch.cuda.get_device_name(0)} (compute capability "
                    f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))})" if torch.cuda.is_available() else "none"),
            "accel": accel.describe()}
    return info


def cores_probe(cores: int, seconds: float = PROBE_SECONDS) -> dict:
    """GFLOP/s of fp32 matrix products on one core alone, then on `cores` cores at once (one
    thread each; the product releases Python's lock), the slowest of them. On a shared
    (virtualised) machine the second falls while other work takes the cores, which the
    machine's own load average does not show: bench runs it before and after its rows, so a
    run whose figures were disturbed says so."""
    a, b = torch.randn(PROBE_SIZE, PROBE_SIZE), torch.randn(PROBE_SIZE, PROBE_SIZE)
    out = torch.empty(PROBE_SIZE, PROBE_SIZE)

    def rate(_=None) -> float:
        torch.mm(a, b, out=out)                     # warm-up
        done, began = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - began) < seconds:
            torch.mm(a, b, out=out)
            done += 1
        return done * 2 * PROBE_SIZE ** 3 / elapsed / 1e9

    with ThreadPoolExecutor(cores, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        alone = pool.submit(rate).result()
        together = min(pool.map(rate, range(cores)))
    return {"cores": cores, "alone": alone, "together": together, "share": together / alone}


def probe_text(before: dict, after: dict) -> str:
    return (f"Cores probe (fp32 {PROBE_SIZE}^3 products, one thread a core): one core alone "
            f"{before['alone']:.0f} GFLOP/s, {before['cores']} at once {before['together']:.0f} at the slowest "
            f"(x{before['share']:.2f}) before the rows; {after['alone']:.0f} and {after['together']:.0f} "
            f"(x{after['share']:.2f}) after. A share lower than this machine's usual means other work "
            "took the cores during the run.")


def _fmt(value, spec: str) -> str:
    return "" if value is None or value != value else format(value, spec)


def markdown(table: pd.DataFrame, info: dict, command: str, seconds: float, probe: str = "") -> str:
    lines = [f"Command: `{command}` ({seconds / 60:.1f} min)", "",
             f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
             f"flags {info['simd']} (torch kernels {info['torch_cpu_capability']}), native bf16 on CPU: "
             f"{info['cpu_bf16']}, GPU: {info['gpu']}; torch {info['torch']}, Python {info['python']}", "",
             f"{info['accel']} (the `-noaccel` and `-ref` rows: none)", "",
             *([probe, ""] if probe else []),
             "| row | precision | shards | input | tile | TTA | median s | min-max s | out MP/s | peak RSS MB "
             "| vs baseline | 1-min load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        if r.status != "ok":
            lines.append(f"| {r.row} | | | | | | {r.status} | | | | | {_fmt(r.load_1min, '.1f')} |")
            continue
        versus = _versus(r)
        lines.append(f"| {r.row} | {r.precision} | {_fmt(r.shards, 'g')} | {r.input} | {_fmt(r.tile, 'g')} | "
                     f"{_fmt(r.tta, 'g')} | {r.median_s:.3f} | "
                     f"{r.min_s:.3f}-{r.max_s:.3f} | {r.mpix_per_s:.3f} | {_fmt(r.peak_rss_mb, '.0f')} | "
                     f"{versus} | {_fmt(r.load_1min, '.1f')} |")
    return "\n".join(lines) + "\n"


def _versus(r) -> str:
    """The ratio to the baseline row, and for a loader row the loader's own share of a step."""
    parts = [f"x{r.ratio:.2f} vs {r.baseline}"] if r.ratio == r.ratio and r.ratio else []
    if r.mode == "compile" and r.warmup_s == r.warmup_s:
        parts.append(f"compile (warm-up) {r.warmup_s:.0f} s")
    if r.loader_s == r.loader_s and r.loader_s is not None:
        parts.append(f"waits for the loader {r.loader_s * 1e3:.1f} ms ({r.loader_share:.1%} of the step)")
    return "; ".join(parts)


def print_table(table: pd.DataFrame) -> None:
    print(f"{'row':30} {'prec':>5} {'shards':>6} {'median s':>9} {'out MP/s':>9} {'peak MB':>8}  vs baseline")
    for r in table.itertuples():
        if r.status != "ok":
            print(f"{r.row:30} {r.status}")
            continue
        versus = _versus(r)
        print(f"{r.row:30} {r.precision:>5} {_fmt(r.shards, '6g'):>6} {r.median_s:9.3f} {r.mpix_per_s:9.3f} "
              f"{_fmt(r.peak_rss_mb, '8.0f')}  {versus}")


# --- command line ----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", default="",
                        help="comma-separated row names or prefixes (default: all): " + ", ".join(ROWS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row, median reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny inputs, one run per row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--interleave", action="store_true",
                        help="all rows in one process, one run of each in turn: ratios that hold when the "
                             "machine's load changes (peak memory is then the process's)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one run per row: top operators in bench/profiles/<row>.txt")


def select_rows(spec: str) -> list[Row]:
    if not spec:
        return list(ROWS.values())
    chosen = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        hits = [r for r in ROWS.values() if r.name == part] or [r for r in ROWS.values() if r.name.startswith(part)]
        if not hits:
            raise PipelineError(f"bench: no row '{part}' (rows: {', '.join(ROWS)})")
        chosen += [r for r in hits if r not in chosen]
    return chosen


def main(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise PipelineError(f"bench: --repeats must be >= 1, got {args.repeats}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("bench: --device cuda asked but no CUDA device is available")
    rows = select_rows(args.rows)
    began = time.perf_counter()
    with locked(paths.BENCH / "results.csv", what=f"{paths.BENCH} (benchmark results)"):
        cores, probe_s = args.threads or torch.get_num_threads(), PROBE_SECONDS / 5 if args.quick else PROBE_SECONDS
        before = cores_probe(cores, probe_s)
        table = measure(rows, args.quick, args.repeats, args.device, args.threads, args.profile,
                        interleave=args.interleave)
        probe = probe_text(before, cores_probe(cores, probe_s))
        seconds = time.perf_counter() - began
        command = "python -m pipeline bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
        paths.BENCH.mkdir(parents=True, exist_ok=True)
        with atomic_path(paths.BENCH / "results.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.6g")
        with atomic_path(paths.BENCH / "results.md") as tmp:
            tmp.write_text(markdown(table, machine(), command.strip(), seconds, probe))
    print_table(table)
    print(probe)
    ok = int((table["status"] == "ok").sum())
    print(f"bench: {ok} of {len(table)} rows measured in {seconds / 60:.1f} min -> {paths.BENCH / 'results.csv'}")
    return 0 if not table["status"].str.startswith("error").any() else 1
