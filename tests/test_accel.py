"""pipeline/accel: the CPU speed-ups behind SR_CPU_ACCEL, each against the torch path it replaces.

The compiled window attention kernel against float64 products; inference through it (SwinIR)
and around it (HAT's 16x16 windows) with the reference outputs; window jobs on worker threads
bit-identical to one thread; the fallbacks without a compiler; the switch. Shards and memory:
tests/test_cpu_shards.py and tests/test_cpu_memory.py.
"""
from __future__ import annotations

import copy
import os
import shutil
from contextlib import contextmanager

import pytest
import torch
from conftest import missing

from pipeline import accel
from pipeline.accel.cpu import attention as accel_attention
from pipeline.accel.cpu import jobs as accel_jobs
from pipeline.accel.cpu import native
from pipeline.core.errors import PipelineError
from pipeline.nets import build_net
from pipeline.nets.fast import hat as hat_fast
from pipeline.nets.fast import windows
from pipeline.nets.fast.swinir import make_fast, make_reference
from pipeline.train import losses
from pipeline.train.step import Gradients

FP32_BOUND = 1e-4     # max |fast - reference| on [0, 1] outputs
SMALL_HAT = {"embed_dim": 24, "depths": [2], "num_heads": [2], "window_size": 4, "img_size": 16,
             "compress_ratio": 3, "squeeze_factor": 4, "mlp_ratio": 2, "upscale": 4}


@pytest.fixture(autouse=True)
def _one_thread_and_no_accel(torch_one_thread):
    """One torch thread, and whatever a test switches on is off again after it."""
    yield
    accel.enable(frozenset())


def require_compiler() -> None:
    """Skip where there is no C compiler, but fail under CI=true: CI is meant to have one."""
    if shutil.which(os.environ.get("CC") or "cc") is None:
        missing("no C compiler: the native window attention kernel cannot be built")


def require_native_kernel() -> None:
    """The compiled kernel must build wherever there is a C compiler."""
    require_compiler()
    assert native.kernel() is not None, native.status()


@contextmanager
def attention_calls():
    """Counts calls of torch's fused attention ("fused") and of the compiled kernel ("compiled")."""
    calls = {"fused": [], "compiled": []}
    fused, compiled = torch.nn.functional.scaled_dot_product_attention, accel_attention.native_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention",
                   lambda *a, **k: calls["fused"].append(1) or fused(*a, **k))
        mp.setattr(accel_attention, "native_forward", lambda *a, **k: calls["compiled"].append(1) or compiled(*a, **k))
        yield calls


