"""The pipeline's own checkpoint format, written by stage 02 and read everywhere else.

A checkpoint is a dict saved with torch.save:
    {"format": "sr-pipeline/1",
     "net": {"name": str, "args": dict},   # build_net(name, **args) rebuilds it
     "state_dict": ...,                      # weights for inference (the EMA ones if EMA is on)
     "exp": str, "seed": int, "fold": int, "step": int, "val_ssim": float | None,
     ...}                                    # last.pt adds the full training state
It is written atomically (temporary file, then rename).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path

FORMAT = "sr-pipeline/1"


def is_pipeline_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def save_checkpoint(path: str | Path, *, net_name: str, net_args: dict, state_dict: dict,
                    **extra: Any) -> None:
    payload = {"format": FORMAT, "net": {"name": net_name, "args": dict(net_args)},
               "state_dict": state_dict, **extra}
    # serialised in memory, then written by Python: a full disk is then an OSError with its
    # errno (torch's own file writer only says "unexpected pos"), and the archive inside is
    # not named after the temporary file
    import torch  # here, not at the top: stages that only find checkpoints never import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: checkpoint not found")
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise PipelineError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not is_pipeline_checkpoint(ckpt):
        raise PipelineError(f"{path}: not a pipeline checkpoint (format '{FORMAT}' expected)")
    return ckpt


def find_checkpoints(folder: str | Path, name: str = "best.pt", seeds: list[int] | None = None,
                     models: str = "folds") -> list[Path]:
    """Every `seed<s>/fold<f>/<name>` under an experiment folder (`models="folds"`), or every
    `seed<s>/full/<name>` (the full-data fits, `"full"`), or both, sorted, optionally only some
    seeds; given one seed's folder instead (`models/<exp>/seed0`), its own."""
    folder = Path(folder)
    found = []
    for runs in paths.ENSEMBLE_RUNS[models]:
        found += sorted(folder.glob(f"seed*/{runs}/{name}")) or sorted(folder.glob(f"{runs}/{name}"))
    if seeds is not None:
        wanted = {f"seed{s}" for s in seeds}
        found = [p for p in found if p.parent.parent.name in wanted]
    return found


def run_seconds(run: str | Path) -> float | None:
    """Wall time of a training run folder: last.pt's mtime minus config.yaml's (written when
    the run starts), or None when either is missing. A resumed run counts its pause too."""
    run = Path(run)
    if not ((run / "config.yaml").is_file() and (run / "last.pt").is_file()):
        return None
    return max((run / "last.pt").stat().st_mtime - (run / "config.yaml").stat().st_mtime, 0.0)
