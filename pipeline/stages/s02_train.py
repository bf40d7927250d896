"""Stage 02: train one fold of one seed of an experiment.

    data/interim + data/folds.csv + pipeline/configs/<exp>.yaml
      -> models/<exp>/seed<s>/fold<f>/{best.pt, last.pt, log.csv, curves.png, config.yaml,
                                        TensorBoard events.out.tfevents.*}

    --fold all -> models/<exp>/seed<s>/full/ (the same artifacts; best.pt: the last checkpoint's weights)

The loop is `pipeline.train.loop`: everything comes from the experiment config, a killed run
resumes exactly (`--resume auto`), a finished run is skipped unless `--force`. `--fold all` is
the full-data fit: every training scene, no validation, at the schedule the folds' CV chose.
Started by `torchrun --nproc_per_node N` the run uses DDP across the N processes.
"""
from __future__ import annotations

import argparse

from pipeline.core.config import add_set_argument, load_config
from pipeline.core.paths import FULL
from pipeline.train.loop import train


def fold_argument(text: str) -> int | str:
    """A fold number, or `all` (paths.FULL)."""
    if text == FULL:
        return FULL
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a fold number nor 'all'") from None


def add_arguments(parser) -> None:
    parser.add_argument("--exp", default="demo", help="experiment name (pipeline/configs/<exp>.yaml) or YAML path")
    parser.add_argument("--fold", type=fold_argument, required=True,
                        help="held-out fold (validation), or 'all': a full-data fit on every training scene")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--resume", choices=("auto", "never"), default="auto",
                        help="auto: continue from last.pt when there is one (default); never: start over")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (= --set train.steps=N)")
    parser.add_argument("--force", action="store_true", help="retrain even a finished run, from scratch")
    add_set_argument(parser)


def main(args) -> int:
    steps = [f"train.steps={args.steps}"] if args.steps is not None else []
    cfg = load_config(args.exp, args.overrides + steps)
    train(cfg, args.fold, args.seed, resume=args.resume, force=args.force)
    return 0
