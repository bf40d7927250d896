"""What makes a run resumable: its seed, its random states, and what is on disk from an earlier run.

A run's sample stream and initial weights are functions of (seed, fold) (`run_seed`); its
last.pt holds every random generator's state (`rng_state`), so a killed run restarted with
`--resume auto` continues bit for bit. `read_run_state` reads an earlier run's last.pt (or
says why it cannot be kept), `config_diff` names the keys a changed config differs in, and
`clean_run_dir` removes an earlier run's artifacts before a run starts over.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.checkpoints import read_checkpoint
from pipeline.core.errors import PipelineError
from pipeline.core.paths import FULL
from pipeline.data.patches import FULL_FIT_STREAM
from pipeline.train.board import remove_event_files

ARTIFACTS = ("best.pt", "last.pt", "log.csv", "curves.png", "config.yaml")


def run_seed(seed: int, fold: int | str) -> int:
    """One 32-bit seed from (seed, fold): folds of one seed differ, reruns do not."""
    key = FULL_FIT_STREAM if fold == FULL else fold
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0])



def seed_everything(value: int) -> None:
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)



def rng_state() -> dict[str, Any]:
    """Every random generator's state; on a GPU the current device's (a process trains on one)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s states. The CUDA state goes to the current device, whatever GPUs
    this machine has now (a list, one per device as older checkpoints saved it, gives the
    current device's entry, or the first when there are fewer)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)


def config_diff(a: dict, b: dict, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    keys = []
    for k in sorted(set(a) | set(b), key=str):
        dotted = f"{where}.{k}" if where else str(k)
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and dotted != "model.args":
            keys += config_diff(va, vb, dotted)
        elif va != vb:
            keys.append(dotted)
    return keys



def clean_run_dir(run: Path) -> None:
    """Start over: drop the artifacts of an earlier run and temporary files a kill left."""
    for name in ARTIFACTS:
        (run / name).unlink(missing_ok=True)
    remove_event_files(run)
    remove_stale_temporaries(run)



def read_run_state(run: Path, resume: str, force: bool) -> dict | None:
    """The last.pt of an earlier run of this folder (None: there is none). An unreadable
    last.pt, or best.pt beside a last.pt that would be kept, stops with the remedy;
    with --force or --resume never the run starts afresh over it (with a warning)."""
    last_path, best_path = run / "last.pt", run / "best.pt"
    afresh = "--force" if force else "--resume never" if resume == "never" else None
    try:
        state = read_checkpoint(last_path) if last_path.is_file() else None
        if state is not None and not force and best_path.is_file():
            read_checkpoint(best_path)  # kept by a skip or a resume: it must be readable
    except PipelineError as exc:
        if afresh is None:
            raise PipelineError(f"{exc}; rerun with --force (or --resume never) to start this run afresh "
                                "over it") from None
        warnings.warn(f"{exc}; starting afresh ({afresh})")
        return None
    return state



def remove_stale_temporaries(run: Path) -> None:
    for tmp in run.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)
