"""The GPU user's path, tested without a GPU: fake GPUs (nvidia-smi and torch.cuda answers
monkeypatched) and CPU stand-ins for what only runs on CUDA.

The device is never the CPU by accident; precision on cards without bf16; a resume on fewer
GPUs; TF32 off where the score is computed and on in training; the CUDA training branch of
the window transformers (the fused attention with a learnt, gradient-carrying bias, heads
padded to a multiple of 8); scenes tiled automatically when they would not fit in memory.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline.core import device as device_module
from pipeline.core.config import load_config
from pipeline.core.device import ListedGpu, pick_device
from pipeline.core.errors import PipelineError
from pipeline.infer import memory
from pipeline.infer.ensemble import predict_scene
from pipeline.infer.precision import Hardware, choose
from pipeline.nets import build_net
from pipeline.nets.fast import swinir as swinir_fast
from pipeline.nets.fast import windows
from pipeline.train import losses, resume
from pipeline.train.distributed import Dist
from pipeline.train.step import Gradients, TrainStep
from pipeline.train.validate import validate

P100 = ListedGpu(0, "Tesla P100-PCIE-16GB", (6, 0), "535.104.05")
CUDA13_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


@pytest.fixture
def fake_gpu(monkeypatch):
    """nvidia-smi lists a P100; torch is a CUDA 13 build (sm_75..sm_120). Returns a setter for
    whether torch.cuda is available (a driver older than the build needs: not)."""
    device_module.listed_gpus.cache_clear()
    monkeypatch.setattr(device_module, "listed_gpus", lambda: (P100,))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(CUDA13_ARCHS))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def available(value: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: value)
    available(True)
    return available


# --- never a silent CPU run ------------------------------------------------------------------------

def test_a_gpu_torch_cannot_run_stops_auto_with_the_fix(fake_gpu):
    """A P100 (sm_60) with a CUDA 13 build: auto stops with one line naming the card, its
    capability, torch's CUDA version and arch list, and the fix."""
    with pytest.raises(PipelineError) as refused:
        pick_device("auto")
    message = str(refused.value)
    for part in ("Tesla P100-PCIE-16GB", "compute capability 6.0", "sm_60", "CUDA 13.0",
                 " ".join(CUDA13_ARCHS), "make setup TORCH_INDEX=https://download.pytorch.org/whl/cu118",
                 "make setup TORCH=system", "device: cpu"):
        assert part in message, part
    assert "\n" not in message
    with pytest.raises(PipelineError, match="sm_60"):
        pick_device("cuda")
    assert pick_device("cpu").type == "cpu"                    # on purpose: allowed


def test_a_driver_older_than_torchs_cuda_stops_auto(fake_gpu):
    fake_gpu(False)                                            # torch.cuda.is_available() is False
    with pytest.raises(PipelineError, match=r"nvidia-smi lists Tesla P100-PCIE-16GB \(GPU 0, compute "
                                            r"capability 6.0, driver 535.104.05\) but torch .* \(CUDA 13.0\) "
                                            r"cannot use it: the driver is older than CUDA 13.0 needs"):
        pick_device("auto")


def test_a_gpu_torch_can_run_is_taken(fake_gpu, monkeypatch):
    monkeypatch.setattr(device_module, "listed_gpus", lambda: (ListedGpu(0, "Tesla T4", (7, 5), "550.54"),))
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(PipelineError, match=r"device cuda:1: torch sees 1 GPU\(s\)"):
        pick_device("cuda:1")
    # PTX of a lower capability runs on a newer card: compute_70 serves sm_75
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_60", "compute_70"])
    assert device_module.gpu_problem() is None


def test_no_gpu_means_the_cpu_and_asking_for_one_says_so(monkeypatch):
    device_module.listed_gpus.cache_clear()
    monkeypatch.setattr(device_module, "listed_gpus", lambda: ())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == pick_device(None) == torch.device("cpu")
    with pytest.raises(PipelineError, match="device cuda: no GPU that torch can use on this machine"):
        pick_device("cuda")
    with pytest.raises(PipelineError, match=r"device 'gpu' unknown \(auto, cpu, cuda or cuda:N\)"):
        pick_device("gpu")


def test_the_config_carries_the_device_and_a_resume_may_change_it(config_file):
    from pipeline.core.config import RUNTIME_KEYS

    assert load_config(config_file())["device"] == "auto"
    assert load_config(config_file(), ["device=cpu"])["device"] == "cpu"
    assert "device" in RUNTIME_KEYS


# --- precision on cards without bf16 ----------------------------------------------------------------

def test_hat_s_trains_in_fp16_with_a_scaler_on_cards_without_bf16():
    """hat_s.yaml's precision on a T4/P100 is fp16 with the gradient scaler (bf16 there would
    fall back to fp32), on an A100 bf16."""
    asked = load_config("hat_s")["train"]["precision"]
    t4 = choose(asked, "cuda", hw=Hardware("cuda", cuda_capability=(7, 5)))
    assert (t4.name, t4.scaler) == ("fp16", True)
    p100 = choose(asked, "cuda", hw=Hardware("cuda", cuda_capability=(6, 0)))
    assert (p100.name, p100.scaler) == ("fp16", True)
    assert choose(asked, "cuda", hw=Hardware("cuda", cuda_capability=(8, 0))).name == "bf16"


