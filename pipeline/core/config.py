"""Experiment configuration: `pipeline/configs/<exp>.yaml` over the defaults below.

An experiment file only states what differs from DEFAULTS. Every key must exist in
DEFAULTS: an unknown key (a typo that would otherwise be silently ignored) is refused
with its dotted name. Values of `model.args` are free-form (constructor arguments).

Command-line overrides (`--set train.steps=2000`, values parsed as YAML) go through the
same merge and the same refusals, after the file; the result is the run's config.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import paths
from pipeline.core.errors import PipelineError

# the key of a run's config.yaml recording what model.pretrained loaded (file, sha256, counts)
PRETRAINED_RECORD = "pretrained_loaded"

DEFAULTS: dict[str, Any] = {
    # Where training and inference run: auto (a GPU torch can use, else the CPU; never the CPU
    # silently beside GPUs torch cannot use), cpu, cuda or cuda:N (pipeline/core/device.py).
    "device": "auto",
    # Competition format: file patterns and scale (the 2023 Solafune contest used x5).
    "data": {
        "scale": 4,
        "train_low": "train_{i}_low.tif",
        "train_high": "train_{i}_high.tif",
        "test_low": "test_{i}_low.tif",
        "answer": "test_{i}_answer.tif",
        "n_folds": 5,
        "fold_seed": 0,
        # Largest image accepted, checked from the TIFF header before decoding (a zip bomb is
        # refused by name): 16x the competition's 1200x1500 scenes, 86 MB as uint8 RGB and
        # ~350 MB as float32 during validation; raise it for genuinely larger scenes.
        "max_pixels": 16 * 1200 * 1500,
        "groups": "groups.csv",      # id,group CSV in data/raw/: a group's scenes share a fold; null = off
        # External high-res images for training only (pipeline/data/extra.py): folders,
        # the kernel their low-res is made with (null: the degradation probe's), and the
        # share of crops drawn from them (null: in proportion to their pixels).
        "extra": None,
        "extra_kernel": None,
        "extra_weight": None,
    },
    "model": {
        "name": "rlfn",
        "args": {},                  # constructor kwargs for build_net(name, **args)
        "pretrained": None,          # weight file name (resolved via SR_WEIGHTS_DIR) or path
        "pretrained_required": True,  # missing file stops the run, never silently from scratch
        "reinit": [],                # module prefixes initialised afresh, not loaded (another scale's upsampler)
    },
    "train": {
        "steps": 2000,               # bounded: training always ends
        "batch_size": 16,
        "lr_patch": 32,              # LR crop side; HR crop is scale x this
        "optimizer": "madgrad",      # madgrad | adam
        "lr": 2.0e-4,
        "milestones": [0.6, 0.85],   # fractions of steps where the LR steps down
        "lr_factors": [1.0, 0.5, 0.1],  # LR multiplier before, between and after milestones
        "weight_decay": 0.0,
        "ema": 0.999,                # EMA decay of the weights; 0 disables
        "grad_clip": 1.0,            # max grad norm; 0 disables
        "precision": "auto",         # auto (what the hardware runs best) | bf16 | fp16 | fp32; pipeline/infer/precision.py
        "fast": True,                # the nets' fast paths (SwinIR/HAT window orders, channels-last convs); false: reference
        "compile": False,            # torch.compile the net (pays on GPUs; on 2 CPU cores it did not, docs/speed.md)
        "val_every": 200,
        "ckpt_every": 100,
        "val_tile": 0,               # validation tile side in LR pixels; 0 = whole scene
        "num_workers": "auto",       # DataLoader worker processes; auto: 0 on CPU, up to 4 on CUDA
        "cpu_shards": "auto",        # CPU: the batch split into shards trained on threads of their own; auto: one per thread
        "augment": {
            "dihedral": True,        # the 8 flips/rotations by 90 degrees
            "hue_saturation": 0.0,   # probability of a small hue/saturation shift
            "brightness_contrast": 0.0,  # probability of a small brightness/contrast change
            "cutmix": 0.0,           # probability of pasting a patch from another scene
        },
    },
    # Weighted loss terms (see losses.py); zero weights are skipped.
    "loss": {"ssim": 1.0, "l1": 0.0, "charbonnier": 0.0, "sobel": 0.0},
    "infer": {
        "tta": 8,                    # 1 or 8 dihedral views
        "tile": 0,                   # tile side in LR pixels; 0 = whole image
        "tile_overlap": 16,          # LR pixels shared by neighbouring tiles (feathered)
        "seeds": [0],                # seeds trained and ensembled
        "models": "folds",           # stage 04's nets: folds (every fold x seed), full (the full-data fits), both
        "precision": "fp32",         # fp32 | bf16 | fp16 | auto (bf16 moves the competition SSIM by up to ~5e-4)
        "batch": 8,                  # views/tiles per forward pass
    },
}


# Keys that never change what a run computes (how fast it goes, which inputs are accepted,
# which trained runs stage 04 uses): a resume or a finished run is not refused for them (the
# sample stream is the same with any number of workers; the pixel bound only refuses inputs
# before anything is trained; infer.models is read after training).
RUNTIME_KEYS = ("train.num_workers", "data.max_pixels", "device", "infer.models")


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2's floats: PyYAML (YAML 1.1) reads `1e-4` as a string, and a
    learning rate written so (in a file or in `--set train.lr=1e-4`) must be a number."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def _merge(base: dict, override: dict, where: str, source: Path | str) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        dotted = f"{where}.{key}" if where else key
        if key not in base:
            raise PipelineError(f"{source}: unknown config key '{dotted}'")
        if isinstance(base[key], dict) and dotted != "model.args":
            if not isinstance(value, dict):
                raise PipelineError(f"{source}: config key '{dotted}' must be a mapping")
            out[key] = _merge(base[key], value, dotted, source)
        elif isinstance(value, dict) and isinstance(base[key], (bool, int, float, str)):
            raise PipelineError(f"{source}: config key '{dotted}' is a value, not a mapping")
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_path(exp: str) -> Path:
    return paths.CONFIGS / f"{exp}.yaml"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.steps=2000` -> (["train", "steps"], 2000): the value is YAML (`[8, 8]`, `null`,
    `true`, `1e-4`, `adam`); an empty value is null."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise PipelineError(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. train.steps=2000")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise PipelineError(f"--set {item}: invalid YAML value ({str(exc).splitlines()[0]})") from None
    return [p.strip() for p in parts], value


def apply_overrides(cfg: dict[str, Any], items: list[str] | None) -> dict[str, Any]:
    """`cfg` with each `--set KEY=VALUE` of `items` applied in order (later ones win).

    Each override is merged exactly as a file's section is, so an unknown key is refused
    by name and a section cannot become a value. Below `model.args` (free-form) a key sets
    one constructor argument and keeps the others; `model.args={...}` replaces them all.
    """
    for item in items or []:
        parts, value = parse_override(item)
        if parts[:2] == ["model", "args"] and len(parts) > 2:
            args = copy.deepcopy(cfg.get("model", {}).get("args") or {})
            inner = args
            for key in parts[2:-1]:
                if not isinstance(inner.get(key), dict):
                    inner[key] = {}
                inner = inner[key]
            inner[parts[-1]] = value
            parts, value = parts[:2], args
        for key in reversed(parts):
            value = {key: value}
        exp = cfg.get("exp")
        cfg = _merge({k: v for k, v in cfg.items() if k != "exp"}, value, "", f"--set {item}")
        if exp is not None:
            cfg["exp"] = exp
    return cfg


def add_set_argument(parser) -> None:
    """The `--set KEY=VALUE` option of every command that reads an experiment config."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, parsed as YAML (repeatable): "
                             "--set train.steps=2000 --set loss.sobel=0.1")


