"""The public import path of weight loading: `from pipeline.weights import load_weights`.

`load_weights(net, path_or_name)` takes the official checkpoint layouts (`{'params': ...}`,
`{'params_ema': ...}`, a bare state_dict, a `module.` prefix) and the pipeline's own
checkpoints, strictly; `load_pretrained` also leaves named modules initialised afresh. They
live in `pipeline.core.weights`, with finding, downloading and verifying the files.
"""
from pipeline.core.weights import LoadReport, load_pretrained, load_weights, resolve_weights

__all__ = ["LoadReport", "load_pretrained", "load_weights", "resolve_weights"]