def _attention_float64(qkv, bias, mask, heads: int, cells: int, scale: float) -> torch.Tensor:
    """softmax(q.k * scale + bias + mask).v in float64, the mask on the last windows."""
    qkv, bias = qkv.double(), bias.double()
    tokens, d = qkv.shape[0], qkv.shape[1] // (3 * heads)
    q, k, v = qkv.view(tokens // cells, cells, 3, heads, d).permute(2, 0, 3, 1, 4)
    if mask is not None:
        mask = torch.cat([mask.new_zeros(tokens // cells - len(mask), *mask.shape[1:]), mask]).double()
    scores = (q * scale) @ k.transpose(-2, -1) + (bias if mask is None else bias + mask)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(tokens, heads * d)


# --- the compiled kernel ---------------------------------------------------------------------------

@pytest.mark.parametrize("cells,d,heads", [(64, 10, 6), (64, 30, 2), (256, 24, 2), (16, 5, 3)])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
def test_native_window_attention_equals_float64(cells, d, heads, dtype, bound):
    """At SwinIR-S's and SwinIR's shapes (compiled with n and d constant) and others (read at run
    time), SwinIR's -100 shifted-window mask on the last 3 of 4 windows, against the products in
    float64 from the same inputs, relative to the largest value. In bf16 the kernel computes in
    float32 and rounds what it stores (2^-8 relative). Deterministic, bit for bit."""
    require_native_kernel()
    torch.manual_seed(1)
    windows_ = 4
    qkv = torch.randn(windows_ * cells, 3 * heads * d).to(dtype)
    bias = torch.randn(1, heads, cells, cells) * 2
    mask = torch.zeros(3, 1, cells, cells)
    mask[:, :, : cells // 3, cells // 2:] = mask[:, :, cells // 2:, : cells // 3] = -100.0
    scale = d ** -0.5
    want = _attention_float64(qkv, bias, mask, heads, cells, scale)
    got = accel_attention.native_forward(qkv, bias, mask, heads, cells, scale)
    assert got.dtype == dtype and got.shape == (windows_ * cells, heads * d)
    assert torch.equal(got, accel_attention.native_forward(qkv, bias, mask, heads, cells, scale))
    assert (got.double() - want).abs().max() <= bound * want.abs().max()
    assert (got.double() - want).abs().max() > 0 or dtype == torch.float32   # bf16 really rounds


def test_native_kernel_takes_only_what_it_serves():
    require_native_kernel()
    cpu, kernel = torch.device("cpu"), accel_attention.NativeWindowAttention()
    assert kernel.takes(cpu, torch.float32, 6, 64, 10) and kernel.takes(cpu, torch.bfloat16, 6, 64, 16)
    assert not kernel.takes(cpu, torch.bfloat16, 2, 64, 30)          # bf16 heads of 30: torch's
    assert not kernel.takes(cpu, torch.float32, 2, 256, 24)          # HAT-S's 16x16 windows: torch's
    assert not kernel.takes(cpu, torch.float16, 6, 64, 10)
    assert not kernel.takes(torch.device("cuda"), torch.float32, 6, 64, 10)


def test_native_kernel_falls_back_to_torch_without_a_compiler(monkeypatch, tmp_path):
    """No compiler, or a compiler that fails: status() says so in one line, the kernel takes
    nothing and inference runs torch's fused attention; a build without AVX-512 runs 8-float
    vectors (the same results); with a compiler the library is built once into the cache (a
    second load reuses the file), by a rename from a temporary name."""
    monkeypatch.setenv("SR_KERNEL_CACHE", str(tmp_path))
    kernel = accel_attention.NativeWindowAttention()

    def reloaded() -> str:
        native.forget()
        return native.status()
    try:
        monkeypatch.setenv("CC", "no-such-compiler-sr")
        assert reloaded() == ("torch's fused attention (no C compiler: 'no-such-compiler-sr' not found; "
                              "set CC to build the native kernel)")
        assert native.kernel() is None and not kernel.takes(torch.device("cpu"), torch.float32, 6, 64, 10)
        accel.enable({"attention"})
        net = make_fast(build_net("swinir_s", depths=[2], num_heads=[6])).eval()
        with attention_calls() as calls, torch.inference_mode():
            net(torch.rand(1, 3, 16, 16))
        assert calls["fused"] and not calls["compiled"]
        monkeypatch.delenv("CC")
        require_compiler()
        broken = tmp_path / "cc-broken"             # a compiler that fails: its first error line is reported
        broken.write_text('#!/bin/sh\necho "window_attention.c:1: error: no vectors here" >&2\nexit 1\n')
        broken.chmod(0o755)
        monkeypatch.setenv("CC", str(broken))
        assert reloaded() == (f"torch's fused attention (the native kernel did not build: {broken} failed: "
                              "window_attention.c:1: error: no vectors here)")
        assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".*"))   # nothing half-written
        without_avx512 = tmp_path / "cc-avx2"       # the same compiler, told the CPU has no AVX-512
        without_avx512.write_text('#!/bin/sh\nexec cc "$@" -mno-avx512f\n')
        without_avx512.chmod(0o755)
        monkeypatch.setenv("CC", str(without_avx512))
        assert reloaded().startswith("native kernel (8-float vectors; ")
        assert native.vector_floats() == 8
        for cells, d in ((64, 10), (16, 5)):      # SwinIR-S's compiled shape; one read at run time
            qkv, bias = torch.randn(3 * cells, 3 * 2 * d), torch.randn(1, 2, cells, cells)
            want = _attention_float64(qkv, bias, None, 2, cells, 0.3)
            got = accel_attention.native_forward(qkv, bias, None, 2, cells, 0.3)
            assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()
        monkeypatch.delenv("CC")
        for old in tmp_path.glob("*.so"):
            old.unlink()
        native.forget()
        require_native_kernel()
        assert "built in" in native.status()
        built = list(tmp_path.glob("*.so"))
        assert len(built) == 1 and not built[0].name.startswith(".")
        assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]    # no temporary left
        stamp = built[0].stat().st_mtime_ns
        assert "built in" not in reloaded() and native.kernel() is not None
        assert built[0].stat().st_mtime_ns == stamp
    finally:
        native.forget()


# --- inference through the fast paths --------------------------------------------------------------

@pytest.mark.parametrize("parts", [{"attention"}, set()], ids=["kernel", "torch"])
def test_swinir_inference_attention(parts):
    """Inference on the CPU runs window attention through the compiled kernel where it is
    switched on, else torch's fused kernel: one call for the unshifted block and two for the
    shifted one (interior and border windows apart), with the reference's outputs; caches built
    inside inference mode carry no autograd state, and stay usable for training afterwards
    (which never takes the kernel)."""
    if parts:
        require_native_kernel()
    accel.enable(parts)
    torch.manual_seed(5)
    net = make_fast(build_net("swinir_s", depths=[2], num_heads=[6]))
    ref = make_reference(copy.deepcopy(net)).eval()
    attn = net.layers[0].residual_group.blocks[0].attn
    x = torch.rand(1, 3, 16, 24)
    with attention_calls() as calls, torch.inference_mode():
        out = net.eval()(x)
    assert (len(calls["compiled"]), len(calls["fused"])) == ((3, 0) if parts else (0, 3))
    with torch.no_grad():
        assert (out - ref(x)).abs().max().item() < FP32_BOUND
    assert not attn._fast_bias[1].requires_grad
    with attention_calls() as calls:
        net.train()(torch.rand(1, 3, 16, 16)).mean().backward()
    assert not calls["compiled"]
    assert attn.relative_position_bias_table.grad.abs().sum() > 0


@pytest.mark.parametrize("parts", [{"attention"}, set()], ids=["kernel", "torch"])
def test_hat_inference_attention(parts):
    """HAT's window attention at inference: its 4x4 windows (16 tokens) through the compiled kernel
    where it is on, else the fused kernel (unshifted block; shifted: interior + border windows);
    its overlapping cross-attention (OCAB) takes the fused kernel either way."""
    if parts:
        require_native_kernel()
    accel.enable(parts)
    torch.manual_seed(11)
    ref = build_net("hat", **SMALL_HAT)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = hat_fast.make_reference(ref).eval()
    net = hat_fast.make_fast(copy.deepcopy(ref)).eval()
    x = torch.rand(1, 3, 16, 16)
    with attention_calls() as calls, torch.inference_mode():
        out = net(x)
    assert (len(calls["compiled"]), len(calls["fused"])) == ((3, 1) if parts else (0, 4))
    with torch.no_grad():
        assert (out - ref(x)).abs().max().item() < FP32_BOUND


@pytest.mark.filterwarnings("ignore:bf16 on this")
@pytest.mark.parametrize("name", ["swinir_s", "hat"])
def test_window_jobs_on_threads_give_the_single_thread_results(name, monkeypatch):
    """With `jobs` on, a block's windows run as jobs of 8192 tokens (512 for the small HAT's 4x4
    windows here) on worker threads when torch has several: bit-identical outputs to one thread and
    to no jobs at all, inference and autocast modes carried into the workers."""
    torch.manual_seed(7)
    if name == "swinir_s":
        net, x = make_fast(build_net("swinir_s", depths=[2], num_heads=[6]).eval()), torch.rand(2, 3, 96, 72)
    else:
        monkeypatch.setattr(accel_jobs, "TOKENS_PER_JOB", 512)
        net, x = hat_fast.make_fast(build_net("hat", **SMALL_HAT).eval()), torch.rand(1, 3, 40, 48)
    results = {}
    for parts, threads in ((set(), 1), ({"jobs"}, 1), ({"jobs"}, 2)):
        accel.enable(parts)
        torch.set_num_threads(threads)
        with torch.inference_mode():
            results[bool(parts), threads, "fp32"] = net(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results[bool(parts), threads, "bf16"] = net(x)
    torch.set_num_threads(1)
    cells = net.window_size ** 2
    assert windows.in_jobs([(0, x.numel() // 3 // cells, None)], cells, x.device)[1:]   # several jobs
    for precision in ("fp32", "bf16"):
        assert torch.equal(results[True, 1, precision], results[True, 2, precision])
        assert torch.equal(results[False, 1, precision], results[True, 2, precision])
    assert not torch.equal(results[True, 2, "fp32"], results[True, 2, "bf16"])   # autocast reached the workers


# --- the switch -------------------------------------------------------------------------------------

def test_the_switch_names_the_parts(monkeypatch):
    for value, parts in (("", set(accel.PARTS)), ("1", set(accel.PARTS)), ("0", set()),
                         ("shards,memory", {"shards", "memory"}), (" jobs ", {"jobs"})):
        monkeypatch.setenv(accel.SWITCH, value)
        assert accel.parts() == parts
    monkeypatch.setenv(accel.SWITCH, "shards,turbo")
    with pytest.raises(PipelineError, match=r"SR_CPU_ACCEL=shards,turbo: unknown part\(s\) turbo \(0, 1, or a "
                                            r"comma list of shards, memory, attention, jobs\)"):
        accel.parts()


def test_enable_registers_and_unregisters_the_process_wide_parts(monkeypatch):
    accel.enable({"attention", "jobs"})
    assert windows.in_jobs([(0, 256, None)], 64, torch.device("cpu")) == [(0, 128, 0, None), (128, 256, 0, None)]
    assert windows.in_jobs([(0, 256, None)], 64, torch.device("cuda")) == [(0, 256, 0, None)]   # CUDA: one job
    assert "attention, jobs" in accel.describe()
    accel.enable(set())
    assert windows.in_jobs([(0, 256, None)], 64, torch.device("cpu")) == [(0, 256, 0, None)]
    monkeypatch.setenv(accel.SWITCH, "0")
    assert accel.describe() == "CPU speed-ups (SR_CPU_ACCEL): none"


def test_training_gradients_shard_only_where_switched_on(monkeypatch):
    net = build_net("rlfn")
    gradients = Gradients(net, losses.build_loss({"l1": 1.0}), None, torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv(accel.SWITCH, "1")
        sharded, how = accel.training_gradients(gradients, net, "auto", 16)
        assert sharded is not gradients and sharded.shards == 2 and how.startswith("2 shards of the batch")
        sharded.close()
        monkeypatch.setenv(accel.SWITCH, "memory")
        same, how = accel.training_gradients(gradients, net, "auto", 16)
        assert same is gradients and how == "one shard: SR_CPU_ACCEL leaves shards off"
    finally:
        torch.set_num_threads(threads)
