"""`python -m pipeline score --submission ZIP_OR_DIR --answers DIR`: the competition score.

Prints each answer's competition SSIM and their mean (`pipeline.data.scoring`: answers
matched to the high-res images by id; a missing, extra, unreadable or wrongly sized answer
is an error naming the file, never a partial score); `--csv` also writes the table.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipeline.core import io, locks
from pipeline.core.config import DEFAULTS, load_config
from pipeline.data.scoring import score_submission


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--submission", required=True, type=Path, help="submission zip or folder of answers")
    parser.add_argument("--answers", required=True, type=Path,
                        help="folder of high-res answers (test_{i}_high.tif), e.g. data/demo/answers")
    parser.add_argument("--exp", default=None,
                        help="experiment config whose data patterns name the files (default: the defaults)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the per-image table here")
    parser.add_argument("--jobs", type=int, default=-1, help="worker processes (-1: all cores)")


def main(args: argparse.Namespace) -> int:
    start = time.time()
    data_cfg = load_config(args.exp)["data"] if args.exp else DEFAULTS["data"]
    table = score_submission(args.submission, args.answers, data_cfg, jobs=args.jobs)
    print(table.to_string(index=False, formatters={"ssim": "{:.5f}".format}))
    if args.csv:
        with locks.locked(args.csv), io.atomic_path(args.csv) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")
    mean = table["ssim"].mean()
    print(f"mean SSIM {mean:.5f} over {len(table)} images ({args.submission}) in {time.time() - start:.1f}s"
          + (f"; table in {args.csv}" if args.csv else ""))
    return 0
