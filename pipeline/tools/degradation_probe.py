"""`python -m pipeline degradation` (`make unzip` runs it after stage 00): which downscaler made the low-res images.

    data/interim (training pairs) -> data/interim/degradation.json, and the ranking printed

Every candidate kernel of `pipeline.data.degradation` downscales the training scenes' high-res
images; the one whose result is closest to the organiser's low-res images (PSNR) is the
`best` kernel, which external training data (`data.extra`) is then made with.
"""
from __future__ import annotations

import json
import time

from pipeline.core import io
from pipeline.core.artifacts import degradation_path
from pipeline.data.degradation import PROBE_SCENES, format_table, probe


def add_arguments(parser) -> None:
    parser.add_argument("--exp", default="demo", help="experiment name or YAML path (data.scale)")
    parser.add_argument("--max-scenes", type=int, default=PROBE_SCENES,
                        help=f"training scenes compared at most, evenly spread (default {PROBE_SCENES}; 0 = all)")
    parser.add_argument("--jobs", type=int, default=-1, help="joblib threads (default: one per core)")



def main(args) -> int:
    from pipeline.core.artifacts import load_manifest
    from pipeline.core.config import load_config

    start = time.time()
    scale = int(load_config(args.exp)["data"]["scale"])
    rows = load_manifest("train")
    pairs = list(zip(rows["low_path"], rows["high_path"]))
    result = probe(pairs, scale, max_scenes=args.max_scenes or None, n_jobs=args.jobs)
    with io.atomic_path(degradation_path()) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"degradation: -> {degradation_path()} ({time.time() - start:.1f} s)")
    return 0
