"""Our SwinIR is the official one: it loads a checkpoint in the official release layout
strictly (derived buffers checked and consumed, never silently dropped) and reproduces
the official fp32 outputs (../shared/fixtures, made by the authors' code)."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.nets import build_net
from pipeline.weights import load_weights

pytestmark = [pytest.mark.shared, pytest.mark.usefixtures("torch_one_thread")]
DERIVED = ("attn_mask", "relative_position_index")  # buffers computed from the config


@pytest.fixture(scope="module")
def fixture_files(swinir_fixture):
    ckpt, io = swinir_fixture
    return ckpt, torch.load(ckpt, map_location="cpu", weights_only=True)["params"], io


@pytest.fixture(scope="module")
def official_net(fixture_files):
    ckpt, _, io = fixture_files
    return load_weights(build_net("swinir", **io["config"]), ckpt).eval()


def test_every_key_of_the_release_layout_is_used(fixture_files, official_net):
    _, params, _ = fixture_files
    learnt = {k for k in params if not k.endswith(DERIVED)}
    derived = set(params) - learnt
    assert set(official_net.state_dict()) == learnt
    # one index per attention, one mask per shifted block (every other block)
    assert sum(k.endswith("relative_position_index") for k in derived) == 24
    assert sum(k.endswith("attn_mask") for k in derived) == 12
    for k in learnt:
        assert torch.equal(official_net.state_dict()[k], params[k]), k


def test_swinir_s_preset_equals_the_fixture_config(fixture_files, official_net):
    _, params, io = fixture_files
    preset = load_weights(build_net("swinir_s"), {"params": params})
    x = io["inputs"][1][..., :16, :24]  # small: the point is equality, not the size
    with torch.no_grad():
        assert torch.equal(preset.eval()(x), official_net(x))


@pytest.mark.parametrize("i", range(4))
def test_outputs_match_the_official_implementation(fixture_files, official_net, i):
    _, _, io = fixture_files
    x, expected = io["inputs"][i], io["outputs"][i]
    with torch.no_grad():
        out = official_net(x)
    assert out.shape == expected.shape  # 4x the input, odd sizes included (37x53)
    assert (out - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("key,corrupt", [
    ("layers.0.residual_group.blocks.0.attn.relative_position_index", lambda t: t.flip(0)),
    ("layers.2.residual_group.blocks.3.attn_mask", lambda t: torch.zeros_like(t)),
])
def test_a_wrong_derived_buffer_is_refused(fixture_files, key, corrupt):
    _, params, io = fixture_files
    bad = dict(params, **{key: corrupt(params[key])})
    with pytest.raises(PipelineError, match=key.replace(".", "\\.")):
        load_weights(build_net("swinir", **io["config"]), {"params": bad})


def test_a_checkpoint_for_another_img_size_is_refused(fixture_files):
    ckpt, _, io = fixture_files
    with pytest.raises(PipelineError, match="attn_mask"):
        load_weights(build_net("swinir", **{**io["config"], "img_size": 48}), ckpt)


def test_a_missing_learnt_key_is_refused(fixture_files):
    _, params, io = fixture_files
    bad = {k: v for k, v in params.items() if k != "layers.3.conv.bias"}
    with pytest.raises(PipelineError, match="missing layers.3.conv.bias"):
        load_weights(build_net("swinir", **io["config"]), {"params": bad})
