"""TensorBoard event files of a training run, beside its log.csv (`tensorboard --logdir models/`).

Scalars: `train/loss`, `train/lr`, one `train/loss_<term>` per weighted loss term,
`val/ssim` and `val/bicubic_ssim`; image `val/crop`: a fixed crop of the first validation
scene as [bicubic | model | truth], at every validation. The figures are log.csv's rows
(one place computes them: stage 02); this module only writes them out.

A resumed run appends a new event file that starts with TensorBoard's purge marker at the
first step it trains, so the steps a killed run had logged after its last checkpoint (and
trains again) are dropped, not shown twice. Events are flushed with every checkpoint.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pipeline.data.patches import Scene, to_float

EVENTS_GLOB = "events.out.tfevents.*"
CROP_LR = 48                 # LR side of the validation crop (HR: scale x this)


def remove_event_files(run: Path) -> None:
    """A run started over leaves no events of the run it replaces."""
    for path in Path(run).glob(EVENTS_GLOB):
        path.unlink(missing_ok=True)


def _after_earlier_files(run: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the
    second it was made, then host and pid: a resumed run's file made in the same second as
    the killed run's could sort first, and its purge marker would then drop the wrong events.
    Wait (at most a second, only then) until its name sorts after every earlier file."""
    stamps = [int(p.name.split(".")[3]) for p in run.glob(EVENTS_GLOB) if p.name.split(".")[3].isdigit()]
    if stamps and (wait := max(stamps) + 1 - time.time()) > 0:
        time.sleep(wait)


def _crop_box(scene: Scene) -> tuple[slice, slice]:
    """The centre LR crop of at most CROP_LR x CROP_LR."""
    h, w = scene.lr.shape[:2]
    ch, cw = min(CROP_LR, h), min(CROP_LR, w)
    y, x = (h - ch) // 2, (w - cw) // 2
    return slice(y, y + ch), slice(x, x + cw)


@torch.no_grad()
def _super_resolve(net: nn.Module, lr: np.ndarray, device: torch.device) -> np.ndarray:
    """uint8 HWC LR -> uint8 HWC output of `net` (fp32, eval mode, rounded as submitted)."""
    was_training = net.training
    net.eval()
    x = to_float(torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1)))[None], device)
    sr = (net(x).clamp(0, 1) * 255).round().to(torch.uint8)
    net.train(was_training)
    return sr[0].permute(1, 2, 0).cpu().numpy()


class TrainingBoard:
    """The event writer of one run folder (rank 0 only)."""

    def __init__(self, run: Path, start_step: int, scene: Scene, scale: int, device: torch.device):
        from torch.utils.tensorboard import SummaryWriter  # imported when a run trains, not to skip one

        if start_step:
            _after_earlier_files(Path(run))
        # purge_step: events of earlier files at steps >= it are discarded by TensorBoard;
        # the resumed run trains from start_step + 1 (start_step is in the checkpoint's log)
        self.writer = SummaryWriter(log_dir=str(run), purge_step=start_step + 1 if start_step else None)
        rows, cols = _crop_box(scene)
        self.lr = scene.lr[rows, cols]
        hr_rows = slice(rows.start * scale, rows.stop * scale)
        hr_cols = slice(cols.start * scale, cols.stop * scale)
        self.truth = scene.hr[hr_rows, hr_cols]
        self.bicubic: np.ndarray | None = None
        self.scale, self.device = scale, device

    def log_row(self, row: dict) -> None:
        """One row of log.csv: training scalars on training steps, validation on validation steps."""
        step = int(row["step"])
        if row.get("loss") is not None:
            self.writer.add_scalar("train/loss", row["loss"], step)
            self.writer.add_scalar("train/lr", row["lr"], step)
            for key, value in row.items():
                if key.startswith("loss_") and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, step)
        if row.get("val_ssim") is not None:
            self.writer.add_scalar("val/ssim", row["val_ssim"], step)
            if row.get("bicubic_ssim") is not None:
                self.writer.add_scalar("val/bicubic_ssim", row["bicubic_ssim"], step)

    def log_crop(self, step: int, net: nn.Module) -> None:
        """The validation crop as [bicubic | model | truth] (uint8 HWC)."""
        if self.bicubic is None:
            from pipeline.nets import build_net
            self.bicubic = _super_resolve(build_net("bicubic", scale=self.scale).to(self.device),
                                          self.lr, self.device)
        panel = np.concatenate([self.bicubic, _super_resolve(net, self.lr, self.device), self.truth], axis=1)
        self.writer.add_image("val/crop", panel, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
