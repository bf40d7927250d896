"""Every fast path against its reference: same weights and keys, same outputs within the
bounds of issue 6 (fp32 within 1e-4; bf16 competition SSIM within 5e-4 of fp32's), caches
right across input sizes and weight changes; and a smoke run of `bench`."""
from __future__ import annotations

import copy
import os
import re
import shutil
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.accel.cpu import native as window_attention_native
from pipeline.accel.cpu import onednn_linear
from pipeline.accel.cpu import window_attention as window_attention_cpu
from pipeline.core import paths
from pipeline.core.io import read_image
from pipeline.core.metrics import competition_ssim
from pipeline.core.precision import choose
from pipeline.core.weights import load_weights
from pipeline.infer.ensemble import predict_scene
from pipeline.nets import available_nets, build_net
from pipeline.nets.fast import hat as hat_fast
from pipeline.nets.fast import swinir as swinir_fast
from pipeline.nets.fast.prepare import Fp32Conv2d, edge_convs, prepare_for_inference
from pipeline.nets.fast.swinir import FastSwinIR, _add_drop_path, make_fast, make_reference
from pipeline.nets.fast.switch import cached_orders, reorder
from pipeline.nets.hat import HAT
from pipeline.nets.swinir import SwinIR
from pipeline.tools.bench import COLUMNS
from pipeline.tools.demo_data import downscale

FP32_BOUND = 1e-4     # max |fast - reference| on [0, 1] outputs
SSIM_BOUND = 5e-4     # |SSIM(bf16) - SSIM(fp32)|, competition SSIM against the high-res tile


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    """One torch thread: the machine's cores are shared with other jobs."""


def _pair(net: SwinIR) -> tuple[SwinIR, SwinIR]:
    """(reference, fast) copies of one net: the same weights."""
    ref = make_reference(copy.deepcopy(net)).eval()
    return ref, make_fast(copy.deepcopy(net)).eval()


@torch.no_grad()
def _max_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    return (a(x) - b(x)).abs().max().item()


# --- SwinIR -----------------------------------------------------------------------------

@pytest.mark.shared
def test_swinir_fast_path_equals_the_official_fixture(swinir_fixture):
    ckpt, io = swinir_fixture
    net = make_fast(build_net("swinir", **io["config"]))
    load_weights(net, ckpt)      # the release layout loads into the fast net unchanged
    assert type(net) is FastSwinIR
    ref = make_reference(copy.deepcopy(net)).eval()
    net.eval()
    with torch.no_grad():
        for x, official in zip(io["inputs"], io["outputs"]):   # 48x64, 37x53, batch 2, 96x40
            fast = net(x)
            assert fast.shape == official.shape
            assert (fast - official).abs().max().item() < FP32_BOUND
            assert (fast - ref(x)).abs().max().item() < FP32_BOUND
    odd = torch.rand(2, 3, 29, 45, generator=torch.Generator().manual_seed(0))
    assert _max_diff(ref, net, odd) < FP32_BOUND


def test_fast_path_keeps_module_tree_and_keys():
    net = build_net("swinir_s")
    keys = list(net.state_dict())
    make_fast(net)
    assert list(net.state_dict()) == keys
    assert type(make_reference(net)) is SwinIR
    with pytest.raises(TypeError):
        make_fast(build_net("rlfn"))


def test_switching_back_gives_the_reference_outputs_exactly():
    torch.manual_seed(1)
    net = build_net("swinir_s").eval()
    x = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        before = net(x)
        make_fast(net)(x)
        assert torch.equal(make_reference(net)(x), before)


def test_caches_follow_input_size_batch_and_weights():
    torch.manual_seed(2)
    ref, fast = _pair(build_net("swinir_s", depths=[2, 2], num_heads=[6, 6]))
    sizes = [(1, 16, 24), (2, 16, 24), (1, 40, 16), (1, 16, 24), (3, 8, 8), (1, 24, 40), (1, 17, 9)]
    for b, h, w in sizes:   # more sizes than the cache keeps: evicted ones are rebuilt
        assert _max_diff(ref, fast, torch.rand(b, 3, h, w)) < FP32_BOUND, (b, h, w)
    assert len(fast._fast_orders) == 4
    # new weights after the bias and padded projections were cached: the cache follows
    new = build_net("swinir_s", depths=[2, 2], num_heads=[6, 6]).state_dict()
    new = {k: v + 0.05 * torch.randn_like(v) for k, v in new.items()}
    ref.load_state_dict(new)
    fast.load_state_dict(new)
    assert _max_diff(ref, fast, torch.rand(1, 3, 16, 24)) < FP32_BOUND


