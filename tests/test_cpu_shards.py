"""pipeline/accel/cpu/shards.py: a training step's batch split across threads gives the whole
batch's gradients, the same bits every time (stochastic depth included), the fp16 scaler's
scaled gradients, and says why it does not split where it cannot."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import DropPath as TimmDropPath

from pipeline.accel.cpu import shards as cpu_shards
from pipeline.core.errors import PipelineError
from pipeline.nets import build_net
from pipeline.nets.fast import use_fast_path
from pipeline.train import losses
from pipeline.train.step import Gradients

SMALL_SWINIR = {"depths": [2, 2], "num_heads": [6, 6]}


def grads_of(net: nn.Module, shards: int, lr, hr, scaler=None, amp=None) -> tuple[float, dict, list]:
    """The loss, terms and gradients of one batch: the plain Gradients (1), or in shards."""
    net.zero_grad(set_to_none=True)
    loss_fn = losses.build_loss({"ssim": 1.0, "l1": 0.5})
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    gradients = Gradients(net, loss_fn, amp, torch.device("cpu"))
    with gradients if shards == 1 else cpu_shards.ShardedGradients(gradients, shards) as step:
        loss, terms = step(lr, hr, scaler)
    return float(loss), terms, [p.grad.clone() for p in net.parameters()]


def batch(n: int = 4, side: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g), torch.rand(n, 3, 4 * side, 4 * side, generator=g)


@pytest.mark.parametrize("name,args", [("rlfn", {}), ("swinir_s", {**SMALL_SWINIR, "drop_path_rate": 0.0})])
@pytest.mark.parametrize("shards", [2, 3, 5])
def test_shards_give_the_whole_batch_gradients(name, args, shards):
    """Uneven shards too (3 of a batch of 4), never an empty one (5 asked: 4 of one image);
    the loss and its terms are the batch's."""
    torch.manual_seed(0)
    net = use_fast_path(build_net(name, **args)).train()
    lr, hr = batch()
    loss1, terms1, grads1 = grads_of(net, 1, lr, hr)
    loss_n, terms_n, grads_n = grads_of(net, shards, lr, hr)
    assert loss_n == pytest.approx(loss1, abs=1e-6)
    assert terms_n == pytest.approx(terms1, abs=1e-6)
    for (pname, _), a, b in zip(net.named_parameters(), grads1, grads_n):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), pname
        assert a.stride() == b.stride(), pname            # channels-last gradients stay so


SMALL_HAT = {"embed_dim": 24, "depths": [2], "num_heads": [2], "window_size": 4, "img_size": 16,
             "compress_ratio": 3, "squeeze_factor": 4, "mlp_ratio": 2, "upscale": 4}


@pytest.mark.parametrize("amp,shards", [(None, 2), (torch.bfloat16, 3)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,args", [("swinir_s", SMALL_SWINIR), ("hat", SMALL_HAT)])
def test_sharded_steps_are_the_same_bits_every_time_with_stochastic_depth(name, args, amp, shards):
    """SwinIR and HAT with drop path 0.5: each shard draws from a generator of its own, seeded
    from the global one in shard order, so a seed gives the same gradients whichever thread
    runs first, and another seed other ones. In bf16 too, with more shards than cores: with
    autocast's cache of cast weights (shared by the threads) 7 runs in 8 differed."""
    net = use_fast_path(build_net(name, **args, drop_path_rate=0.5)).train()
    lr, hr = batch(6)
    runs = []
    for seed in (0, 0, 0, 0, 1):
        torch.manual_seed(seed)
        runs.append(grads_of(net, shards, lr, hr, amp=amp)[2])
    for again in runs[1:4]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], again))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[4]))
    net.eval()          # and drop path is off outside training: shards equal the whole batch
    assert grads_of(net, 2, lr, hr)[0] == pytest.approx(grads_of(net, 1, lr, hr)[0], abs=1e-6)


