"""Every fast path (pipeline/nets/fast) against its reference: same weights and keys, same
outputs (fp32 within 1e-4; bf16 competition SSIM within 5e-4 of fp32's), caches right across
input sizes and weight changes; and a smoke run of `bench`. The CPU speed-ups the fast paths
can hand work to are tests/test_accel.py's."""
from __future__ import annotations

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import missing

from pipeline.core import paths
from pipeline.core.io import read_image
from pipeline.core.metrics import competition_ssim
from pipeline.infer.ensemble import predict_scene, prepare_for_inference
from pipeline.infer.precision import choose
from pipeline.nets import available_nets, build_net
from pipeline.nets.fast import Fp32Conv2d, edge_convs
from pipeline.nets.fast import hat as hat_fast
from pipeline.nets.fast.swinir import FastSwinIR, add_drop_path, make_fast, make_reference
from pipeline.nets.fast.switch import cached_orders, reorder
from pipeline.nets.fast.windows import WindowOrders
from pipeline.nets.hat import HAT
from pipeline.nets.swinir import SwinIR
from pipeline.tools.bench import COLUMNS
from pipeline.tools.demo_data import downscale
from pipeline.weights import load_weights

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


def test_fast_path_trains_with_the_reference_gradients():
    torch.manual_seed(3)
    ref = build_net("swinir_s", depths=[2, 2], num_heads=[6, 6], drop_path_rate=0.0).train()
    fast = make_fast(copy.deepcopy(ref)).train()
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 64, 64)
    for net in (ref, fast):
        (net(x) - y).abs().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6), name


def test_drop_path_drops_whole_images():
    """z + DropPath(y) in the (window, image, cell) layout: an image's path kept or dropped whole."""
    blk = build_net("swinir_s", drop_path_rate=0.5).layers[3].residual_group.blocks[5].train()
    torch.manual_seed(0)
    b, cells = 8, 64
    y = torch.ones(3 * b * cells, 60)              # (window, image, cell) layout
    z = torch.full_like(y, 2.0)
    out = add_drop_path(blk, z, y, b, cells).view(3, b, cells, 60)
    keep = 1 - blk.drop_path.drop_prob
    per_image = out.permute(1, 0, 2, 3).reshape(b, -1)
    for image in per_image:                        # an image is kept or dropped as a whole
        assert image.unique().tolist() in ([2.0], [2 + 1 / keep])
    assert 0 < (per_image[:, 0] == 2).sum() < b
    assert torch.equal(add_drop_path(blk.eval(), z, y, b, cells), z + y)


def test_reorder_differentiates_as_index_select():
    """The gather between window orders has index_select's gradient (taken through the inverse
    permutation instead of a scatter), in fp32 and bf16."""
    net = make_fast(build_net("swinir_s", depths=[2, 2], num_heads=[6, 6]))
    orders = cached_orders(net, 2, 16, 16, torch.device("cpu"), WindowOrders)
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


def test_hat_fast_path_trains_with_the_reference_gradients():
    ref, fast = _hat_pair(drop_path_rate=0.0)
    x, y = torch.rand(2, 3, 10, 14), torch.rand(2, 3, 40, 56)   # padded to 12x16
    for net in (ref.train(), fast.train()):
        (net(x) - y).abs().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6), name


def test_hat_drop_path_drops_whole_images():
    blk = build_net("hat", **{**SMALL_HAT, "drop_path_rate": 0.5}).layers[1].residual_group.blocks[1].train()
    torch.manual_seed(0)
    b = 8
    out = hat_fast.drop_path(blk, torch.ones(b * 30, 24), b).view(b, -1)
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
    """Under bf16 autocast each edge convolution (the ones that read or write the image) puts
    out float32 and every other convolution bf16, on the fast path; on the reference path all
    of them bf16."""
    torch.manual_seed(6)
    for name, n_edges in (("rlfn", 3), ("swinir_s", 3), ("hat_s", 3)):
        net = build_net(name).eval()
        edges = edge_convs(net)
        assert len(edges) == n_edges
        dtypes = {}
        for conv in (m for m in net.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.register_forward_hook(lambda m, _, out: dtypes.__setitem__(m, out.dtype))
        x = torch.rand(1, 3, 16, 16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            net(x)
            assert set(dtypes.values()) == {torch.bfloat16}, name           # the reference: all bf16
            dtypes.clear()
            prepare_for_inference(net, "cpu", "bf16")
            assert net(x).dtype == torch.float32
        assert all(dtypes[c] == torch.float32 for c in edges), name
        assert all(d == torch.bfloat16 for c, d in dtypes.items() if c not in edges), name
        assert len(dtypes) > n_edges


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
        missing("shared aerial tiles absent")
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
            assert bf16 != fp32, type(net).__name__          # bf16 reached the computation


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
    assert loader["loader_s"] > 0 and loader["median_s"] > 0          # how long each takes: make bench's figures
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
    assert probe["cores"] == 2 and probe["alone"] > 0 and probe["together"] > 0
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