@contextmanager
def _attention_calls(kernel: str):
    """Counts calls of torch's fused attention ("fused") and of the compiled kernel's forward
    ("compiled") inside the block; kernel "fused" switches the compiled kernel off."""
    calls = {"fused": [], "compiled": []}
    original_fused, original_native = torch.nn.functional.scaled_dot_product_attention, window_attention_cpu._native_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention",
                   lambda *a, **k: calls["fused"].append(1) or original_fused(*a, **k))
        mp.setattr(window_attention_cpu, "_native_forward",
                   lambda *a, **k: calls["compiled"].append(1) or original_native(*a, **k))
        if kernel == "fused":
            mp.setattr(window_attention_cpu, "native_kernel_takes", lambda *a: False)
        yield calls


@pytest.mark.parametrize("kernel", ["native", "fused"])
def test_inference_attention_kernel(kernel):
    """Inference on the CPU runs attention through the compiled kernel where it is built, else
    torch's fused kernel, one call for the unshifted block and two for the shifted one
    (interior and border windows apart), with the reference's outputs; caches built inside
    inference mode carry no autograd state, and stay usable for training afterwards."""
    if kernel == "native":
        _require_native_kernel()
    torch.manual_seed(5)
    net = make_fast(build_net("swinir_s", depths=[2], num_heads=[6]))
    ref = make_reference(copy.deepcopy(net)).eval()
    attn = net.layers[0].residual_group.blocks[0].attn
    x = torch.rand(1, 3, 16, 24)
    with _attention_calls(kernel) as calls, torch.inference_mode():
        out = net.eval()(x)
    assert (len(calls["compiled"]), len(calls["fused"])) == ((3, 0) if kernel == "native" else (0, 3))
    with torch.no_grad():
        assert (out - ref(x)).abs().max().item() < FP32_BOUND
    assert not attn._fast_bias[1].requires_grad
    net.train()(torch.rand(1, 3, 16, 16)).mean().backward()
    assert attn.relative_position_bias_table.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:bf16 on this")
def test_worker_threads_give_the_single_thread_results():
    """Blocks run as jobs on worker threads when torch has several: bit-identical outputs,
    inference and autocast modes carried into the workers."""
    torch.manual_seed(7)
    net = make_fast(build_net("swinir_s", depths=[2], num_heads=[6]).eval())
    x = torch.rand(2, 3, 96, 72)               # 216 windows: two jobs per block
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            results[threads, "fp32"] = net(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results[threads, "bf16"] = net(x)
    torch.set_num_threads(1)
    assert torch.equal(results[1, "fp32"], results[2, "fp32"])
    assert torch.equal(results[1, "bf16"], results[2, "bf16"])
    assert not torch.equal(results[2, "fp32"], results[2, "bf16"])   # autocast reached the workers


def test_fast_path_trains_with_the_reference_gradients():
    torch.manual_seed(3)
    ref = build_net("swinir_s", depths=[2, 2], num_heads=[6, 6], drop_path_rate=0.0).train()
    fast = make_fast(copy.deepcopy(ref)).train()
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 64, 64)
    for net in (ref, fast):
        (net(x) - y).abs().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6), name


@pytest.mark.parametrize("kernel,chunk_bytes", [("native", None), ("torch", None), ("torch", 1)])
def test_training_attention_has_the_reference_gradients(kernel, chunk_bytes):
    """A training step of the fast path on the CPU runs attention through
    `window_attention_cpu` (forward and backward by hand; torch's fused CPU kernel has no
    gradient for the learnt bias) in every block, interior and border windows of shifted
    blocks alike, with the reference's loss and gradients (the bias tables' too), on an odd
    size (padded to the window) and a batch, one call a block (a shifted block's mask
    covers its last windows); through the compiled kernel, and through torch's products in
    one chunk of windows and (chunk_bytes=1) in chunks of one window, so border windows span
    many chunks."""
    if kernel == "native":
        _require_native_kernel()
    torch.manual_seed(9)
    ref = build_net("swinir_s", depths=[2, 2], num_heads=[6, 6], drop_path_rate=0.0).train()
    fast = make_fast(copy.deepcopy(ref)).train()
    x, y = torch.rand(2, 3, 21, 13), torch.rand(2, 3, 84, 52)
    fused, by_hand = [], []
    original = torch.nn.functional.scaled_dot_product_attention
    function = (window_attention_cpu._NativeWindowAttention if kernel == "native"
                else window_attention_cpu._WindowAttention)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention",
                   lambda *a, **k: fused.append(1) or original(*a, **k))
        mp.setattr(function, "forward", _counted(function.forward, by_hand))
        if kernel == "torch":
            mp.setattr(window_attention_cpu, "native_kernel_takes", lambda *a: False)
        if chunk_bytes:
            mp.setattr(window_attention_cpu, "_CHUNK_BYTES", chunk_bytes)
        losses = [(net(x) - y).abs().mean() for net in (ref, fast)]
        for loss in losses:
            loss.backward()
    assert not fused
    assert len(by_hand) == 4             # 4 blocks, shifted or not
    assert abs(losses[0].item() - losses[1].item()) < 1e-6
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6), name
    assert fast.layers[0].residual_group.blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0


