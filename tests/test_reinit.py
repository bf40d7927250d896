"""model.reinit: pretrained weights carried to another scale. Every tensor of the file
outside the listed modules loads (and must fit, by name and shape); the listed modules
stay as built (fresh); a prefix that names no module and a misfit outside the list are
refused by name."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.nets import build_net
from pipeline.weights import load_pretrained, load_weights

# net -> (constructor args without the scale, the module that depends on the scale, scales)
NETS = {
    "rlfn": ({}, "upsampler", (4, 5)),
    "rfdn": ({}, "upsampler", (4, 5)),
    "safmn": ({"n_blocks": 2}, "to_img", (4, 5)),
    "swinir_s": ({"depths": [2], "num_heads": [6]}, "upsample", (4, 5)),
    "hat": ({"embed_dim": 24, "depths": [2], "num_heads": [2], "window_size": 4, "img_size": 16,
             "compress_ratio": 3, "squeeze_factor": 4}, "upsample", (4, 2)),
}


def _perturbed_file(name: str, args: dict, scale: int) -> dict:
    """The state_dict of a net at `scale`, every tensor moved off its initialisation."""
    torch.manual_seed(0)
    state = build_net(name, scale=scale, **args).state_dict()
    return {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("name", NETS)
def test_pretrained_at_another_scale_loads_all_but_the_reinit_module(name):
    args, module, (trained, wanted) = NETS[name]
    file = _perturbed_file(name, args, trained)
    net = build_net(name, scale=wanted, **args)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PipelineError, match=rf"(do not fit .* e\.g\.|unexpected) {module}\."):
        load_weights(build_net(name, scale=wanted, **args), file)       # without reinit: refused
    report = load_pretrained(net, {"params": file}, reinit=[module])
    inside = [k for k in fresh if k.startswith(module + ".")]
    assert inside and report.loaded == len(fresh) - len(inside)
    assert report.reinitialised == [module]
    assert report.unused == sum(k.startswith(module + ".") for k in file)
    for k, v in net.state_dict().items():
        expected = fresh[k] if k in inside else file[k]
        assert torch.equal(v, expected), k
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8 * wanted, 8 * wanted)


def test_a_fitting_module_listed_in_reinit_is_fresh_as_a_whole():
    file = _perturbed_file("rlfn", {}, 4)
    net = build_net("rlfn")
    fresh = net.conv_2.weight.clone()
    report = load_pretrained(net, file, reinit=["conv_2"])
    assert torch.equal(net.conv_2.weight, fresh) and report.unused == 2
    assert torch.equal(net.upsampler[0].weight, file["upsampler.0.weight"])


def test_a_prefix_matching_no_module_is_refused():
    file = _perturbed_file("rlfn", {}, 4)
    with pytest.raises(PipelineError, match="model.reinit: 'upsample' matches no module of RLFN "
                                            r"\(its modules: block_1"):
        load_pretrained(build_net("rlfn", scale=5), file, reinit=["upsample"])   # a prefix of 'upsampler'


def test_a_misfit_outside_the_listed_modules_is_refused_by_name():
    file = _perturbed_file("rlfn", {}, 4)
    with pytest.raises(PipelineError, match=r"2 tensors do not fit RLFN, e\.g\. upsampler\.0\.weight "
                                            r"\(48, 52, 3, 3\) vs \(75, 52, 3, 3\)"):
        load_pretrained(build_net("rlfn", scale=5), file, reinit=["conv_1"])


def test_a_key_missing_outside_the_listed_modules_is_refused():
    file = _perturbed_file("rlfn", {}, 4)
    del file["block_2.c1_r.bias"]
    with pytest.raises(PipelineError, match="missing block_2.c1_r.bias"):
        load_pretrained(build_net("rlfn", scale=5), file, reinit=["upsampler"])


def test_file_keys_unknown_to_the_net_are_allowed_only_inside_the_listed_modules():
    args, _, _ = NETS["hat"]
    file = _perturbed_file("hat", args, 4)          # x4 HAT: upsample.0 and upsample.2
    with pytest.raises(PipelineError, match="unexpected upsample.2.weight"):
        load_pretrained(build_net("hat", scale=2, **args), file, reinit=["conv_last"])
    report = load_pretrained(build_net("hat", scale=2, **args), file, reinit=["upsample"])
    assert report.unused == 4                       # upsample.0 fits but is listed: fresh too
