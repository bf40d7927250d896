"""`python -m pipeline <command>`: one entry point for every stage and tool.

Each command lives in its own module, which defines `add_arguments(parser)` and
`main(args)`. Modules are imported only when their command runs, so `--help` is fast.
The commands that run nets (`NET_COMMANDS`) first switch on the CPU speed-ups that
`SR_CPU_ACCEL` names (`pipeline.accel`); the others never import torch for them.
A PipelineError (bad input, a held lock, a full disk) prints one line and exits 1;
Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# command -> (module, one-line help)
COMMANDS = {
    "demo-data": ("pipeline.tools.demo_data", "build a demo competition (train.zip, evaluation.zip, answers)"),
    "unzip": ("pipeline.stages.s00_unzip", "stage 00: validate and extract the competition zips"),
    "degradation": ("pipeline.tools.degradation_probe", "which downscaler made the low-res images (after stage 00)"),
    "folds": ("pipeline.stages.s01_folds", "stage 01: split training scenes into K balanced folds"),
    "train": ("pipeline.stages.s02_train", "stage 02: train one fold of one seed"),
    "oof": ("pipeline.stages.s03_oof", "stage 03: out-of-fold competition SSIM"),
    "ensemble": ("pipeline.stages.s04_ensemble", "stage 04: fold x seed ensemble with TTA on the test set"),
    "submission": ("pipeline.stages.s05_submission", "stage 05: check and zip the predictions"),
    "blend": ("pipeline.tools.blend", "fit blend weights over experiments' out-of-fold predictions"),
    "predict": ("pipeline.tools.predict", "super-resolve images with a net, weights or checkpoints"),
    "score": ("pipeline.tools.score", "competition SSIM of a submission against answers"),
    "benchmark-sr": ("pipeline.tools.benchmark_sr", "Y-PSNR / Y-SSIM on standard SR test sets (paper protocol)"),
    "weights": ("pipeline.tools.weights", "find, download and verify pretrained weights"),
    "bench": ("pipeline.tools.bench", "speed and memory benchmarks"),
    "report": ("pipeline.tools.report", "static HTML report of the workdir -> reports/index.html"),
    "ablation": ("pipeline.tools.ablation", "the ablation table of a benchmark work folder, and its default submission"),
    "benchmark-aerial": ("pipeline.tools.benchmark_aerial", "the real aerial benchmark end to end (needs ../shared)"),
    "gpu-check": ("pipeline.tools.gpu_check", "prove a GPU machine: training, resume, torchrun, stages 03-04, speed"),
    "lb": ("pipeline.tools.ledger", "record a zip's public leaderboard score, or print the submissions ledger"),
}
# commands that train or run nets in this process
NET_COMMANDS = {"train", "oof", "ensemble", "predict", "benchmark-sr", "bench", "report", "gpu-check"}


def _format_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    from pipeline.core.errors import PipelineError

    warnings.formatwarning = _format_warning
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_main=module.main)
    args = parser.parse_args(argv)
    try:
        if args.command in NET_COMMANDS:
            from pipeline import accel
            accel.enable()   # the CPU speed-ups SR_CPU_ACCEL switches on (memory, attention, jobs)
        return int(args._main(args) or 0)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # out of space outside the atomic writes (which say it themselves)
        from pipeline.core.io import NO_SPACE
        if exc.errno not in NO_SPACE:
            raise
        print(f"error: {exc.filename or 'writing a file'}: {NO_SPACE[exc.errno]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left; rerun to pick up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