# --- resume on fewer GPUs -------------------------------------------------------------------------------

def test_a_run_resumes_on_fewer_gpus_than_it_was_saved_with(monkeypatch):
    """The CUDA random state is the current device's; a state saved per device (two GPUs then)
    restores on a machine with one, its first entry on device 0."""
    states = {0: torch.tensor([1, 2, 3], dtype=torch.uint8)}
    set_on = []

    def set_state(state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        index = 0 if index is None else index
        if index >= 1:                       # this machine has one GPU
            raise IndexError(f"no GPU {index}")
        set_on.append((index, state.clone()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[0].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    saved = resume.rng_state()
    assert torch.equal(saved["cuda"], states[0])
    resume.set_rng_state(saved)
    two_gpus = {**saved, "cuda": [torch.tensor([7, 7], dtype=torch.uint8), torch.tensor([8, 8], dtype=torch.uint8)]}
    resume.set_rng_state(two_gpus)
    assert [(i, s.tolist()) for i, s in set_on] == [(0, [1, 2, 3]), (0, [7, 7])]


# --- TF32 ----------------------------------------------------------------------------------------------

def _tf32_seen(net: torch.nn.Module) -> list[tuple[bool, bool]]:
    seen = []
    net.register_forward_pre_hook(lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32,
                                                          torch.backends.cudnn.allow_tf32)))
    return seen


def test_tf32_is_off_where_the_score_is_computed_and_on_in_a_training_step():
    torch.manual_seed(0)
    net = build_net("espcn", channels=[8, 8])
    seen = _tf32_seen(net)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    predict_scene([net], np.zeros((12, 12, 3), np.uint8), tta=2)
    assert seen and set(seen) == {(False, False)}
    seen.clear()
    from pipeline.data.patches import Scene
    validate(net, [Scene("a", np.zeros((12, 12, 3), np.uint8), np.zeros((48, 48, 3), np.uint8))], Dist(), 0, 16)
    assert seen and set(seen) == {(False, False)}
    seen.clear()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    step = TrainStep(net, Gradients(net.train(), losses.build_loss({"l1": 1.0}), None, torch.device("cpu")), optimizer,
                     torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), torch.amp.GradScaler("cpu", enabled=False))
    step(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32))
    assert seen == [(True, True)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before   # restored


# --- the CUDA training branch of the window transformers, on the CPU ------------------------------------

def test_the_gpu_training_branch_gives_the_reference_gradients(monkeypatch):
    """On CUDA a training step's window attention is torch's fused kernel with the learnt
    position bias (gradient-carrying) as its mask and SwinIR-S's heads of 10 padded to 16;
    forced here on the CPU (the fused kernel differentiates the mask here too): the reference's
    loss and gradients, the bias tables' included."""
    torch.manual_seed(9)
    ref = build_net("swinir_s", depths=[2, 2], num_heads=[6, 6], drop_path_rate=0.0).train()
    fast = swinir_fast.make_fast(copy.deepcopy(ref)).train()
    fused, padded = [], []
    real_sdpa, real_head_dim = torch.nn.functional.scaled_dot_product_attention, windows.head_dim

    def sdpa(q, k, v, attn_mask=None, **kwargs):
        fused.append(attn_mask.requires_grad)
        padded.append(q.shape[-1])
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
    monkeypatch.setattr(windows, "spelt_out", lambda *a: False)                     # as on CUDA
    monkeypatch.setattr(windows, "head_dim", lambda d, device, fused=True: real_head_dim(d, torch.device("cuda"), fused))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    x, y = torch.rand(2, 3, 21, 13), torch.rand(2, 3, 84, 52)
    loss_ref, loss_fast = [(net(x) - y).abs().mean() for net in (ref, fast)]
    loss_ref.backward()
    loss_fast.backward()
    assert fused and all(fused) and set(padded) == {16}          # every call: the bias carries a gradient
    assert abs(loss_ref.item() - loss_fast.item()) < 1e-6
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6), name
    assert fast.layers[0].residual_group.blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0


# --- any scene size within memory -----------------------------------------------------------------------

