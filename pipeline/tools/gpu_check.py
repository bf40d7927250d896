"""`python -m pipeline gpu-check` (`make gpu-check`): prove a GPU machine in a few minutes.

For RLFN, SwinIR-S and HAT-S (random init) and every precision the device runs natively
(bf16, fp16 with the gradient scaler, fp32):
1. training: `STEPS` steps of the pipeline's own training step from one init on fixed crops,
   against the same steps on the CPU in fp32: every step's loss within `TOLERANCE` of the
   reference's (relative); the throughput in crops/s and the peak memory;
2. inference: one scene through `predict_scene`: megapixels/s, peak memory.
Then, on the device's default precision:
3. kill and resume: stage 02 of a tiny demo competition killed after its first checkpoint and
   resumed ends with the weights of a run that never stopped (bit for bit on the CPU; on a GPU
   within `RESUME_TOLERANCE`: its convolution kernels may sum in another order);
4. distributed: a one-process torchrun with the device's backend (nccl on CUDA, gloo on the
   CPU) runs a DDP step;
5. stages 03-04 of that demo on the device against the same on the CPU: mean competition SSIM
   within 1e-3.
Prints the table and writes it to bench/gpu-check.md. `--device cpu --quick` runs the same
on the CPU in about a minute (small crops, few steps): a test of `make test`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core import paths
from pipeline.core.device import pick_device
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path
from pipeline.infer.ensemble import predict_scene
from pipeline.infer.precision import hardware, native
from pipeline.nets import build_net

NETS = {"rlfn": "aerial", "swinir_s": "swinir_s", "hat_s": "hat_s"}     # net -> the recipe it trains with
STEPS, QUICK_STEPS = 20, 3
TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2, "fp16": 3e-2}   # |loss - CPU fp32 loss| / CPU fp32 loss, every step
RESUME_TOLERANCE = 1e-5                                   # max |weight difference|, GPU
SSIM_TOLERANCE = 1e-3


def _crops(cfg: dict, quick: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed crops: smooth random images (upsampled noise) so SSIM has structure to learn."""
    t, scale = cfg["train"], cfg["data"]["scale"]
    batch, side = (2, 16) if quick else (min(t["batch_size"], 8), t["lr_patch"])
    g = torch.Generator().manual_seed(seed)
    hr = torch.nn.functional.interpolate(torch.rand(batch, 3, side, side, generator=g), scale_factor=scale,
                                         mode="bilinear", align_corners=False).clamp(0, 1)
    lr = torch.nn.functional.avg_pool2d(hr, scale)
    return lr, hr


def _train_losses(net_name: str, device: torch.device, precision: str, quick: bool) -> tuple[list[float], float, float]:
    """(every step's loss, crops per second, peak memory MB) of training `net_name` from one init."""
    from pipeline.core.config import load_config
    from pipeline.train.recipe import build_model, optimisation, training_net
    from pipeline.train.resume import seed_everything
    from pipeline.train.step import Gradients, TrainStep

    cfg = load_config(NETS[net_name])
    t = cfg["train"]
    t.update(precision=precision, steps=QUICK_STEPS if quick else STEPS)
    seed_everything(0)
    net = build_model(cfg, pretrained=False, main=False).to(device).train()
    model = training_net(net, t)
    optimizer, scheduler, loss_fn, prec, scaler, ema = optimisation(net, cfg, device)
    step = TrainStep(net, Gradients(model, loss_fn, prec.dtype, device), optimizer, scheduler, scaler, ema,
                     t["grad_clip"])
    lr, hr = (x.to(device) for x in _crops(cfg, quick))
    _reset_peak(device)
    out, began = [], time.perf_counter()
    for _ in range(t["steps"]):
        out.append(step(lr, hr).loss)
    _sync(device)
    seconds = time.perf_counter() - began
    return out, len(out) * lr.shape[0] / seconds, _peak_mb(device)