def test_fp16_scaler_scales_every_shard():
    """Under the gradient scaler (fp16 autocast, on the CPU here) each shard's gradients are of
    the scaled loss, as scaler.scale(loss).backward() gives for the whole batch: per parameter
    tensor, the sharded gradients equal the whole batch's and, divided by the scale, the float32
    gradients, each relative to the tensor's own size (an unscaled shard would be 1/1024 of it,
    an error of ~100 %)."""
    torch.manual_seed(0)
    net = use_fast_path(build_net("rlfn")).train()
    lr, hr = batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _, _, whole = grads_of(net, 1, lr, hr, scaler, torch.float16)
    _, _, sharded = grads_of(net, 2, lr, hr, scaler, torch.float16)
    _, _, fp32 = grads_of(net, 1, lr, hr)
    compared = 0
    for (name, _), a, b, c in zip(net.named_parameters(), whole, sharded, fp32):
        size = c.abs().max()
        if a.abs().max() == 0 or size < 1e-6:           # below what fp16 (scaled) carries well
            continue
        compared += 1
        assert (a - b).abs().max() <= 1e-2 * a.abs().max(), name
        assert (b / 1024 - c).abs().max() <= 0.2 * size, name   # fp16's rounding: up to ~10 % here
    assert compared > 0.4 * len(fp32)                     # 46 of RLFN's 114 at this init


def test_plan_says_why_it_does_not_shard():
    cpu, rlfn = torch.device("cpu"), build_net("rlfn")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_shards.plan("auto", cpu, rlfn, 16).shards == 2
        assert "auto: one per torch thread" in cpu_shards.plan("auto", cpu, rlfn, 16).reason
        assert cpu_shards.plan(4, cpu, rlfn, 3).shards == 3                  # never more than the batch
        assert cpu_shards.plan("auto", cpu, rlfn, 1).reason == "one shard: a batch of one image"
        assert cpu_shards.plan(1, cpu, rlfn, 16).shards == 1
        assert "on cuda" in cpu_shards.plan("auto", torch.device("cuda"), rlfn, 16).reason
        assert "DDP over 2 processes" in cpu_shards.plan("auto", cpu, rlfn, 16, world=2).reason
        assert "torch.compile" in cpu_shards.plan("auto", cpu, rlfn, 16, compiled=True).reason
        dropout = nn.Sequential(rlfn, nn.Dropout(0.1))
        blocked = cpu_shards.plan("auto", cpu, dropout, 16)
        assert blocked.shards == 1 and "1 is Dropout(p=0.1)" in blocked.reason
        timm = nn.Sequential(rlfn, TimmDropPath(0.1))
        assert "(DropPath) draws from torch's global generator" in cpu_shards.plan("auto", cpu, timm, 16).reason
        # SwinIR's and HAT's stochastic depth draws from the shard's generator: it shards
        assert cpu_shards.plan("auto", cpu, build_net("swinir_s", **SMALL_SWINIR), 16).shards == 2
        torch.set_num_threads(1)
        assert cpu_shards.plan("auto", cpu, rlfn, 16).reason == "one shard: one torch thread"
    finally:
        torch.set_num_threads(threads)
    for bad in (0, -1, "two", True, 1.5):
        with pytest.raises(PipelineError, match="train.cpu_shards must be 'auto' or an integer >= 1"):
            cpu_shards.plan(bad, cpu, rlfn, 16)


def test_drop_path_draws_what_timms_does():
    """Without a thread generator the nets' DropPath takes the same numbers from the global
    generator as timm's (so unsharded runs are unchanged); with one, that generator's."""
    from pipeline.nets.drop_path import DropPath, thread_generator

    x = torch.ones(64, 3, 4, 4)
    ours, theirs = DropPath(0.3).train(), TimmDropPath(0.3).train()
    torch.manual_seed(5)
    a = ours(x)
    torch.manual_seed(5)
    assert torch.equal(a, theirs(x))
    with thread_generator(torch.Generator().manual_seed(7)):
        b = ours(x)
    with thread_generator(torch.Generator().manual_seed(7)):
        assert torch.equal(b, ours(x))
    assert torch.allclose(a.unique(), torch.tensor([0.0, 1 / 0.7]))
