"""Every registered net keeps the contract (float NCHW [0,1] in, x`scale` out, attribute
`scale`), trains, and the pretrained ones load their release files strictly and beat bicubic."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.nets import available_nets, build_net
from pipeline.weights import load_weights

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# small configurations keep the big nets fast; every other net is built with defaults
SMALL_SWINIR = dict(embed_dim=12, depths=[2, 2], num_heads=[2, 2], window_size=4, img_size=16, mlp_ratio=2)
SMALL_ARGS = {"swinir": dict(SMALL_SWINIR, upsampler="pixelshuffle")}
# the HAT presets at 10-40M parameters: every part kept (groups, shifted blocks, CAB, OCAB), small
SMALL_HAT = dict(embed_dim=12, depths=[2], num_heads=[2], window_size=4, img_size=16, compress_ratio=3,
                 squeeze_factor=4)
SMALL_ARGS.update({name: SMALL_HAT for name in ("hat_s", "hat", "hat_l")})
# release files of the pretrained nets, in ../shared/weights
RELEASE_FILES = {"rlfn": "rlfn_x4.pth", "rlfn_s": "rlfn_s_x4.pth", "rfdn": "RFDN_AIM.pth",
                 "safmn": "team15_SAFMN.pth"}


def small_net(name: str, **kwargs):
    return build_net(name, **{**SMALL_ARGS.get(name, {}), **kwargs})


def test_registry_lists_the_designed_nets():
    assert {"bicubic", "espcn", "srcnn", "rlfn", "rlfn_s", "swinir", "swinir_s", "hat_s", "hat", "hat_l"} \
        <= set(available_nets())
    with pytest.raises(PipelineError, match="unknown net 'nope'"):
        build_net("nope")


@pytest.mark.parametrize("name", available_nets())
@pytest.mark.parametrize("scale", [2, 4])
def test_contract_shape_scale_dtype(name, scale):
    net = small_net(name, scale=scale).eval()
    assert net.scale == scale and isinstance(net.scale, int)
    x = torch.rand(2, 3, 17, 23)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, 17 * scale, 23 * scale)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("name", [n for n in available_nets() if n != "bicubic"])
def test_trainable_gradients_reach_the_first_layer(name):
    net = small_net(name, scale=2).train()
    x = torch.rand(2, 3, 16, 16)
    loss = F.l1_loss(net(x), torch.rand(2, 3, 32, 32))
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads)
    first = next(net.parameters())
    assert first.grad.abs().sum() > 0


def test_bicubic_is_torch_bicubic_clamped():
    x = torch.rand(1, 3, 9, 11)
    y = build_net("bicubic", scale=3)(x)
    ref = F.interpolate(x, scale_factor=3, mode="bicubic", align_corners=False)
    assert torch.equal(y, ref.clamp(0, 1))
    assert ref.min() < 0 or ref.max() > 1  # random input overshoots: the clamp matters
    assert list(build_net("bicubic").parameters()) == []


def test_espcn_is_the_competition_baseline():
    net = build_net("espcn", scale=4)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [(3, 64, 5), (64, 32, 3), (32, 48, 3)]
    assert isinstance(net.features[1], torch.nn.Tanh)
    assert isinstance(build_net("espcn", activation="relu").features[1], torch.nn.ReLU)
    with pytest.raises(PipelineError, match="activation"):
        build_net("espcn", activation="gelu")


def test_srcnn_is_9_1_5_on_bicubic_input():
    net = build_net("srcnn", scale=4)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs] == [(64, 9), (32, 1), (3, 5)]
    # with every layer set to pass channels 0..2 straight through (centre taps 1), the
    # output is the ReLU of the bicubic upsampling: the net works on the bicubic image
    with torch.no_grad():
        for c in convs:
            c.weight.zero_()
            c.bias.zero_()
            k = c.kernel_size[0] // 2
            for i in range(3):
                c.weight[i, i, k, k] = 1.0
    x = torch.rand(1, 3, 8, 8)
    expected = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False).clamp(min=0)
    assert torch.allclose(net(x), expected, atol=1e-6)


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (7, 9), (13, 17), (16, 16), (21, 8)])
def test_swinir_any_input_size(hw):
    net = build_net("swinir", upscale=3, upsampler="pixelshuffledirect", **SMALL_SWINIR).eval()
    with torch.no_grad():
        y = net(torch.rand(1, 3, *hw))
    assert y.shape == (1, 3, hw[0] * 3, hw[1] * 3) and torch.isfinite(y).all()


def test_swinir_padding_is_reflection_cropped_back():
    """On an input already a multiple of the window nothing is padded; an odd-sized input
    gives exactly the output of its reflect-padded version, cropped."""
    net = build_net("swinir", upscale=2, upsampler="pixelshuffledirect", **SMALL_SWINIR).eval()
    x = torch.rand(1, 3, 10, 7)
    padded = F.pad(x, (0, 1, 0, 2), mode="reflect")  # to 12 x 8, multiples of window 4
    with torch.no_grad():
        assert torch.allclose(net(x), net(padded)[..., :20, :14], atol=1e-6)


@pytest.mark.parametrize("upsampler,scale", [("pixelshuffle", 2), ("pixelshuffle", 3), ("pixelshuffle", 4),
                                             ("pixelshuffle", 8), ("pixelshuffledirect", 4),
                                             ("nearest+conv", 2), ("nearest+conv", 4), ("", 1)])
@pytest.mark.parametrize("resi", ["1conv", "3conv"])
def test_swinir_upsamplers_and_scales(upsampler, scale, resi):
    net = build_net("swinir", upscale=scale, upsampler=upsampler, resi_connection=resi, **SMALL_SWINIR).eval()
    assert net.scale == scale
    with torch.no_grad():
        assert net(torch.rand(2, 3, 9, 12)).shape == (2, 3, 9 * scale, 12 * scale)


def test_swinir_refuses_unsupported_settings():
    with pytest.raises(PipelineError, match="2\\^n and 3"):
        build_net("swinir", upscale=5, upsampler="pixelshuffle")
    with pytest.raises(PipelineError, match="nearest\\+conv"):
        build_net("swinir", upscale=3, upsampler="nearest+conv")
    with pytest.raises(PipelineError, match="unknown"):
        build_net("swinir", upsampler="bilinear")
    with pytest.raises(PipelineError, match="disagree"):
        build_net("swinir", upscale=4, scale=2)


def test_swinir_s_preset_is_the_lightweight_release_config():
    net = build_net("swinir_s")
    assert net.scale == 4 and net.window_size == 8 and net.upsampler == "pixelshuffledirect"
    assert len(net.layers) == 4 and all(len(layer.residual_group.blocks) == 6 for layer in net.layers)
    assert net.conv_first.out_channels == 60
    # the paper's 897K for SwinIR-S x4 leaves out the relative position bias tables
    counted = sum(p.numel() for n, p in net.named_parameters() if "relative_position_bias_table" not in n)
    assert counted == 897_228
    assert build_net("swinir_s", scale=2).scale == 2


def test_swinir_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_net("swinir", upscale=2, upsampler="pixelshuffledirect", **SMALL_SWINIR)
    ckpt = build_net("swinir", upscale=2, upsampler="pixelshuffledirect", use_checkpoint=True, **SMALL_SWINIR)
    ckpt.load_state_dict(plain.state_dict())
    plain.eval(), ckpt.eval()  # no drop-path randomness
    x = torch.rand(1, 3, 8, 8)
    for net in (plain, ckpt):
        net(x).square().mean().backward()
    assert torch.allclose(plain.conv_first.weight.grad, ckpt.conv_first.weight.grad, atol=1e-6)


def test_rlfn_small_inputs_are_padded_not_refused():
    net = build_net("rlfn").eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 5, 40)).shape == (1, 3, 20, 160)


def _real_lr_hr():
    from pipeline.core.io import read_image
    root = paths.SHARED_DATA / "sr_benchmarks" / "Set5"
    lr = read_image(root / "LR_bicubic" / "X4" / "birdx4.png")
    hr = read_image(root / "HR" / "bird.png")
    to = lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    return to(lr), to(hr)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(F.mse_loss(a.clamp(0, 1), b)))


@pytest.mark.shared
@pytest.mark.parametrize("name", [n for n in RELEASE_FILES if n in available_nets()])
def test_release_weights_load_strictly_and_beat_bicubic(shared, name):
    net = load_weights(build_net(name), paths.SHARED_WEIGHTS / RELEASE_FILES[name]).eval()
    lr, hr = _real_lr_hr()
    with torch.no_grad():
        sr = net(lr)
    bicubic = build_net("bicubic")(lr)
    assert sr.shape == hr.shape
    assert 0.99 < float(sr.mean() / hr.mean()) < 1.01  # same range as the truth: [0,1], not 0..255
    assert _psnr(sr, hr) > _psnr(bicubic, hr) + 2.0  # RGB PSNR on bird: ~+3.5 dB


@pytest.mark.shared
def test_release_weights_refused_by_the_wrong_net(shared):
    with pytest.raises(PipelineError, match="do not fit"):
        load_weights(build_net("rlfn_s"), paths.SHARED_WEIGHTS / "rlfn_x4.pth")


# --- VDSR ------------------------------------------------------------------------------------------

def test_vdsr_is_the_papers_20_layers_of_64_channels():
    net = build_net("vdsr")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20 and all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert [c.out_channels for c in convs] == [64] * 19 + [3] and convs[0].in_channels == 3
    assert sum(isinstance(m, torch.nn.ReLU) for m in net.modules()) == 19


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_vdsr_is_the_bicubic_upscale_plus_its_residual(scale):
    """Any scale; with its last layer zero the output is exactly the bicubic upscale (not
    clamped), and with it non-zero the residual is added to that upscale."""
    torch.manual_seed(0)
    net = build_net("vdsr", scale=scale).eval()
    x = torch.rand(2, 3, 9, 13)
    up = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    with torch.no_grad():
        assert net(x).shape == (2, 3, 9 * scale, 13 * scale)
        last = net.body[-1]
        assert not torch.allclose(net(x), up, atol=1e-3)
        last.weight.zero_()
        last.bias.fill_(0.25)
        assert torch.allclose(net(x), up + 0.25, atol=1e-6)
        last.bias.zero_()
        assert torch.equal(net(x), up)


def test_vdsr_training_steps_lower_the_loss_and_its_checkpoint_loads_strictly(tmp_path):
    from pipeline.core.checkpoints import save_checkpoint
    from pipeline.nets import net_from_checkpoint
    from pipeline.weights import load_weights

    torch.manual_seed(1)
    net = build_net("vdsr", scale=2, depth=6, channels=16).train()
    hr = F.interpolate(torch.rand(4, 3, 8, 8), scale_factor=4, mode="bilinear", align_corners=False)
    lr = F.avg_pool2d(hr, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = F.l1_loss(net(lr), hr)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    path = tmp_path / "best.pt"
    save_checkpoint(path, net_name="vdsr", net_args={"scale": 2, "depth": 6, "channels": 16},
                    state_dict=net.state_dict(), exp="x", seed=0, fold=0, step=30, val_ssim=None)
    again = net_from_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(again(lr), net.eval()(lr))
    with pytest.raises(PipelineError, match=r"best.pt: 2 tensors do not fit VDSR, e.g. body.10.weight"):
        load_weights(build_net("vdsr", scale=2, depth=8, channels=16), path)
