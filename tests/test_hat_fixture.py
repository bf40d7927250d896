"""Our HAT is the official one: it loads a checkpoint in the official release layout
(`params_ema`) strictly, the two derived index buffers checked and consumed, and
reproduces the official fp32 outputs, reflect padding included (../shared/fixtures, made
by the authors' code)."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.nets import build_net
from pipeline.nets.hat import HAT
from pipeline.weights import load_weights

pytestmark = [pytest.mark.shared, pytest.mark.usefixtures("torch_one_thread")]
DERIVED = ("relative_position_index_SA", "relative_position_index_OCA")


@pytest.fixture(scope="module")
def fixture_files(hat_fixture):
    ckpt, io = hat_fixture
    return ckpt, torch.load(ckpt, map_location="cpu", weights_only=True)["params_ema"], io


@pytest.fixture(scope="module")
def official_net(fixture_files):
    ckpt, _, io = fixture_files
    return load_weights(build_net("hat", **io["config"]), ckpt).eval()


def test_every_key_of_the_release_layout_is_used(fixture_files, official_net):
    _, params, _ = fixture_files
    assert set(DERIVED) <= set(params)
    learnt = set(params) - set(DERIVED)
    assert set(official_net.state_dict()) == learnt
    for k in learnt:
        assert torch.equal(official_net.state_dict()[k], params[k]), k
    for k in DERIVED:   # what this configuration computes is what the official code saved
        assert torch.equal(getattr(official_net, k), params[k]), k


@pytest.mark.parametrize("i", range(4))
def test_outputs_match_the_official_implementation(fixture_files, official_net, i):
    _, _, io = fixture_files
    x, expected = io["inputs"][i], io["outputs"][i]
    with torch.no_grad():
        out = official_net(x)
    assert out.shape == expected.shape  # 4x the input, sizes off the window included (27x41, 51x17)
    assert (out - expected).abs().max().item() < 1e-5


def test_hat_s_preset_is_the_fixture_config_with_six_groups(fixture_files):
    _, params, io = fixture_files
    preset = build_net("hat_s", depths=[6, 6], num_heads=[6, 6])
    assert isinstance(preset, HAT) and preset.scale == 4
    load_weights(preset, {"params_ema": params})   # strictly: the same module tree
    full = build_net("hat_s")
    assert len(full.layers) == 6 and sum(p.numel() for p in full.parameters()) == pytest.approx(9.6e6, rel=0.03)


@pytest.mark.parametrize("key,corrupt", [
    ("relative_position_index_SA", lambda t: t.flip(0)),
    ("relative_position_index_OCA", lambda t: t[:, :400]),
])
def test_a_wrong_derived_buffer_is_refused(fixture_files, key, corrupt):
    _, params, io = fixture_files
    bad = dict(params, **{key: corrupt(params[key])})
    with pytest.raises(PipelineError, match=key):
        load_weights(build_net("hat", **io["config"]), {"params_ema": bad})


def test_a_checkpoint_for_another_overlap_is_refused(fixture_files):
    ckpt, _, io = fixture_files
    with pytest.raises(PipelineError, match="do not fit HAT, e.g. layers.0.residual_group.overlap_attn"):
        load_weights(build_net("hat", **{**io["config"], "overlap_ratio": 0.25}), ckpt)


def test_a_missing_learnt_key_is_refused(fixture_files):
    _, params, io = fixture_files
    key = "layers.1.residual_group.overlap_attn.relative_position_bias_table"
    bad = {k: v for k, v in params.items() if k != key}
    with pytest.raises(PipelineError, match=f"missing {key}"):
        load_weights(build_net("hat", **io["config"]), {"params_ema": bad})


@pytest.mark.parametrize("args,message", [
    ({"upscale": 5}, "2\\^n and 3"),
    ({"upsampler": "pixelshuffledirect"}, "unsupported"),
    ({"img_size": 16, "window_size": 16}, "must exceed window_size"),
])
def test_unsupported_settings_are_refused(args, message):
    with pytest.raises(PipelineError, match=message):
        build_net("hat", **{"window_size": 8, **args})