def _infer(net_name: str, device: torch.device, precision: str, quick: bool) -> tuple[float, float]:
    """(output megapixels per second, peak memory MB) of one scene through predict_scene."""
    torch.manual_seed(0)
    net = build_net(net_name)
    h, w = (24, 32) if quick else (300, 375) if net_name != "hat_s" else (96, 128)
    lr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    predict_scene([net], lr[:16, :16], device=device, precision=precision)       # warm-up: kernels, caches
    _reset_peak(device)
    began = time.perf_counter()
    predict_scene([net], lr, device=device, precision=precision)
    _sync(device)
    return h * w * net.scale ** 2 / 1e6 / (time.perf_counter() - began), _peak_mb(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10


# --- end to end on a tiny demo competition -------------------------------------------------------

def _run(workdir: Path, *args: str, check: bool = True, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "SR_WORKDIR": str(workdir), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "pipeline", *args]
    if popen:
        return subprocess.Popen(command, env=env, cwd=paths.ROOT, **popen)
    done = subprocess.run(command, env=env, cwd=paths.ROOT, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise PipelineError(f"gpu-check: `{' '.join(args)}` failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done


def _demo(workdir: Path, device: str, quick: bool) -> Path:
    """A tiny demo competition and its experiment config (RLFN from random init, 2 folds)."""
    steps, patch = (4, 8) if quick else (20, 16)
    exp = workdir / "check.yaml"
    exp.write_text(f"device: {device}\ndata: {{n_folds: 2}}\nmodel: {{name: rlfn}}\n"
                   f"train: {{steps: {steps}, batch_size: 4, lr_patch: {patch}, val_every: {steps // 2}, "
                   f"ckpt_every: {steps // 2}, num_workers: 0}}\ninfer: {{tta: {2 if quick else 8}}}\n")
    _run(workdir, "demo-data", "--exp", str(exp), "--tile", "48" if quick else "96")
    _run(workdir, "unzip", "--exp", str(exp))
    _run(workdir, "folds", "--exp", str(exp))
    return exp


def _kill_and_resume(exp: Path, workdir: Path, device: torch.device) -> tuple[bool, str]:
    """(equal, what happened) of stage 02 killed after its first checkpoint and resumed, against
    a run that never stopped."""
    from pipeline.core.checkpoints import read_checkpoint

    _run(workdir, "train", "--exp", str(exp), "--fold", "0")
    straight = read_checkpoint(workdir / "models" / "check" / "seed0" / "fold0" / "last.pt")["train_state"]["net"]
    killed = workdir / "killed"
    for sub in ("data",):
        (killed / sub).mkdir(parents=True, exist_ok=True)
    for name in ("raw", "interim", "folds.csv", "demo"):
        target = killed / "data" / name
        if not target.exists():
            target.symlink_to(workdir / "data" / name)
    last = killed / "models" / "check" / "seed0" / "fold0" / "last.pt"
    proc = _run(killed, "train", "--exp", str(exp), "--fold", "0", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = read_checkpoint(last) if last.exists() else None
    killed_at = state["step"] if state is not None else None
    _run(killed, "train", "--exp", str(exp), "--fold", "0")
    resumed = read_checkpoint(last)["train_state"]["net"]
    diff = max(float((resumed[k].float() - straight[k].float()).abs().max()) for k in straight)
    steps = read_checkpoint(last)["step"]
    equal = diff == 0.0 if device.type == "cpu" else diff <= RESUME_TOLERANCE
    return (equal and killed_at is not None and killed_at < steps,
            f"killed at step {killed_at} of {steps}; largest weight difference {diff:.2e}")


DDP_PROBE = """
import os, torch, torch.distributed as dist
device = torch.device(os.environ["CHECK_DEVICE"])
if device.type == "cuda":
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
net = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv2d(3, 3, 3, padding=1).to(device))
net(torch.rand(2, 3, 8, 8, device=device)).mean().backward()
value = torch.ones(1, device=device)
dist.all_reduce(value)
print(dist.get_backend(), int(value.item()), flush=True)
dist.destroy_process_group()
"""


def _torchrun(device: torch.device) -> tuple[bool, str]:
    """(passed, backend) of a one-process torchrun's DDP step and all-reduce."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(DDP_PROBE)
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                               script.name], env={**os.environ, "CHECK_DEVICE": str(device)},
                              capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(script.name)
    words = done.stdout.split()
    return done.returncode == 0 and words[-1:] == ["1"], words[-2] if len(words) >= 2 else done.stderr.strip()[-200:]


def _stages_on(exp: Path, workdir: Path, device: torch.device) -> float:
    """|mean SSIM of stage 04 on the device - on the CPU| (stage 03 run on both too)."""
    from pipeline.data.scoring import score_submission

    scores = {}
    for where in (str(device), "cpu"):
        _run(workdir, "oof", "--exp", str(exp), "--set", f"device={where}")
        _run(workdir, "ensemble", "--exp", str(exp), "--set", f"device={where}")
        pred = workdir / "data" / "predictions" / "check"
        scores[where] = score_submission(pred, workdir / "data" / "demo" / "answers", jobs=1)["ssim"].mean()
        if where == "cpu" and str(device) == "cpu":
            scores["cpu"] = scores[where]
            break
    return abs(scores[str(device)] - scores["cpu"])


# --- the check --------------------------------------------------------------------------------------

def run_check(device: torch.device, quick: bool) -> tuple[list[dict], list[dict]]:
    """(the per net and precision table, the end-to-end checks)."""
    precisions = [p for p in ("bf16", "fp16", "fp32") if native(p, hardware(device))]
    rows = []
    for name in NETS:
        reference = _train_losses(name, torch.device("cpu"), "fp32", quick)
        for precision in precisions:
            same = device.type == "cpu" and precision == "fp32"          # the reference itself
            losses_, crops, train_mb = reference if same else _train_losses(name, device, precision, quick)
            error = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses_, reference[0]))
            mpix, infer_mb = _infer(name, device, precision, quick)
            rows.append({"net": name, "precision": precision, "steps": len(losses_),
                         "loss_error": error, "passed": bool(error <= TOLERANCE[precision]), "train_crops_s": crops,
                         "train_peak_mb": train_mb, "infer_mpix_s": mpix, "infer_peak_mb": infer_mb})
            print(f"gpu-check: {name} {precision}: loss within {error:.2e} of the CPU fp32 reference "
                  f"({'ok' if rows[-1]['passed'] else 'FAILED'}), {crops:.1f} crops/s, {mpix:.2f} MP/s", flush=True)
    checks = []
    with tempfile.TemporaryDirectory(prefix="sr-gpu-check-") as tmp:
        workdir = Path(tmp)
        exp = _demo(workdir, str(device), quick)
        equal, detail = _kill_and_resume(exp, workdir, device)
        checks.append({"check": "stage 02 killed after a checkpoint and resumed = never stopped",
                       "passed": bool(equal), "detail": detail})
        ok, backend = _torchrun(device)
        checks.append({"check": "one-process torchrun: DDP step and all-reduce", "passed": bool(ok), "detail": backend})
        gap = _stages_on(exp, workdir, device)
        checks.append({"check": f"stages 03-04 on {device} against the CPU: mean SSIM", "passed": bool(gap <= SSIM_TOLERANCE),
                       "detail": f"difference {gap:.2e} (bound {SSIM_TOLERANCE:g})"})
    return rows, checks


def report(device: torch.device, rows: list[dict], checks: list[dict], seconds: float) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# gpu-check on {name} ({device}), torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
             f"{seconds / 60:.1f} min", "",
             "| net | precision | steps | max loss error vs CPU fp32 | train crops/s | train peak MB | "
             "inference MP/s | inference peak MB | passed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['net']} | {r['precision']} | {r['steps']} | {r['loss_error']:.2e} "
                     f"(bound {TOLERANCE[r['precision']]:g}) | {r['train_crops_s']:.1f} | {r['train_peak_mb']:.0f} | "
                     f"{r['infer_mpix_s']:.2f} | {r['infer_peak_mb']:.0f} | {'yes' if r['passed'] else 'NO'} |")
    lines += ["", "| end-to-end check | passed | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'yes' if c['passed'] else 'NO'} | {c['detail']} |" for c in checks]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small crops and few steps (a minute on a CPU)")
    parser.add_argument("--out", type=Path, default=None, help="the table's markdown (default bench/gpu-check.md)")


def main(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    began = time.time()
    rows, checks = run_check(device, args.quick)
    text = report(device, rows, checks, time.time() - began)
    out = args.out or paths.BENCH / "gpu-check.md"
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"rows": rows, "checks": checks}, indent=2))
    print(text, end="")
    failed = [r for r in rows if not r["passed"]] + [c for c in checks if not c["passed"]]
    print(f"gpu-check: {'all passed' if not failed else f'{len(failed)} FAILED'} -> {out}")
    return 1 if failed else 0
