"""The torch versions the pipeline supports, checked where torch is installed or found.

`make setup` runs `python -m pipeline.core.torch_check` last: it prints torch's version, its
CUDA build and the GPUs it can use, fails with one line when torch is outside
`SUPPORTED` (the pipeline uses nothing newer than the floor; the test suite is run with it,
docs/gpu.md), and warns in one line when nvidia-smi lists GPUs this torch cannot use
(`pipeline.core.device.gpu_problem`).
"""
from __future__ import annotations

import re
import sys

SUPPORTED = ((2, 4), (2, 15))     # torch >= 2.4 and < 2.15 (2.14.x is the pinned one)


def version_tuple(version: str) -> tuple[int, int]:
    """'2.14.1+cu130' -> (2, 14)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"not a torch version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def check(version: str) -> str | None:
    """Why torch `version` is not supported (None when it is)."""
    low, high = SUPPORTED
    if not low <= version_tuple(version) < high:
        return (f"torch {version} is outside the versions this pipeline supports "
                f"(>= {low[0]}.{low[1]}, < {high[0]}.{high[1]}); install one of them "
                f"(make setup installs the pinned one)")
    return None


def main() -> int:
    import torch

    from pipeline.core.device import gpu_problem

    problem = check(torch.__version__)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}); "
          f"GPUs torch can use: {', '.join(gpus) or 'none'}")
    warning = gpu_problem()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