def _require_native_kernel() -> None:
    """The compiled kernel must build wherever there is a C compiler (CI has one)."""
    if shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler: the native window attention kernel cannot be built here")
    assert window_attention_native.kernel() is not None, window_attention_native.status()


def _native_equals_torch_products(cells: int, d: int) -> None:
    """The loaded kernel's output and gradients against torch's chunked products, fp32 and bf16,
    the mask on the last 2 of 3 windows."""
    torch.manual_seed(4)
    heads = 2
    qkv = torch.randn(3 * cells, 3 * heads * d)
    bias = torch.randn(1, heads, cells, cells)
    mask = torch.zeros(2, 1, cells, cells)
    mask[:, :, : cells // 2, cells // 2:] = -100.0
    g = torch.randn(3 * cells, heads * d)
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        results = [[t.float() for t in _attention_and_gradients(fn, qkv.to(dtype), bias, mask, heads, cells, g.to(dtype))]
                   for fn in (window_attention_cpu._WindowAttention.apply, window_attention_cpu._NativeWindowAttention.apply)]
        for want, got in zip(*results):
            assert (got - want).abs().max() <= bound * want.abs().max(), (cells, d, dtype)


def _attention_and_gradients(fn, qkv, bias, mask, heads: int, cells: int, g) -> tuple:
    """fn's output (scale d^-0.5) and the gradients of qkv and the bias for the output gradient
    g, through leaves copied from qkv and bias, in their dtypes."""
    x, b = qkv.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    out = fn(x, b, mask, heads, cells, (qkv.shape[1] // (3 * heads)) ** -0.5)
    out.backward(g)
    return out.detach(), x.grad, b.grad


def _counted(fn, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return staticmethod(wrapper)


def _window_attention_by_autograd(qkv, bias, mask, heads, cells, scale):
    """The products spelt out for autograd: what window_attention_cpu computes by hand."""
    tokens, d = qkv.shape[0], qkv.shape[1] // (3 * heads)
    q, k, v = qkv.view(tokens // cells, cells, 3, heads, d).permute(2, 0, 3, 1, 4)
    if mask is not None:      # the mask of the last windows; the others unmasked
        mask = torch.cat([mask.new_zeros(tokens // cells - len(mask), *mask.shape[1:]), mask])
    scores = (q * scale) @ k.transpose(-2, -1) + (bias if mask is None else bias + mask).to(qkv.dtype)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(tokens, heads * d)


@pytest.mark.parametrize("kernel", ["native", "torch"])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("masked_windows", [0, 7, 5])
def test_window_attention_by_hand_equals_autograd(kernel, dtype, bound, masked_windows):
    """Outputs and the gradients of qkv and the bias, a -inf shifted-window mask on all
    windows or on the last 5, fp32 and bf16 (bf16: each side rounds its own products,
    relative to the largest value); the compiled kernel (at a shape it runs with n and d
    read at run time) and torch's products with chunk boundaries inside the windows (3
    windows a chunk of 7, the mask starting inside the first chunk)."""
    if kernel == "native":
        _require_native_kernel()
    torch.manual_seed(0)
    heads, cells, d, windows = 3, 16, 5, 7
    qkv = torch.randn(windows * cells, 3 * heads * d).to(dtype)
    bias = torch.randn(1, heads, cells, cells)
    mask = None
    if masked_windows:
        mask = torch.zeros(masked_windows, 1, cells, cells)
        mask[::2, :, :, cells // 2:] = float("-inf")      # half the keys hidden from every other window
    g = torch.randn(windows * cells, heads * d).to(dtype)
    results = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(window_attention_cpu, "_CHUNK_BYTES", 3 * heads * cells * cells * qkv.element_size())
        mp.setattr(window_attention_cpu, "native_kernel_takes", lambda *a: kernel == "native")
        for fn in (_window_attention_by_autograd, window_attention_cpu.window_attention):
            results.append([t.float() for t in _attention_and_gradients(fn, qkv, bias, mask, heads, cells, g)])
    assert results[1][2].dtype == torch.float32 and results[1][0].shape == (windows * cells, heads * d)
    for want, got in zip(*results):
        assert (got - want).abs().max() <= bound * want.abs().max()


@pytest.mark.parametrize("cells,d,heads", [(64, 10, 6), (64, 30, 2), (256, 24, 2)])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
def test_native_window_attention_equals_float64(cells, d, heads, dtype, bound):
    """The compiled kernel at SwinIR-S's and SwinIR's shapes (compiled with n and d constant) and
    HAT-S's (read at run time), with
    SwinIR's -100 shifted-window mask on the last 3 of 4 windows, against the products in
    float64 from the same inputs: output and gradients of qkv and of the bias, relative to the
    largest value. In bf16 the kernel computes in float32 and rounds what it stores (output,
    probabilities, gradients) to bf16 (2^-8 relative); it is deterministic, bit for bit."""
    _require_native_kernel()
    torch.manual_seed(1)
    windows = 4
    qkv = torch.randn(windows * cells, 3 * heads * d).to(dtype)
    bias = torch.randn(1, heads, cells, cells) * 2
    mask = torch.zeros(3, 1, cells, cells)
    mask[:, :, : cells // 3, cells // 2:] = mask[:, :, cells // 2:, : cells // 3] = -100.0
    g = torch.randn(windows * cells, heads * d).to(dtype)
    results = []
    for fn, kind in ((_window_attention_by_autograd, torch.float64),
                     (window_attention_cpu._NativeWindowAttention.apply, dtype),
                     (window_attention_cpu._NativeWindowAttention.apply, dtype)):
        bias_kind = kind if kind == torch.float64 else torch.float32
        out, d_qkv, d_bias = _attention_and_gradients(fn, qkv.to(kind), bias.to(bias_kind), mask.to(bias_kind),
                                                      heads, cells, g.to(kind))
        assert out.dtype == kind and d_qkv.dtype == kind
        results.append((out, d_qkv, d_bias))
    for want, got, again in zip(*results):
        assert torch.equal(got, again)
        assert (got.double() - want).abs().max() <= bound * want.abs().max()


def test_native_kernel_falls_back_to_torch_without_a_compiler(monkeypatch, tmp_path):
    """No compiler, a compiler that fails, or SR_NATIVE_KERNELS=0: status() says so in one line
    and window attention runs torch's products; a build without AVX-512 runs 8-float vectors (equal results); with a
    compiler on an AVX-512 CPU, the library is built once into the cache (a second load reuses
    the file), by a rename from a temporary name."""
    monkeypatch.setenv("SR_KERNEL_CACHE", str(tmp_path))
    qkv = torch.randn(2 * 16, 3 * 2 * 4)
    bias = torch.zeros(1, 2, 16, 16)

    def reloaded() -> str:
        window_attention_native.forget()
        return window_attention_native.status()
    try:
        monkeypatch.setenv("CC", "no-such-compiler-sr")
        assert reloaded() == ("torch products (no C compiler: 'no-such-compiler-sr' not found; "
                              "set CC to build the native kernel)")
        assert window_attention_native.kernel() is None
        assert not window_attention_cpu.native_kernel_takes(qkv.device, qkv.dtype, 2, 16, 4)
        assert window_attention_cpu.window_attention(qkv, bias, None, 2, 16, 0.5).shape == (32, 8)
        monkeypatch.delenv("CC")
        monkeypatch.setenv("SR_NATIVE_KERNELS", "0")
        assert reloaded() == "torch products (SR_NATIVE_KERNELS=0)"
        monkeypatch.delenv("SR_NATIVE_KERNELS")
        if shutil.which("cc") is None:
            pytest.skip("no C compiler to build the kernel with")
        broken = tmp_path / "cc-broken"             # a compiler that fails: its first error line is reported
        broken.write_text('#!/bin/sh\necho "window_attention.c:1: error: no vectors here" >&2\nexit 1\n')
        broken.chmod(0o755)
        monkeypatch.setenv("CC", str(broken))
        assert reloaded() == (f"torch products (the native kernel did not build: {broken} failed: "
                              "window_attention.c:1: error: no vectors here)")
        assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".*"))   # nothing half-written
        without_avx512 = tmp_path / "cc-avx2"       # the same compiler, told the CPU has no AVX-512
        without_avx512.write_text('#!/bin/sh\nexec cc "$@" -mno-avx512f\n')
        without_avx512.chmod(0o755)
        monkeypatch.setenv("CC", str(without_avx512))
        assert reloaded().startswith("native kernel (8-float vectors; ")
        assert window_attention_native.vector_floats() == 8
        assert window_attention_cpu.native_kernel_takes(qkv.device, torch.float32, 2, 16, 4)
        for cells, d in ((64, 10), (16, 5)):      # SwinIR-S's compiled shape; one read at run time
            _native_equals_torch_products(cells, d)
        monkeypatch.delenv("CC")
        for old in tmp_path.glob("*.so"):
            old.unlink()
        window_attention_native.forget()
        _require_native_kernel()
        assert "built in" in window_attention_native.status()
        assert window_attention_cpu.native_kernel_takes(qkv.device, qkv.dtype, 2, 16, 4)
        built = list(tmp_path.glob("*.so"))
        assert len(built) == 1 and not built[0].name.startswith(".")
        assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]    # no temporary left
        stamp = built[0].stat().st_mtime_ns
        assert "built in" not in reloaded() and window_attention_native.kernel() is not None
        assert built[0].stat().st_mtime_ns == stamp
    finally:
        window_attention_native.forget()


def test_onednn_linear_equals_f_linear_with_gradients():
    """fp32 on the CPU through oneDNN, forward and all three gradients, with and without bias
    and GELU, widening and narrowing (the weight's gradient is formed either way round);
    under autocast it is F.linear (bf16 out)."""
    torch.manual_seed(0)
    for features_in, features_out in ((24, 40), (40, 24)):
        _check_onednn_linear(features_in, features_out)


def _check_onednn_linear(features_in: int, features_out: int) -> None:
    x = torch.randn(300, features_in, requires_grad=True)
    w = torch.randn(features_out, features_in, requires_grad=True)
    b = torch.randn(features_out, requires_grad=True)
    g = torch.randn(300, features_out)
    for bias in (b, None):
        for gelu in (False, True):
            grads = []
            for fn in (lambda: torch.nn.functional.gelu(torch.nn.functional.linear(x, w, bias)) if gelu
                       else torch.nn.functional.linear(x, w, bias),
                       lambda: onednn_linear.linear(x, w, bias, gelu=gelu)):
                x.grad = w.grad = b.grad = None
                out = fn()
                out.backward(g)
                grads.append([out.detach(), x.grad, w.grad] + ([b.grad] if bias is not None else []))
            for want, got in zip(*grads):
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(onednn_linear.linear(x, w, b, gelu=True),
                              torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)), atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert onednn_linear.linear(x, w, b).dtype == torch.bfloat16


def test_drop_path_drops_whole_images():
    """z + DropPath(y) in the (window, image, cell) layout: an image's path kept or dropped whole."""
    blk = build_net("swinir_s", drop_path_rate=0.5).layers[3].residual_group.blocks[5].train()
    torch.manual_seed(0)
    b, cells = 8, 64
    y = torch.ones(3 * b * cells, 60)              # (window, image, cell) layout
    z = torch.full_like(y, 2.0)
    out = _add_drop_path(blk, z, y, b, cells).view(3, b, cells, 60)
    keep = 1 - blk.drop_path.drop_prob
    per_image = out.permute(1, 0, 2, 3).reshape(b, -1)
    for image in per_image:                        # an image is kept or dropped as a whole
        assert image.unique().tolist() in ([2.0], [2 + 1 / keep])
    assert 0 < (per_image[:, 0] == 2).sum() < b
    assert torch.equal(_add_drop_path(blk.eval(), z, y, b, cells), z + y)


def test_reorder_differentiates_as_index_select():
    """The gather between window orders has index_select's gradient (taken through the inverse
    permutation instead of a scatter), in fp32 and bf16."""
    net = make_fast(build_net("swinir_s", depths=[2, 2], num_heads=[6, 6]))
    orders = cached_orders(net, 2, 16, 16, torch.device("cpu"), swinir_fast._Orders)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2 * 16 * 16, 60, dtype=dtype, requires_grad=True)
        g = torch.randn_like(x)
        for src, dst in (("U", "S"), ("S", "img"), ("img", "U")):
            ours = reorder(x, orders, src, dst)
            theirs = x.index_select(0, orders.index(src, dst))
            assert torch.equal(ours, theirs)
            assert torch.equal(*(torch.autograd.grad(y, x, g)[0] for y in (ours, theirs)))


# --- HAT ---------------------------------------------------------------------------------

# a small HAT with every part of the real one (2 groups, shifted blocks, OCAB, CAB)
SMALL_HAT = {"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 2], "window_size": 4, "img_size": 16,
             "compress_ratio": 3, "squeeze_factor": 4, "mlp_ratio": 2, "upscale": 4}


def _hat_pair(**args) -> tuple[HAT, HAT]:
    torch.manual_seed(11)
    ref = build_net("hat", **{**SMALL_HAT, **args})
    with torch.no_grad():   # off the init: position biases and conv_scale'd CAB matter
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hat_fast.make_reference(ref).eval(), hat_fast.make_fast(copy.deepcopy(ref)).eval()


@pytest.mark.shared
def test_hat_fast_path_equals_the_official_fixture(hat_fixture):
    ckpt, io = hat_fixture
    net = hat_fast.make_fast(build_net("hat", **io["config"]))
    load_weights(net, ckpt)      # the release layout loads into the fast net unchanged
    assert type(net) is hat_fast.FastHAT
    ref = hat_fast.make_reference(copy.deepcopy(net)).eval()
    net.eval()
    with torch.no_grad():
        for x, official in zip(io["inputs"], io["outputs"]):   # 32x48, 27x41, batch 2, 51x17
            fast = net(x)
            assert fast.shape == official.shape
            assert (fast - official).abs().max().item() < FP32_BOUND
            assert (fast - ref(x)).abs().max().item() < FP32_BOUND


def test_hat_fast_path_keeps_keys_and_switches_back_exactly():
    ref, fast = _hat_pair()
    assert list(fast.state_dict()) == list(ref.state_dict())
    x = torch.rand(1, 3, 13, 18)
    with torch.no_grad():
        before = ref(x)
        assert (fast(x) - before).abs().max().item() < FP32_BOUND
        assert torch.equal(hat_fast.make_reference(fast)(x), before)
    with pytest.raises(TypeError):
        hat_fast.make_fast(build_net("swinir_s"))


def test_hat_caches_follow_input_size_batch_and_weights():
    ref, fast = _hat_pair()
    sizes = [(1, 16, 24), (2, 16, 24), (1, 40, 16), (1, 16, 24), (3, 8, 8), (1, 24, 40), (1, 17, 9), (1, 4, 4)]
    for b, h, w in sizes:   # more sizes than the cache keeps; 4x4: one window, all of it border
        assert _max_diff(ref, fast, torch.rand(b, 3, h, w)) < FP32_BOUND, (b, h, w)
    assert len(fast._fast_orders) == 4
    new = {k: v + 0.05 * torch.randn_like(v) for k, v in ref.state_dict().items()}
    ref.load_state_dict(new)
    fast.load_state_dict(new)    # cached biases follow the new weights
    assert _max_diff(ref, fast, torch.rand(1, 3, 16, 24)) < FP32_BOUND


@pytest.mark.parametrize("kernel", ["native", "fused"])
def test_hat_inference_attention_kernels(kernel):
    """HAT's window attention at inference on the CPU: the compiled kernel where it is built,
    else torch's fused kernel (unshifted block; shifted: interior + border windows); its
    overlapping cross-attention (OCAB) takes the fused kernel either way."""
    if kernel == "native":
        _require_native_kernel()
    ref, net = _hat_pair(depths=[2], num_heads=[2])
    x = torch.rand(1, 3, 16, 16)
    with _attention_calls(kernel) as calls, torch.inference_mode():
        out = net(x)
    assert (len(calls["compiled"]), len(calls["fused"])) == ((3, 1) if kernel == "native" else (0, 4))
    with torch.no_grad():
        assert (out - ref(x)).abs().max().item() < FP32_BOUND
    net.train()(torch.rand(1, 3, 16, 16)).mean().backward()   # caches built in inference mode train too
    oca = net.layers[0].residual_group.overlap_attn
    assert oca.relative_position_bias_table.grad.abs().sum() > 0


def test_hat_fast_path_trains_with_the_reference_gradients():
    ref, fast = _hat_pair(drop_path_rate=0.0)
    x, y = torch.rand(2, 3, 10, 14), torch.rand(2, 3, 40, 56)   # padded to 12x16
    for net in (ref.train(), fast.train()):
        (net(x) - y).abs().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6), name


@pytest.mark.filterwarnings("ignore:bf16 on this")
def test_hat_worker_threads_give_the_single_thread_results():
    _, net = _hat_pair(depths=[2], num_heads=[2])
    x = torch.rand(1, 3, 40, 48)               # 120 windows: several jobs per attention
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            results[threads, "fp32"] = net(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results[threads, "bf16"] = net(x)
    torch.set_num_threads(1)
    assert torch.equal(results[1, "fp32"], results[2, "fp32"])
    assert torch.equal(results[1, "bf16"], results[2, "bf16"])
    assert not torch.equal(results[2, "fp32"], results[2, "bf16"])


def test_hat_drop_path_drops_whole_images():
    blk = build_net("hat", **{**SMALL_HAT, "drop_path_rate": 0.5}).layers[1].residual_group.blocks[1].train()
    torch.manual_seed(0)
    b = 8
    out = hat_fast._drop_path(blk, torch.ones(b * 30, 24), b).view(b, -1)
    keep = 1 - blk.drop_path.drop_prob
    for image in out:
        assert image.unique().tolist() in ([0.0], [1 / keep])
    assert 0 < (out[:, 0] == 0).sum() < b


# --- every net through prepare_for_inference ------------------------------------------------

# hat and hat_l: hat_s's code at 2-4x its size
@pytest.mark.parametrize("name", [n for n in available_nets() if n not in ("hat", "hat_l")])
def test_prepared_net_equals_its_reference(name):
    torch.manual_seed(4)
    net = build_net(name).eval()
    ref = copy.deepcopy(net)
    x = torch.rand(2, 3, 19, 23)
    prepare_for_inference(net, "cpu", "fp32")
    with torch.no_grad():
        assert (net(x) - ref(x)).abs().max().item() < FP32_BOUND
    prepare_for_inference(net, "cpu", "fp32", fast=False)
    assert type(net) is type(ref)
    assert all(p.is_contiguous() for p in net.parameters())
    assert not any(isinstance(m, Fp32Conv2d) for m in net.modules())


@pytest.mark.filterwarnings("ignore:bf16 on this")
def test_edge_convolutions_stay_float32_under_bf16():
    torch.manual_seed(6)
    for name, n_edges in (("rlfn", 3), ("swinir_s", 3), ("hat_s", 3)):
        net = build_net(name).eval()
        assert len(edge_convs(net)) == n_edges
        x = torch.rand(1, 3, 16, 16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            plain = net(x)
            prepare_for_inference(net, "cpu", "bf16")
            fast = net(x)
        assert fast.dtype == torch.float32
        assert (fast - plain.float()).abs().max().item() < 0.05


def test_rlfn_channels_last_equals_reference(shared):
    net = build_net("rlfn")
    weights = paths.SHARED_WEIGHTS / "rlfn_x4.pth"
    if weights.is_file():
        load_weights(net, weights)
    ref = copy.deepcopy(net).eval()
    prepare_for_inference(net, "cpu", "fp32")
    conv = net.block_1.c1_r.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.rand(1, 3, 37, 50)
    assert _max_diff(ref, net, x) < FP32_BOUND


def test_predict_scene_fast_equals_reference_with_tta_and_tiles():
    torch.manual_seed(5)
    net = build_net("swinir_s", depths=[2, 2], num_heads=[6, 6])
    lr = np.random.default_rng(0).integers(0, 256, (30, 37, 3), dtype=np.uint8)
    settings = {"tta": 8, "tile": 16, "overlap": 4, "batch": 8}
    reference = predict_scene([net], lr, fast=False, **settings)
    fast = predict_scene([net], lr, **settings)
    assert type(net) is FastSwinIR
    diff = np.abs(reference.astype(int) - fast)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01   # float rounding crosses a level rarely


# --- bf16 against fp32 on real aerial tiles ---------------------------------------------------

def _aerial_tiles(n: int = 2, side: int = 128) -> list[tuple[np.ndarray, np.ndarray]]:
    """(LR, HR) pairs: the centre of real UC Merced tiles, HR side `side`, LR = bicubic / 4."""
    files = sorted((paths.SHARED_DATA / "ucmerced_urban").glob("*/*.tif"))
    if not files:
        pytest.skip("shared aerial tiles absent")
    pairs = []
    for path in files[:: len(files) // n][:n]:
        high = read_image(path)
        y, x = (high.shape[0] - side) // 2, (high.shape[1] - side) // 2
        high = high[y:y + side, x:x + side]
        pairs.append((downscale(high, 4), high))
    return pairs


@pytest.mark.shared
@pytest.mark.filterwarnings("ignore:bf16 on this")
def test_bf16_keeps_the_competition_ssim(swinir_fixture):
    ckpt, io = swinir_fixture
    swinir = load_weights(build_net("swinir", **io["config"]), ckpt)
    rlfn = build_net("rlfn")
    rlfn_weights = paths.SHARED_WEIGHTS / "rlfn_x4.pth"
    if rlfn_weights.is_file():
        load_weights(rlfn, rlfn_weights)
    for net, side in ((swinir, 128), (rlfn, 96)):   # RLFN: smaller (emulated bf16 is slow here)
        for lr, high in _aerial_tiles(2, side):
            fp32 = competition_ssim(predict_scene([net], lr, precision="fp32"), high)
            bf16 = competition_ssim(predict_scene([net], lr, precision="bf16"), high)
            assert abs(bf16 - fp32) < SSIM_BOUND, (type(net).__name__, fp32, bf16)


# --- the benchmark command ---------------------------------------------------------------------

def test_bench_quick_writes_the_table(workdir, cli):
    rows = "rlfn-fast-fp32,rlfn-fast-bf16,rlfn-train-ref,rlfn-train,rlfn-train-fp16,rlfn-train-loader,ensemble-rlfn"
    proc = cli("bench", "--quick", "--threads", "1", "--rows", rows)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(workdir / "bench" / "results.csv")
    assert list(table.columns) == COLUMNS
    assert table["row"].tolist() == rows.split(",")
    done = table[table["status"] == "ok"]
    assert {"rlfn-fast-fp32", "rlfn-train-loader", "ensemble-rlfn"} <= set(done["row"])
    assert (done["median_s"] > 0).all() and (done["mpix_per_s"] > 0).all()
    assert (done["peak_rss_mb"] > 50).all()
    loader = done.set_index("row").loc["rlfn-train-loader"]
    assert loader["baseline"] == "rlfn-train"
    assert 0 < loader["loader_s"] < loader["median_s"]                 # the wait is part of the step
    assert loader["loader_share"] == pytest.approx(loader["loader_s"] / loader["median_s"], rel=1e-4)
    assert done.set_index("row")["loader_s"].drop("rlfn-train-loader").isna().all()
    rows = table.set_index("row")
    assert rows.loc["rlfn-train", "baseline"] == "rlfn-train-ref" and rows.loc["rlfn-train-ref", "precision"] == "fp32"
    assert rows.loc["rlfn-train", "precision"] == choose("auto", "cpu", build_net("rlfn")).name
    assert rows.loc["rlfn-train-fp16", "status"].startswith("skipped: no native fp16")    # a CPU
    report = (workdir / "bench" / "results.md").read_text()
    assert "| rlfn-fast-fp32 | fp32 |" in report
    # the cores probe, before and after the rows, between the machine and the table
    probe = re.search(r"^Cores probe \(fp32 512\^3 products, one thread a core\): one core alone (\d+) GFLOP/s, "
                      r"1 at once (\d+) at the slowest \(x([\d.]+)\) before the rows; (\d+) and (\d+) "
                      r"\(x([\d.]+)\) after\.", report, re.M)
    assert probe and all(float(v) > 0 for v in probe.groups()), report
    assert report.index("Machine:") < probe.start() < report.index("| row |")
    assert probe.group(0) in proc.stdout
    assert "rows measured" in proc.stdout
    assert rows.loc["rlfn-train", "shards"] == 1                                 # one thread: one shard
    # two threads: the default training row splits its batch in two, the reference never
    proc = cli("bench", "--quick", "--threads", "2", "--rows", "rlfn-train-ref,rlfn-train")
    assert proc.returncode == 0, proc.stderr
    shards = pd.read_csv(workdir / "bench" / "results.csv").set_index("row")["shards"]
    assert (shards["rlfn-train-ref"], shards["rlfn-train"]) == (1, 2)


def test_cores_probe_measures_every_core():
    from pipeline.tools.bench import cores_probe
    probe = cores_probe(2, seconds=0.05)
    assert probe["cores"] == 2 and probe["alone"] > 1 and probe["together"] > 1
    assert probe["share"] == pytest.approx(probe["together"] / probe["alone"])


def test_bench_refuses_an_unknown_row(workdir, capsys):
    from pipeline.__main__ import main

    assert main(["bench", "--quick", "--rows", "rlfn-fast,no-such-row"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: bench: no row 'no-such-row'")
    assert not (workdir / "bench").exists()


def test_bench_interleaves_rows_in_one_process(workdir):
    """--interleave: the rows run in one child process, one run of each in turn."""
    from pipeline.tools.bench import measure, select_rows
    table = measure(select_rows("rlfn-train-ref,rlfn-train,rlfn-train-fp16"), quick=True, repeats=2,
                    device="cpu", threads=1, progress=lambda _: None, interleave=True).set_index("row")
    done = table[table["status"] == "ok"]
    assert list(done.index) == ["rlfn-train-ref", "rlfn-train"] and (done["repeats"] == 1).all()  # --quick: 1 round
    assert done["peak_rss_mb"].nunique() == 1                      # one process
    assert table.loc["rlfn-train", "ratio"] == pytest.approx(done["median_s"].iloc[0] / done["median_s"].iloc[1])
    assert table.loc["rlfn-train-fp16", "status"].startswith("skipped")


def test_training_window_attention_line():
    """The line stage 02 prints: the compiled kernel for SwinIR-S's 8x8 windows, torch's products
    for HAT-S's 16x16 ones, or on several torch threads a shard; nothing for a conv net."""
    from pipeline.nets.fast.prepare import training_window_attention
    _require_native_kernel()
    swinir, hat = build_net("swinir_s"), build_net("hat", window_size=16, embed_dim=48, depths=[2], num_heads=[2])
    for dtype in (torch.float32, torch.bfloat16):
        assert training_window_attention(swinir, dtype, 1) == window_attention_native.status()
    assert training_window_attention(hat, torch.bfloat16, 1) == (
        "torch products for 256-token windows, heads of 24 in bfloat16 (measured faster there than the native kernel)")
    assert training_window_attention(swinir, torch.float32, 2) == (
        "torch products (2 torch threads a shard; the native kernel trains on one)")
    assert training_window_attention(build_net("rlfn"), torch.float32, 1) is None