def load_config(exp_or_path: str | Path, overrides: list[str] | None = None,
                _bases: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load an experiment by name (`pipeline/configs/<name>.yaml`) or by file path, with
    command-line `overrides` (`["train.steps=2000", ...]`) applied last.

    `base: <experiment>` (a file in the same folder) starts from that experiment instead
    of DEFAULTS, so a variant (an ablation) states only what it changes.
    """
    path = Path(exp_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = config_path(str(exp_or_path))
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in paths.CONFIGS.glob("*.yaml")))
        raise PipelineError(f"{path}: no such experiment config (known: {known})")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: top level must be a mapping")
    raw.pop("exp", None)  # a resolved config.yaml written by a run names its experiment
    raw.pop(PRETRAINED_RECORD, None)  # ... and what it loaded from model.pretrained
    start = DEFAULTS
    base = raw.pop("base", None)
    if base is not None:
        if path.resolve() in _bases:
            raise PipelineError(f"{path}: 'base' chain loops back to this file")
        base = str(base) if str(base).endswith((".yaml", ".yml")) else f"{base}.yaml"
        start = load_config(path.parent / base, _bases=_bases + (path.resolve(),))  # a sibling file
        start.pop("exp")
    cfg = _merge(start, raw, "", path)
    cfg["exp"] = path.stem
    cfg = apply_overrides(cfg, overrides)
    if not _bases:               # the experiment itself, not a base on the way to it
        check_values(cfg)
    return cfg


def dump_config(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


# --- value checks ------------------------------------------------------------------------------

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("madgrad", "adam")
TTA_VIEWS = (1, 2, 4, 8)


def check_values(cfg: dict[str, Any]) -> None:
    """Refuse a value no stage can use, in one line naming the key and what it may be: every
    number of the config (and the choices), where the config is read, before anything runs."""
    source = f"config '{cfg['exp']}'"

    def bad(key: str, problem: str, value: Any) -> PipelineError:
        return PipelineError(f"{source}: {key} {problem}, got {value!r}")

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

    def integer(key: str, value: Any, least: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise bad(key, "must be a positive integer" if least == 1 else f"must be an integer >= {least}", value)

    def at_least(key: str, value: Any, least: float = 0.0) -> None:
        if not number(value) or value < least:
            raise bad(key, f"must be a number >= {least:g}", value)

    def choice(key: str, value: Any, choices: tuple) -> None:
        if value not in choices:
            raise PipelineError(f"{source}: {key} '{value}' unknown ({', '.join(map(str, choices))})")

    device = str(cfg["device"]).lower()
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:") and device[5:].isdigit()):
        raise bad("device", "must be auto, cpu, cuda or cuda:N", cfg["device"])
    d = cfg["data"]
    integer("data.scale", d["scale"], 1)
    integer("data.n_folds", d["n_folds"], 2)
    integer("data.fold_seed", d["fold_seed"], 0)
    integer("data.max_pixels", d["max_pixels"], 1)
    share = d["extra_weight"]
    if share is not None and not (number(share) and 0 <= share <= 1):
        raise bad("data.extra_weight", "must be a share between 0 and 1 (or null: in proportion to pixels)", share)

    t = cfg["train"]
    for key in ("steps", "batch_size", "lr_patch", "val_every", "ckpt_every"):
        integer(f"train.{key}", t[key], 1)
    if not number(t["lr"]) or t["lr"] <= 0:
        raise bad("train.lr", "must be a number > 0", t["lr"])
    choice("train.optimizer", t["optimizer"], OPTIMIZERS)
    choice("train.precision", t["precision"], PRECISIONS)
    for key in ("fast", "compile"):
        if not isinstance(t[key], bool):
            raise bad(f"train.{key}", "must be true or false", t[key])
    ms, fs = t["milestones"], t["lr_factors"]
    if (not isinstance(ms, list) or not all(number(m) and 0 < m < 1 for m in ms)
            or any(a >= b for a, b in zip(ms, ms[1:]))):
        raise bad("train.milestones", "must be ascending fractions of the steps in (0, 1)", ms)
    if not isinstance(fs, list) or len(fs) != len(ms) + 1:
        raise bad("train.lr_factors", f"needs one factor more than milestones ({len(ms) + 1})", fs)
    if not all(number(f) and f > 0 for f in fs):
        raise bad("train.lr_factors", "must be numbers > 0", fs)
    if not number(t["ema"]) or not 0 <= t["ema"] < 1:
        raise bad("train.ema", "must be in [0, 1) (0 disables)", t["ema"])
    for key in ("grad_clip", "weight_decay"):
        at_least(f"train.{key}", t[key])
    integer("train.val_tile", t["val_tile"], 0)
    for key, least in (("num_workers", 0), ("cpu_shards", 1)):
        w = t[key]
        if w != "auto" and (isinstance(w, bool) or not isinstance(w, int) or w < least):
            raise bad(f"train.{key}", f"must be 'auto' or an integer >= {least}", w)
    for key, p in t["augment"].items():
        if key == "dihedral":
            if not isinstance(p, bool):
                raise bad("train.augment.dihedral", "must be true or false", p)
        elif not number(p) or not 0 <= p <= 1:
            raise bad(f"train.augment.{key}", "is a probability in [0, 1]", p)

    loss = cfg["loss"]
    for key, w in loss.items():
        at_least(f"loss.{key}", w)
    if not any(loss.values()):
        raise bad("loss", "needs a term with a weight > 0", loss)

    i = cfg["infer"]
    if i["tta"] not in TTA_VIEWS or isinstance(i["tta"], bool):
        raise bad("infer.tta", f"must be one of {', '.join(map(str, TTA_VIEWS))} (dihedral views)", i["tta"])
    integer("infer.tile", i["tile"], 0)
    integer("infer.tile_overlap", i["tile_overlap"], 0)
    if i["tile"] and 2 * i["tile_overlap"] > i["tile"]:
        raise bad("infer.tile_overlap", f"must be at most half the tile ({i['tile']})", i["tile_overlap"])
    integer("infer.batch", i["batch"], 1)
    choice("infer.precision", i["precision"], PRECISIONS)
    choice("infer.models", i["models"], tuple(paths.ENSEMBLE_RUNS))
    seeds = i["seeds"]
    if not isinstance(seeds, list) or not seeds or any(isinstance(x, bool) or not isinstance(x, int) or x < 0
                                                      for x in seeds):
        raise bad("infer.seeds", "must be a list of integers >= 0", seeds)