def test_a_scene_too_large_for_the_budget_is_tiled_with_the_untiled_answer():
    """RLFN on a 96x112 scene: with a budget the whole scene (x 2 views) does not fit, the scene
    runs in tiles of the side that fits, and the answer equals the untiled one within the
    tiling's bound (at most one grey level, on few pixels)."""
    torch.manual_seed(3)
    net = build_net("rlfn")
    lr = np.random.default_rng(1).integers(0, 256, (96, 112, 3), dtype=np.uint8)
    per_pixel = memory.bytes_per_pixel(net, torch.device("cpu"))
    needed = (per_pixel * 2 + 4 * 3 * 16 * 4) * 96 * 112
    tiled_calls = []
    real = memory.auto_tile

    def recorded(*args, **kwargs):
        tiled_calls.append(real(*args, **kwargs))
        return tiled_calls[-1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pipeline.infer.ensemble.auto_tile", recorded)
        whole = predict_scene([net], lr, tta=2, memory_budget=int(needed * 1.01))
        tiled = predict_scene([net], lr, tta=2, memory_budget=int(needed * 0.3))
    assert tiled_calls[0] == 0 and 64 <= tiled_calls[1] < 96
    diff = np.abs(whole.astype(int) - tiled)
    assert 0 < diff.max() <= 1 and (diff > 0).mean() < 0.01      # tiled, and seamless


def test_the_memory_estimate_bounds_the_measured_peak():
    """RLFN's estimated bytes per low-res pixel against the peak resident memory a whole scene
    really took (VmHWM of a fresh process, 480x640): at least it, at most 3 times it."""
    import subprocess
    import sys
    script = ("import re, sys, numpy as np, torch; sys.path.insert(0, '.'); torch.set_num_threads(1)\n"
              "from pipeline.nets import build_net; from pipeline.infer.ensemble import predict_scene\n"
              "net = build_net('rlfn'); lr = np.zeros((480, 640, 3), np.uint8)\n"
              "predict_scene([net], lr[:16, :16])\n"
              "base = int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
              "predict_scene([net], lr, memory_budget=1 << 40)\n"
              "peak = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
              "print((peak - base) * 1024 / (480 * 640))\n")
    from pipeline.core import paths
    measured = float(subprocess.run([sys.executable, "-c", script], cwd=paths.ROOT, capture_output=True, text=True,
                                    check=True).stdout)
    estimated = memory.bytes_per_pixel(build_net("rlfn"), torch.device("cpu")) + 3 * 3 * 16 * 4
    assert measured <= estimated <= 3 * measured, (measured, estimated)


# --- make gpu-check, on the CPU -----------------------------------------------------------------------

def test_gpu_check_quick_on_the_cpu_passes_and_writes_its_table(workdir, cli):
    """`python -m pipeline gpu-check --device cpu --quick`: every net and precision the CPU runs
    natively, the kill-and-resume, the one-process torchrun and stages 03-04, all passed, in the
    table bench/gpu-check.md (and .json)."""
    import json

    proc = cli("gpu-check", "--device", "cpu", "--quick")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"gpu-check: all passed -> {workdir / 'bench' / 'gpu-check.md'}"
    result = json.loads((workdir / "bench" / "gpu-check.json").read_text())
    assert [(r["net"], r["precision"]) for r in result["rows"]] == [("rlfn", "fp32"), ("swinir_s", "fp32"), ("hat_s", "fp32")]
    assert all(r["passed"] and r["train_crops_s"] > 0 and r["infer_mpix_s"] > 0 for r in result["rows"])
    checks = {c["check"]: c for c in result["checks"]}
    assert len(checks) == 3 and all(c["passed"] for c in checks.values())
    resumed = checks["stage 02 killed after a checkpoint and resumed = never stopped"]["detail"]
    assert resumed.startswith("killed at step 2 of 4; largest weight difference 0.00e+00"), resumed
    assert checks["one-process torchrun: DDP step and all-reduce"]["detail"] == "gloo"
    table = (workdir / "bench" / "gpu-check.md").read_text()
    assert table.startswith("# gpu-check on CPU (cpu), torch ") and "| hat_s | fp32 | 3 |" in table


def test_the_supported_torch_range_is_checked():
    from pipeline.core.torch_check import check, version_tuple

    assert version_tuple("2.14.1+cu130") == (2, 14)
    assert check("2.4.0") is None and check("2.14.1+cu130") is None
    assert check("2.3.1") == ("torch 2.3.1 is outside the versions this pipeline supports (>= 2.4, < 2.15); "
                              "install one of them (make setup installs the pinned one)")
    assert check("2.15.0") is not None


def _setup_plan(*args: str) -> str:
    import subprocess

    from pipeline.core import paths
    return subprocess.run(["make", "-n", "-B", "--no-print-directory", "setup", *args], cwd=paths.ROOT,
                          capture_output=True, text=True, check=True).stdout


def test_make_setup_keeps_a_machines_torch_or_takes_another_index():
    system = _setup_plan("TORCH=system")
    assert "-m venv --system-site-packages .venv" in system
    assert "torch torchvision" not in system and "requirements-without-torch.txt" in system
    index = _setup_plan("TORCH_INDEX=https://download.pytorch.org/whl/cu118")
    assert "--index-url https://download.pytorch.org/whl/cu118 torch torchvision" in index
    assert "pipeline.core.torch_check" in index
    assert "pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1" not in index
    pinned = _setup_plan()
    assert "$(grep -E '^torch(vision)?==' requirements.txt)" in pinned and "--system-site-packages" not in pinned
